"""Intensity augmentation of 3-D training patches (C, Z, Y, X) in [0, 1].

The two intensity views of every patch (:func:`intensity_view`, optionally after an in-plane
blur or a lower resolution, a random shallow network, a random monotone curve, a gain or a
smooth bias field), and the
label-guided per-structure gain (:func:`class_gain`).
Used by the patch sampler in volume_data.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_medseg.engine.train.spatial_aug import interpolate_lattice


def random_curve(image: np.ndarray, rng: np.random.Generator, knots: int = 3) -> np.ndarray:
    """A random monotone piecewise-linear intensity map of [0, 1] onto itself.

    Unlike a gamma curve it can darken one tissue relative to its neighbours (a blood pool
    darker than the myocardium, as in some scans the atlases do not cover) while keeping the
    order of intensities.
    """
    xs = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, knots)), [1.0]])
    ys = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, knots)), [1.0]])
    return np.interp(np.clip(image, 0, 1), xs, ys).astype(np.float32)


def random_network(
    image: np.ndarray, rng: np.random.Generator, width: int = 2, layers: int = 3
) -> np.ndarray:
    """Pass a (C, Z, Y, X) image in [0, 1] through a random shallow network, mixed with itself.

    Global intensity non-linear augmentation (GIN, Ouyang et al., "Causality-inspired
    single-source domain generalization for medical image segmentation", IEEE TMI 2022):
    ``layers`` in-plane convolutions (kernel 1 × k × k, k drawn from {1, 3} per layer, weights
    N(0, 1), ``width`` channels) with leaky ReLU between them; the output is rescaled to
    [0, 1] and mixed with the input by a uniform weight. Unlike a curve it can reorder
    intensities (a blood pool darker than the myocardium) and change local texture, while
    every edge stays where it was, so the labels still fit.

    Returns:
        (C, Z, Y, X) float32 in [0, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    channels = [x.shape[1]] + [width] * (layers - 1) + [x.shape[1]]
    for i in range(layers):
        k = int(rng.choice([1, 3]))
        w = torch.from_numpy(rng.normal(0.0, 1.0, (channels[i + 1], channels[i], 1, k, k)).astype(np.float32))
        # Edge padding: zero padding would draw a false edge along the patch border.
        x = F.conv3d(F.pad(x, (k // 2, k // 2, k // 2, k // 2, 0, 0), mode="replicate"), w)
        if i < layers - 1:
            x = F.leaky_relu(x, 0.2)
    out = x[0].numpy()
    lo, hi = float(out.min()), float(out.max())
    out = (out - lo) / max(hi - lo, 1e-6)
    alpha = np.float32(rng.uniform(0.0, 1.0))
    return (alpha * out + (1 - alpha) * image).astype(np.float32)


GAIN_MIN = 0.4  # darkest gain of the gain augmentation (see intensity_view)
BIAS_LOG_SD = 0.3  # SD of the log bias field at its control points (see bias_field)


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, log_sd: float = BIAS_LOG_SD) -> np.ndarray:
    """A smooth random multiplicative field for a (Z, Y, X) patch, around 1.

    MRI receive coils leave a slowly varying gain over the image (bright near a surface coil,
    darker deeper in the body); the 0.5-99.5 percentile scaling does not remove it. The log
    field is Gaussian on a 3 × 3 lattice in plane (2 nodes through the slices), interpolated
    linearly over the patch, so it changes brightness over the heart's scale, not within a
    structure's edge.

    Returns:
        (Z, Y, X) float32 gains, exp of the interpolated log field.
    """
    return np.exp(interpolate_lattice(rng.normal(0.0, log_sd, size=(1, 2, 3, 3)), shape)[0])


# Intensity-view strength per augment preset; "paper" (HF-SAM's 2-D views) has no 3-D meaning.
VIEW_STRENGTH = {"none": 0.0, "light": 0.5, "default": 1.0, "strong": 1.5}
CLASS_GAIN_RANGE = (0.35, 1.25)  # per-structure gain range of class_gain (log-uniform)


def class_gain(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiply each labeled structure of a (C, Z, Y, X) patch by its own random gain.

    Label-guided contrast augmentation in the spirit of SynthSeg (Billot et al., 2023), milder
    than it: the background keeps gain 1, every foreground class gets a log-uniform gain in
    :data:`CLASS_GAIN_RANGE`, and the gain map is blurred over about one voxel in plane so
    borders stay soft. It shows the network hearts whose blood pool is as dark as the
    myocardium (ACDC patient 039), which no global intensity change produces. Measured: it
    lowered held-out ACDC Dice from 0.600 to 0.384 (the network learns that brightness says
    little, and two atlases do not teach shape well enough), so it is off by default.

    Args:
        image: (C, Z, Y, X) float32 in [0, 1].
        label: (Z, Y, X) integer class ids aligned with ``image``.
        rng: Random generator.

    Returns:
        (C, Z, Y, X) float32 in [0, 1].
    """
    from scipy.ndimage import gaussian_filter

    classes = int(label.max()) + 1
    lo, hi = np.log(CLASS_GAIN_RANGE[0]), np.log(CLASS_GAIN_RANGE[1])
    gains = np.concatenate([[1.0], np.exp(rng.uniform(lo, hi, classes - 1))]).astype(np.float32)
    field = gaussian_filter(gains[label], sigma=(0.0, 1.0, 1.0), mode="nearest")
    return np.clip(image * field[None], 0, 1).astype(np.float32)


def blur_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's Gaussian blur or simulated low resolution, in plane, on (C, Z, Y, X).

    Half the time a Gaussian blur of SD U(0.5, 1.5) voxels along y and x; otherwise the slices
    are sampled down by U(0.5, 1) (nearest) and back up (cubic). Blurry or coarse scans
    (patient 039's cine MRI, whose hearts no atlas sharpness prepared for) then look like
    training data. Only in plane: thick slices are already coarse along z.
    """
    from scipy.ndimage import gaussian_filter, zoom

    if rng.random() < 0.5:
        s = float(rng.uniform(0.5, 1.5))
        return gaussian_filter(image, sigma=(0, 0, s, s)).astype(np.float32)
    f = float(rng.uniform(0.5, 1.0))
    small = zoom(image, (1, 1, f, f), order=0)
    h, w = image.shape[2:]
    back = zoom(small, (1, 1, h / small.shape[2], w / small.shape[3]), order=3)
    return np.clip(back[:, :, :h, :w], 0, 1).astype(np.float32)


def intensity_view(
    image: np.ndarray,
    rng: np.random.Generator,
    strength: float,
    curve_prob: float = 0.0,
    gain_prob: float = 0.0,
    bias_prob: float = 0.0,
    network_prob: float = 0.0,
    blur_prob: float = 0.0,
) -> np.ndarray:
    """Random gamma, contrast, brightness and noise on a (C, Z, Y, X) image in [0, 1].

    With probability ``blur_prob`` a :func:`blur_view` comes first; with probability
    ``network_prob`` a :func:`random_network` next; with probability
    ``curve_prob`` a :func:`random_curve` next, then with probability
    ``gain_prob`` the view is multiplied by a log-uniform gain in [``GAIN_MIN``, 1]: the
    0.5-99.5 percentile scaling of MRI anchors its top on the brightest tissue, and a scan
    with much bright fat puts the blood pool at 0.3 instead of 0.7-0.85 (the upper
    percentile / blood-pool ratio ranges 1.1-3.1 over the ACDC volumes). With probability
    ``bias_prob`` a smooth :func:`bias_field` multiplies it next. No draw happens for an
    option at 0, so runs without it are unchanged.
    """
    if strength <= 0:
        return image
    if blur_prob > 0 and rng.random() < blur_prob:
        image = blur_view(image, rng)
    if network_prob > 0 and rng.random() < network_prob:
        image = random_network(image, rng)
    if curve_prob > 0 and rng.random() < curve_prob:
        image = random_curve(image, rng)
    if gain_prob > 0 and rng.random() < gain_prob:
        image = image * np.float32(np.exp(rng.uniform(np.log(GAIN_MIN), 0.0)))
    if bias_prob > 0 and rng.random() < bias_prob:
        image = image * bias_field(image.shape[1:], rng)[None]
    x = np.clip(image, 0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4) * strength))
    x = x * rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength) + rng.uniform(-0.1, 0.1) * strength
    x = x + rng.normal(0, 0.03 * strength * rng.random(), x.shape)
    return np.clip(x, 0, 1).astype(np.float32)
