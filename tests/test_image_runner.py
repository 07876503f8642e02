"""Input checking and the slice/tile runner: shapes, dtypes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.engine.image import ImageError, prepare_image
from napari_medseg.engine.runner import drain, sliding_window


@pytest.fixture
def toy(toy_registered):
    seg = toy_registered(device="cpu")
    seg.trained = True
    return seg


@pytest.mark.parametrize(
    "shape,kw,spatial",
    [
        ((40, 50), {}, (40, 50)),
        ((40, 50, 3), {"channel_axis": -1}, (40, 50)),
        ((3, 40, 50), {"channel_axis": 0}, (40, 50)),
        ((40, 50, 3), {}, (40, 50)),  # RGB recognised without channel_axis
        ((5, 40, 50), {}, (5, 40, 50)),
        ((1, 5, 40, 50), {}, (5, 40, 50)),  # singleton leading axis dropped
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.float32, np.float64])
def test_segment_shapes_and_dtypes(toy, shape, kw, spatial, dtype):
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * 200).astype(dtype)
    out = toy.segment(image, **kw)
    assert out.shape == spatial and out.dtype == np.int32


def test_tiling_large_image(toy):
    toy.config["working_size"] = 100  # > input_size 32: tiles with overlap
    image = np.random.default_rng(0).random((90, 120)).astype(np.float32)
    out = toy.segment(image)
    assert out.shape == (90, 120)


def test_sliding_window_reassembles_identity():
    x = torch.rand(2, 70, 45)
    out = drain(sliding_window(x, lambda t: t * 2, (32, 32), overlap=0.3, batch_size=3))
    torch.testing.assert_close(out, x * 2)
    vol = torch.rand(1, 9, 20, 21)
    out3 = drain(sliding_window(vol, lambda t: t + 1, (4, 8, 8), overlap=0.5))
    torch.testing.assert_close(out3, vol + 1)


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((2, 3, 4, 5, 6)), "choose one time point"),
        (np.full((32, 32), 7.0), "constant"),
        (np.full((32, 32), np.nan), "no finite"),
        (np.random.rand(32, 1), "too small"),
        (np.zeros((0, 5)), "empty"),
        (np.array([["a", "b"]]), "numeric"),
        (np.random.rand(8, 8, 8, 2), "channels"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(ImageError, match=match):
        prepare_image(image, channel_axis=-1 if image.ndim == 4 and image.shape[-1] == 2 else None)


def test_nan_partially_is_background():
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    img[:4] = np.nan
    prep = prepare_image(img)
    assert np.isfinite(prep.data).all() and prep.data[0, 0, :4].max() == 0


def test_failed_run_does_not_touch_input(toy):
    image = np.full((32, 32), 3, np.int16)
    before = image.copy()
    with pytest.raises(ImageError):
        toy.segment(image)
    np.testing.assert_array_equal(image, before)


def test_out_of_memory_retries_with_smaller_batches(toy):
    from napari_medseg.engine.device import OutOfMemory

    calls = []
    real = toy.logits

    def flaky(x):
        calls.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    toy.logits = flaky
    vol = np.random.default_rng(0).random((5, 32, 32)).astype(np.float32)
    out = toy.segment(vol)
    assert out.shape == (5, 32, 32) and calls[0] == 4 and set(calls[-5:]) == {1}

    def always(x):
        raise RuntimeError("CUDA out of memory")

    toy.logits = always
    with pytest.raises(OutOfMemory, match="one slice at a time"):
        toy.segment(vol)


def test_training_out_of_memory_suggests_smaller_batch(toy_registered, monkeypatch):
    from conftest import disc_image
    from napari_medseg.engine.device import OutOfMemory

    seg = toy_registered(device="cpu")

    def oom(module, batch):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(seg, "training_loss", oom)
    image, mask = disc_image()
    with pytest.raises(OutOfMemory, match="try batch size 2"):
        next(iter(seg.finetune(image, mask, steps=3, batch_size=4)))
