"""LoRA on the image encoder's attention through ``peft`` (imported only here, only when used).

SAMed / H-SAM / HF-SAM adapt the **q** and **v** parts of each block's fused ``qkv`` projection:
``q += B_q A_q x``, ``v += B_v A_v x`` with rank r, no scaling, no dropout, B zero-initialised.
peft adapts whole ``nn.Linear`` modules, so :func:`split_qkv` first replaces every fused ``qkv``
by a :class:`SplitQKV` holding three linears ``q``, ``k``, ``v`` (weights sliced from the fused
one, outputs re-assembled in the original channel order); peft then targets ``q`` and ``v``.
With peft's defaults (A Kaiming-uniform, B zeros) and ``lora_alpha = r`` (scaling 1) this is
the papers' adapter, and the encoder's output is unchanged until B moves.

Target names: ``q``, ``k``, ``v`` (parts of ``qkv``), ``qkv`` (the fused projection, as
``LoraConfig(target_modules=["qkv"])`` would do), ``proj`` (the attention output) and ``mlp``
(both linears of each block's MLP: TinyViT's ``fc1``/``fc2``, SAM ViT's ``lin1``/``lin2``; not
in the papers, which adapt attention only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from napari_medseg.models.hf_sam.backbones import TinyViTEncoder, WindowAttention

ADAPTER = "default"
LORA_TARGETS = ("q", "k", "v", "qkv", "proj", "mlp")


class SplitQKV(nn.Module):
    """A fused qkv projection as three linears; forward equals the fused layer's.

    Args:
        fused: The original ``nn.Linear(dim, 3*dim)``.
        order: ``"qkv"`` when the output is [q | k | v] (SAM's ViT) or ``"per_head"`` when it is
            [q_h, k_h, v_h] for each head h (TinyViT).
        heads: Number of heads (for ``"per_head"``).
    """

    def __init__(self, fused: nn.Linear, order: str, heads: int = 1) -> None:
        super().__init__()
        dim = fused.out_features // 3
        idx = torch.arange(fused.out_features)
        if order == "per_head":
            kd = dim // heads
            rows = idx.view(heads, 3, kd)
            parts = [rows[:, i].reshape(-1) for i in range(3)]
        else:
            parts = [idx[i * dim : (i + 1) * dim] for i in range(3)]
        lins = []
        for rows_i in parts:
            lin = nn.Linear(fused.in_features, dim, bias=fused.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(fused.weight[rows_i])
                if fused.bias is not None:
                    lin.bias.copy_(fused.bias[rows_i])
            lin.to(fused.weight.device, fused.weight.dtype)
            lins.append(lin)
        self.q, self.k, self.v = lins
        self.in_features, self.out_features = fused.in_features, fused.out_features
        perm = torch.cat(parts)
        if torch.equal(perm, idx):
            self.register_buffer("inverse", None, persistent=False)
        else:
            self.register_buffer("inverse", torch.argsort(perm), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., 3·dim) in the fused layer's channel order."""
        out = torch.cat([self.q(x), self.k(x), self.v(x)], -1)
        return out if self.inverse is None else out.index_select(-1, self.inverse)


def _attention_modules(encoder: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(attention module, qkv layout, heads) for every block of a supported encoder."""
    found = []
    for module in encoder.modules():
        if isinstance(module, WindowAttention):
            found.append((module, "per_head", module.heads))
        elif hasattr(module, "qkv") and hasattr(module, "num_heads") and isinstance(module.qkv, nn.Linear):
            found.append((module, "qkv", int(module.num_heads)))
    return found


def split_qkv(encoder: nn.Module) -> int:
    """Replace every fused ``qkv`` linear of ``encoder`` by a :class:`SplitQKV`; returns the count."""
    n = 0
    for attn, order, heads in _attention_modules(encoder):
        if isinstance(attn.qkv, nn.Linear):
            attn.qkv = SplitQKV(attn.qkv, order, heads)
            n += 1
    return n


def target_pattern(targets: Sequence[str]) -> str:
    """Peft ``target_modules`` regex (full match on module names) for the chosen targets."""
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad or not targets:
        raise ValueError(f"LoRA targets must be among {LORA_TARGETS}, got {list(targets)}")
    names = [rf"qkv\.{t}" if t in ("q", "k", "v") else t for t in targets if t != "mlp"]
    parts = [rf".*\.attn\.({'|'.join(names)})"] if names else []
    if "mlp" in targets:
        parts.append(r".*\.mlp\.(fc1|fc2|lin1|lin2)")
    return "|".join(f"(?:{p})" for p in parts) if len(parts) > 1 else parts[0]


def add_lora(encoder: nn.Module, rank: int, targets: Sequence[str] = ("q", "v"), alpha: float = 0.0) -> int:
    """Inject LoRA adapters into ``encoder`` in place (imports peft).

    Args:
        encoder: A :class:`TinyViTEncoder` or SAM ViT encoder.
        rank: LoRA rank r (HF-SAM: 5).
        targets: Which projections to adapt (see module docstring).
        alpha: peft's ``lora_alpha``; 0 means ``alpha = rank`` (scaling 1, as in SAMed).

    Returns:
        Number of LoRA parameters added.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    if any(t in ("q", "k", "v") for t in targets):
        split_qkv(encoder)
    before = sum(p.numel() for p in encoder.parameters())
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_pattern(targets),
    )
    inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return sum(p.numel() for p in encoder.parameters()) - before


def has_lora(module: nn.Module) -> bool:
    """Whether LoRA adapters were injected somewhere in ``module``."""
    return any("lora_" in name for name, _ in module.named_parameters())


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``module`` by state-dict name."""
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def is_tinyvit(encoder: nn.Module) -> bool:
    """Whether ``encoder`` is LiteMedSAM's TinyViT."""
    return isinstance(encoder, TinyViTEncoder)
