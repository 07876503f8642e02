"""HF-SAM's base weights: loading them into a module, and a digest that names tensors.

The digest names what a checkpoint or a cached embedding was made with: the random base of
``weights="none"`` (no file to hash) and the LoRA adapters in a prompt-cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from napari_medseg.engine.checkpoint import CheckpointError
from napari_medseg.engine.weights import fetch_weights, file_sha256, litemedsam_path
from napari_medseg.models.hf_sam import HFSAM


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the names and raw bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        h.update(k.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def load_base_weights(module: HFSAM, weights: str, backbone: str, seed: int) -> tuple[str, str]:
    """Load the base (SAM / LiteMedSAM) weights into ``module``.

    Args:
        module: A freshly built HF-SAM of that ``backbone``.
        weights: ``"auto"`` (LiteMedSAM from its package, SAM ViTs from the weights registry),
            ``"none"`` (keep the seeded random weights, for tests) or a file path.
        backbone: ``"litemedsam"``, ``"sam_vit_b"``, ``"sam_vit_l"`` or ``"sam_vit_h"``.
        seed: The seed the random weights were drawn with (names them for ``"none"``).

    Returns:
        (name, sha256) of the base: the file's hash, or for random weights the digest of the
        module's non-HF tensors.

    Raises:
        CheckpointError: If the file's tensors do not fit the backbone.
    """
    if weights == "none":
        base = {k: v for k, v in module.state_dict().items() if not k.startswith("hf.")}
        return f"random(seed={seed})", tensor_digest(base)
    if weights == "auto":
        path = litemedsam_path() if backbone == "litemedsam" else fetch_weights(backbone)
        name = backbone
    else:
        path, name = Path(weights), Path(weights).name
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith(("pixel_mean", "pixel_std"))}
    if backbone != "litemedsam":
        from napari_medseg.models.hf_sam.backbones import adapt_vit_state

        adapt_vit_state(state, module.image_encoder, "image_encoder.")
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("hf.")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise CheckpointError(f"{path.name} does not fit backbone {backbone!r} (first mismatch: {bad!r})")
    return name, file_sha256(path)
