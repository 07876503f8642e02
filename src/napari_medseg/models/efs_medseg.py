"""EFS-MedSeg network: 3-D U-Net segmenter + VAE reconstruction branch + projection head.

Pure torch. Tensors are (B, C, Z, Y, X). The three parts the EFS-MedSeg abstract names are
separate sub-modules so each can be switched off (``vae=False``, ``contrast=False``); the
segmenter alone is what inference runs.

Building blocks follow the authors' predecessor (OS-MedSeg): residual units of two 3×3×3
convolutions with instance norm and PReLU, widths 16–256, 2× max-pool down, transposed-conv
up, skip concatenation. Pooling factors are per level and per axis so anisotropic volumes
(e.g. cardiac cine MRI with 10 mm slices) are not pooled along the coarse axis too early.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Pool = tuple[int, int, int]


class ResUnit3d(nn.Module):
    """Two conv3×3×3 → InstanceNorm → PReLU with a residual path (1×1×1 when widths differ).

    Args:
        cin: Input channels.
        cout: Output channels.
        convs: Number of convolutions (1 or 2).
        kernel: Convolution kernel (z, y, x), odd sizes; e.g. (1, 3, 3) on thick slices.
    """

    def __init__(self, cin: int, cout: int, convs: int = 2, kernel: Sequence[int] = (3, 3, 3)) -> None:
        super().__init__()
        k = tuple(int(v) for v in kernel)
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                nn.Conv3d(cin if i == 0 else cout, cout, k, padding=tuple(v // 2 for v in k), bias=False),
                nn.InstanceNorm3d(cout, affine=True),
            ]
            if i < convs - 1:
                layers.append(nn.PReLU(cout))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity() if cin == cout else nn.Conv3d(cin, cout, 1, bias=False)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, *S) → (B, cout, *S)."""
        return self.act(self.body(x) + self.skip(x))


class VAEBranch(nn.Module):
    """Variational reconstruction branch on the segmenter's bottleneck features.

    μ and log σ² come from 3×3×3 convolutions of the bottleneck; ``z = μ + ε·σ`` with
    ε ~ N(0, 1) (the predecessor drew ε uniformly, which is not the VAE reparameterisation).
    The decoder has no skip connections: with skips the image could bypass the latent and the
    KL term would constrain nothing, so the reconstruction has to come through the features
    the segmenter itself uses.

    Args:
        width: Bottleneck channels of the segmenter.
        latent: Latent channels.
        widths: Decoder widths from coarse to fine (one per up-sampling step).
        pools: Up-sampling factors per step, coarse to fine.
        out_channels: Reconstructed image channels.
    """

    def __init__(
        self, width: int, latent: int, widths: Sequence[int], pools: Sequence[Pool], out_channels: int
    ) -> None:
        super().__init__()
        self.mu = nn.Conv3d(width, latent, 3, padding=1)
        self.logvar = nn.Conv3d(width, latent, 3, padding=1)
        ups: list[nn.Module] = []
        cin = latent
        for w, p in zip(widths, pools):
            ups.append(nn.Sequential(nn.ConvTranspose3d(cin, w, p, stride=p), ResUnit3d(w, w, convs=1)))
            cin = w
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv3d(cin, out_channels, 1)

    def forward(
        self, feat: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bottleneck (B, width, *s) → (reconstruction (B, C, *S) in [0, 1], μ, log σ²)."""
        mu = self.mu(feat)
        logvar = self.logvar(feat).clamp(-10.0, 10.0)  # keeps exp() finite early in training
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        for up in self.ups:
            z = up(z)
        return torch.sigmoid(self.out(z)), mu, logvar


class LocalContrast3d(nn.Module):
    """Fixed local contrast normalisation: (x − G∗x) / sqrt(G∗(x − G∗x)² + eps), G a Gaussian.

    MRI intensities mean nothing in absolute terms: in one scan the blood pool is the brightest
    tissue, in the next bright fat pushes it to mid-grey after percentile scaling. Relative to
    its neighbourhood (within ~a centimetre) a structure keeps its contrast, so this channel
    looks alike across such scans. No learned weights; replicate padding at the borders.

    Args:
        sigma: Gaussian SD per axis (z, y, x) in voxels; axes below 0.3 are not smoothed.
        mode: ``"add"`` (output = [x, normalised x], twice the channels) or ``"replace"``.
        eps: Variance floor (intensities in [0, 1]), so flat regions are not blown up to noise.
    """

    def __init__(self, sigma: Sequence[float], mode: str = "add", eps: float = 1e-3) -> None:
        super().__init__()
        if mode not in ("add", "replace"):
            raise ValueError(f'local contrast mode must be "add" or "replace", got {mode!r}')
        self.mode, self.eps = mode, float(eps)
        self.sigma = [float(s) for s in sigma]
        for axis, s in enumerate(self.sigma):
            radius = max(1, math.ceil(3 * s)) if s >= 0.3 else 0
            t = torch.arange(-radius, radius + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (t / s) ** 2) if radius else torch.ones(1)
            self.register_buffer(f"k{axis}", k / k.sum(), persistent=False)

    def channels(self, cin: int) -> int:
        """Channels out for ``cin`` channels in."""
        return 2 * cin if self.mode == "add" else cin

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        for axis in range(3):
            k: torch.Tensor = getattr(self, f"k{axis}")
            r = k.numel() // 2
            if r == 0:
                continue
            shape = [1, 1, 1]
            shape[axis] = k.numel()
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
            weight = k.view(1, 1, *shape).repeat(c, 1, 1, 1, 1)  # one Gaussian per channel
            x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=c)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) → (B, 2C or C, Z, Y, X); the normalised channel clipped to ±4."""
        mean = self._blur(x)
        centred = x - mean
        y = (centred / torch.sqrt(self._blur(centred * centred) + self.eps)).clamp(-4.0, 4.0)
        return torch.cat([x, y], 1) if self.mode == "add" else y


class ProjectionHead(nn.Module):
    """1×1×1 conv → PReLU → 1×1×1 conv, L2-normalised over channels (SimCLR-style head)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(cin, cin, 1), nn.PReLU(cin), nn.Conv3d(cin, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, *s) → (B, dim, *s), unit norm along dim 1."""
        return F.normalize(self.net(x), dim=1)


def default_pools(levels: int) -> list[Pool]:
    """Isotropic 2× pooling at every level."""
    return [(2, 2, 2)] * levels


class EfsMedSegNet(nn.Module):
    """3-D U-Net with optional VAE reconstruction branch and contrastive projection head.

    Args:
        in_channels: Image channels (1 for grey volumes).
        num_classes: Output classes including background (K + 1 in the paper's notation).
        widths: Encoder widths, finest first, e.g. (16, 32, 64, 128, 256).
        pools: Pooling factors (z, y, x) of each of the ``len(widths) - 1`` down-steps.
        vae: Build the VAE reconstruction branch.
        latent: VAE latent channels (0: the bottleneck width).
        contrast: Build the projection head.
        proj_dim: Projection dimension.
        contrast_level: Decoder level whose features are projected (0 = full resolution).
        kernels: Convolution kernel (z, y, x) of each encoder level, finest first, also used by
            the decoder unit of the same level (``len(widths)`` entries; None: 3×3×3 everywhere).
        deep_supervision: Number of coarser decoder levels (1, 2, …) that get their own 1×1×1
            class head for auxiliary losses in training (nnU-Net's deep supervision; not in the
            abstract). Inference uses the full-resolution head only.
        local_contrast: Gaussian SD per axis (z, y, x) in voxels of a fixed
            :class:`LocalContrast3d` input layer (None: the image goes in as it is; not in the
            abstract). The VAE still reconstructs the image itself.
        local_contrast_mode: ``"add"`` (image and normalised image) or ``"replace"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        pools: Sequence[Sequence[int]] | None = None,
        vae: bool = True,
        latent: int = 0,
        contrast: bool = True,
        proj_dim: int = 32,
        contrast_level: int = 1,
        kernels: Sequence[Sequence[int]] | None = None,
        deep_supervision: int = 0,
        local_contrast: Sequence[float] | None = None,
        local_contrast_mode: str = "add",
    ) -> None:
        super().__init__()
        self.local_contrast: LocalContrast3d | None = (
            LocalContrast3d(local_contrast, local_contrast_mode) if local_contrast else None
        )
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("widths needs at least two levels")
        self.pools: list[Pool] = [
            tuple(int(v) for v in p)
            for p in (pools or default_pools(len(widths) - 1))  # type: ignore[misc]
        ]
        if len(self.pools) != len(widths) - 1:
            raise ValueError(
                f"{len(widths)} widths need {len(widths) - 1} pooling factors, got {len(self.pools)}"
            )
        self.widths = widths
        ks = [tuple(int(v) for v in k) for k in kernels] if kernels else [(3, 3, 3)] * len(widths)
        if len(ks) != len(widths):
            raise ValueError(f"{len(widths)} widths need {len(widths)} kernels, got {len(ks)}")
        cin = self.local_contrast.channels(in_channels) if self.local_contrast else in_channels
        ins = [cin, *widths[:-1]]
        self.enc = nn.ModuleList([ResUnit3d(ins[i], w, kernel=ks[i]) for i, w in enumerate(widths)])
        self.ups = nn.ModuleList(
            [nn.ConvTranspose3d(widths[i + 1], widths[i], p, stride=p) for i, p in enumerate(self.pools)]
        )
        self.dec = nn.ModuleList(
            [ResUnit3d(2 * widths[i], widths[i], kernel=ks[i]) for i in range(len(self.pools))]
        )
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        ds = int(deep_supervision)
        if not 0 <= ds < len(widths) - 1:
            raise ValueError(f"deep_supervision must be 0–{len(widths) - 2} for these widths, got {ds}")
        self.aux_heads = nn.ModuleList([nn.Conv3d(widths[i], num_classes, 1) for i in range(1, ds + 1)])
        self.vae: VAEBranch | None = None
        if vae:
            dec_widths = [max(4, w // 2) for w in reversed(widths[:-1])]
            self.vae = VAEBranch(widths[-1], latent or widths[-1], dec_widths, self.pools[::-1], in_channels)
        self.contrast_level = min(int(contrast_level), len(widths) - 2)
        self.proj: ProjectionHead | None = (
            ProjectionHead(widths[self.contrast_level], proj_dim) if contrast else None
        )

    @property
    def divisor(self) -> Pool:
        """Input sizes must be multiples of this per axis (product of the pooling factors)."""
        return tuple(math.prod(p[a] for p in self.pools) for a in range(3))  # type: ignore[return-value]

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        shape = tuple(x.shape[2:])
        target = [math.ceil(s / d) * d for s, d in zip(shape, self.divisor)]
        if list(shape) == target:
            return x, shape
        pad: list[int] = []
        for s, t in zip(reversed(shape), reversed(target)):
            pad += [0, t - s]
        return F.pad(x, pad), shape

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """The image (B, C, *S) as the encoder sees it (with the local-contrast channel if any)."""
        return self.local_contrast(x) if self.local_contrast is not None else x

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder + decoder of ``x``, the output of :meth:`network_input` (already padded).

        Returns:
            (bottleneck (B, widths[-1], *s), decoder features where entry i is level i with
            widths[i] channels; entry 0 is at full resolution).
        """
        skips: list[torch.Tensor] = []
        h = x
        for i, enc in enumerate(self.enc):
            if i > 0:
                h = F.max_pool3d(h, self.pools[i - 1], self.pools[i - 1])
            h = enc(h)
            skips.append(h)
        bottleneck = h
        dec_feats: list[torch.Tensor] = [torch.empty(0)] * len(self.pools)
        for i in reversed(range(len(self.pools))):
            h = self.dec[i](torch.cat([self.ups[i](h), skips[i]], 1))
            dec_feats[i] = h
        return bottleneck, dec_feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) → (B, K, Z, Y, X) logits (the segmenter alone)."""
        # Normalise before padding, so the zero padding does not enter the local statistics.
        xp, shape = self._pad(self.network_input(x))
        _, feats = self.features(xp)
        return self.head(feats[0])[(..., *[slice(0, s) for s in shape])]

    def forward_train(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """Everything the training losses need, at padded size (inputs should be multiples of
        :attr:`divisor`; the data pipeline guarantees it).

        Returns:
            ``logits`` (B, K, *S); with the VAE: ``recon`` (B, C, *S), ``mu``, ``logvar``;
            with the head: ``embed`` (B, proj_dim, *S / 2**contrast_level) unit vectors; with
            deep supervision: ``aux_logits_1``, ``aux_logits_2``, … (B, K, *S_level) at the
            resolution of decoder levels 1, 2, ….
        """
        bottleneck, feats = self.features(self.network_input(x))
        out = {"logits": self.head(feats[0])}
        for i, head in enumerate(self.aux_heads, start=1):
            out[f"aux_logits_{i}"] = head(feats[i])
        if self.vae is not None:
            out["recon"], out["mu"], out["logvar"] = self.vae(bottleneck, sample)
        if self.proj is not None:
            out["embed"] = self.proj(feats[self.contrast_level])
        return out
