"""Checkpoints: one ``.safetensors`` file with tensors and JSON metadata; never pickle.

Metadata keys (all strings): ``format`` (always ``"napari-medseg"``), ``format_version``,
``model`` (registry name), ``config`` (JSON of the network's full config), ``preset`` (JSON of
the intensity preset or ``"null"``), ``class_names`` (JSON list, index 0 = background),
``provenance`` (JSON: training data summary, options, versions) and ``extra`` (JSON, network
specific, e.g. HF-SAM's base weights name and sha256).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "napari-medseg"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the problem."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file.

    Attributes:
        model: Registry name of the network.
        config: The network's full config (JSON-serialisable).
        tensors: Name → tensor (CPU, contiguous).
        preset: JSON of the intensity preset, or ``None``.
        class_names: Class names, index 0 = background.
        provenance: How the weights were made.
        extra: Network-specific metadata.
    """

    model: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    preset: str | None = None
    class_names: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then rename).

    Returns:
        The final path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": ckpt.model,
        "config": json.dumps(ckpt.config, sort_keys=True),
        "preset": ckpt.preset if ckpt.preset is not None else "null",
        "class_names": json.dumps(list(ckpt.class_names)),
        "provenance": json.dumps(ckpt.provenance, sort_keys=True, default=str),
        "extra": json.dumps(ckpt.extra, sort_keys=True),
    }
    # safetensors refuses shared or non-contiguous storage; clone makes each tensor its own.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in ckpt.tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read and validate a checkpoint's metadata without loading its tensors.

    Raises:
        CheckpointError: Missing file, unreadable or truncated file, not a napari-medseg
            checkpoint, or a newer format version.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises several types for bad headers
        raise CheckpointError(
            f"{path.name} is not a readable .safetensors checkpoint (truncated or corrupt?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is a .safetensors file but not a napari-medseg checkpoint")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise CheckpointError(f"{path.name} has an invalid format_version") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} was written by a newer napari-medseg (checkpoint format {version}, "
            f"this version reads up to {FORMAT_VERSION}); upgrade napari-medseg"
        )
    return meta


def read_model_config(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """A checkpoint's network name and config, without reading its tensors (cheap).

    Raises:
        CheckpointError: Every problem of :func:`read_metadata`, or unreadable model/config.
    """
    meta = read_metadata(path)
    try:
        return meta["model"], json.loads(meta.get("config", "{}"))
    except (KeyError, ValueError):
        raise CheckpointError(f"{Path(path).name} has no readable network name or config") from None


def load_checkpoint(path: str | os.PathLike[str], expect_model: str | None = None) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: File path.
        expect_model: If given, the checkpoint must belong to this network.

    Raises:
        CheckpointError: For every problem listed in :func:`read_metadata`, a checkpoint of
            another network, or unreadable tensor data.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    name = Path(path).name
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{name} is a checkpoint of network {meta['model']!r}, not {expect_model!r}")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{name}: tensor data is unreadable (truncated?): {err}") from None
    try:
        preset = None if meta.get("preset", "null") == "null" else meta["preset"]
        return Checkpoint(
            model=meta["model"],
            config=json.loads(meta.get("config", "{}")),
            tensors=tensors,
            preset=preset,
            class_names=json.loads(meta.get("class_names", "[]")),
            provenance=json.loads(meta.get("provenance", "{}")),
            extra=json.loads(meta.get("extra", "{}")),
        )
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{name}: damaged metadata ({err})") from None


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Load ``tensors`` into ``module`` requiring the same keys and shapes.

    Raises:
        CheckpointError: Naming the first missing, unexpected or wrongly shaped tensor.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise CheckpointError(f"{name}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{name}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, value in tensors.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{name}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"the network expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(tensors, strict=True)
