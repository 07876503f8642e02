"""The one training loop every trainable network goes through.

``finetune`` is a plain generator: each yielded :class:`TrainProgress` is a cancel point. When
the caller stops iterating (Cancel in the widget, Ctrl+C in the CLI) or closes the generator,
the best weights seen so far are put back into the model and, if a checkpoint path was given,
written there. Networks plug in their data, loss and trainable parameters through the
``Segmenter`` hooks; they never copy this loop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Generator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from napari_medseg.engine.device import OutOfMemory, free_cuda_cache, is_oom, resolve_device
from napari_medseg.engine.train.distributed import DistContext
from napari_medseg.engine.train.options import TrainOptions, TrainProgress
from napari_medseg.engine.train.weight_average import WeightAverage

if TYPE_CHECKING:
    from napari_medseg.engine.segmenter import Segmenter

log = logging.getLogger(__name__)


class _LossModule(nn.Module):
    """Holds the network so DDP sees its parameters; forward = the network's own loss."""

    def __init__(self, seg: Segmenter) -> None:
        super().__init__()
        self.net = seg.module
        self._seg = [seg]  # a list keeps the segmenter out of the module tree

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._seg[0].training_loss(self.net, batch)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so CPU training is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "poly":
        return (1 - min(t, 1.0)) ** 0.9
    return 1.0


def _snapshot(seg: Segmenter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in seg.checkpoint_tensors().items()}


def finetune(
    seg: Segmenter,
    images: Any,
    labels: Any,
    unlabeled: Sequence[np.ndarray] | None = None,
    steps: int | None = None,
    **options: Any,
) -> Generator[TrainProgress, None, None]:
    """Train ``seg`` in place; yields a :class:`TrainProgress` after every step.

    Args:
        seg: The segmenter to train (its ``module`` is updated).
        images: Training images (see the network's ``make_train_data``).
        labels: Matching label arrays.
        unlabeled: Images without labels, for networks that use them.
        steps: Optimiser steps (shortcut for ``options["steps"]``).
        **options: Fields of :class:`TrainOptions`; anything else goes to ``extra``.

    Raises:
        TrainingDataError: The labels cannot be trained on.
        FloatingPointError: The loss became NaN or infinite.
    """
    opts = TrainOptions.build(seg.train_defaults(), {**options, "steps": steps})
    device = resolve_device(opts.device)
    ctx = DistContext.from_env(device)
    device = ctx.device_for(device)
    seg.device = device
    seed_everything(opts.seed)
    if not seg.trained:
        # Random weights: draw them from the training seed so a run is reproducible.
        seg.module = seg.build_module().to(device)
    data = seg.make_train_data(images, labels, unlabeled, opts)
    seg.prepare_for_training(data)
    seg.module.to(device)
    data.shard(ctx.rank, ctx.world)
    per_epoch = max(1, math.ceil(len(data) / (opts.batch_size * ctx.world)))
    total = opts.steps or opts.epochs * per_epoch
    val_every = opts.val_every or max(1, total // 10)
    start = _maybe_resume(seg, opts)

    groups = seg.trainable_parameters()
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": list(groups)}]
    groups = [g for g in groups if g["params"]]  # type: ignore[index]
    params = [p for g in groups for p in g["params"]]  # type: ignore[index]
    if not params:
        raise RuntimeError(f"{seg.card.name}: no trainable parameters")
    if opts.optimizer == "sgd":
        optim: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=opts.lr, momentum=0.9, weight_decay=opts.weight_decay
        )
    else:
        optim = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    use_amp = opts.amp and device.type == "cuda"
    use_cpu_amp = opts.cpu_amp and device.type == "cpu"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    wrapped = ctx.wrap(_LossModule(seg), device)
    rng = np.random.default_rng(opts.seed + 1000 * ctx.rank)
    ema = WeightAverage(seg.module, opts.ema, params) if opts.ema > 0 else None

    best, best_state, metrics = -1.0, None, {}
    t0 = time.perf_counter()
    finished = False
    try:
        for step in range(start, total):
            seg.module.train()
            for group in optim.param_groups:
                scale = group.get("lr_scale", 1.0)
                group["lr"] = scale * opts.lr * lr_factor(step, total, opts.schedule, opts.warmup)
            batch = {k: v.to(device) for k, v in data.sample_batch(rng, opts.batch_size).items()}
            try:
                with (
                    torch.autocast("cpu", dtype=torch.bfloat16)
                    if use_cpu_amp
                    else torch.autocast("cuda", enabled=use_amp)
                ):
                    loss, terms = wrapped(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {float(loss)} at step {step + 1}; lower the learning "
                        f"rate (now {opts.lr:g}) or check the labels"
                    )
                optim.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                free_cuda_cache()
                smaller = max(1, opts.batch_size // 2)
                raise OutOfMemory(
                    f"batch size {opts.batch_size} with crop {opts.crop_size or seg.input_size} does "
                    f"not fit in memory on {device}; try batch size {smaller} or a smaller crop size"
                ) from err
            if opts.grad_clip:
                scaler.unscale_(optim)
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            scaler.step(optim)
            scaler.update()
            if ema is not None:
                ema.update()
            last = step + 1 == total
            if (step + 1) % val_every == 0 or last:
                # With ``ema`` the averaged weights are validated, kept and saved.
                with ema.applied() if ema is not None else nullcontext():
                    ctx.broadcast_state(seg.module)
                    metrics = {k: ctx.mean(v) for k, v in data.validate(seg).items()}
                    score = seg.selection_score(metrics)
                    score = -loss.item() if score is None else score
                    if score > best:
                        best, best_state = score, _snapshot(seg)
                        seg.provenance = _provenance(seg, data, opts, step + 1, best)
                        _write(seg, opts, ctx)
            elapsed = time.perf_counter() - t0
            eta = elapsed / (step + 1 - start) * (total - step - 1)
            finished = last
            yield TrainProgress(
                step=step + 1,
                total=total,
                loss=float(loss.detach()),
                terms=terms,
                metrics=dict(metrics),
                best=best if best >= 0 else float("nan"),
                elapsed=elapsed,
                eta=eta,
                message=data.note,
                done=last,
            )
    finally:
        # Runs on normal end, on Cancel (generator closed) and on errors: keep the best weights.
        if best_state is not None:
            seg.load_checkpoint_tensors(best_state, "best weights")
        if best_state is not None or finished:
            seg.trained = True
            if not finished:
                log.info("training stopped early; kept the best weights (val Dice %.3f)", best)
        seg.module.eval()


def _provenance(seg: Segmenter, data: Any, opts: TrainOptions, step: int, best: float) -> dict[str, Any]:
    return {
        "trained_by": "napari-medseg finetune",
        "step": step,
        "best_val_dice": round(best, 5),
        "data": data.summary(),
        "options": {k: v for k, v in opts.to_dict().items() if k != "extra"},
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write(seg: Segmenter, opts: TrainOptions, ctx: DistContext) -> None:
    if opts.checkpoint and ctx.is_main:
        seg.trained = True
        seg.save(opts.checkpoint)


def _maybe_resume(seg: Segmenter, opts: TrainOptions) -> int:
    """Load weights and step count from ``opts.checkpoint`` when resuming; return the step."""
    if not (opts.resume and opts.checkpoint and Path(opts.checkpoint).is_file()):
        return 0
    from napari_medseg.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(opts.checkpoint, expect_model=seg.card.name)
    seg.load_checkpoint_tensors(ckpt.tensors, Path(opts.checkpoint).name)
    step = int(ckpt.provenance.get("step", 0))
    log.info("resuming from %s at step %d (optimiser moments restart)", opts.checkpoint, step)
    return step
