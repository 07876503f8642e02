"""EFS-MedSeg's optional local-contrast input layer: invariances, planning and round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medseg as nms
from napari_medseg.engine.registry import segmenter_class
from napari_medseg.models.efs_medseg import EfsMedSegNet, LocalContrast3d
from test_efs_medseg import phantom  # tests/ is on the path (pytest rootdir conftest)

TINY = {"widths": [4, 8, 16], "patch_voxels": 8 * 24 * 24, "device": "cpu"}


def disk_volume(shape: tuple[int, int, int] = (6, 48, 48)) -> torch.Tensor:
    """(1, 1, Z, Y, X): a bright disk (0.6) on 0.2 around (y, x) = (16, 16), smooth noise."""
    gen = torch.Generator().manual_seed(0)
    _, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    img = 0.2 + 0.4 * (((y - 16) ** 2 + (x - 16) ** 2) < 36).float()
    return (img + 0.02 * torch.rand(shape, generator=gen))[None, None]


def test_normalised_channel_ignores_gain_offset_and_distant_tissue() -> None:
    lc = LocalContrast3d([0.3, 2.0, 2.0], mode="replace", eps=1e-10)
    x = disk_volume()
    y = lc(x)
    # Contrast and brightness (what MRI scaling changes between scans) leave it unchanged.
    torch.testing.assert_close(lc(0.4 * x + 0.1), y, atol=1e-4, rtol=0)
    # Bright tissue far away (the scan's top percentile, e.g. fat) changes the global scale a
    # percentile normalisation would use, but not the disk's normalised values.
    far = x.clone()
    far[..., 40:, 40:] = 1.0
    torch.testing.assert_close(lc(far)[..., :24, :24], y[..., :24, :24], atol=1e-4, rtol=0)
    inside, outside = y[0, 0, 3, 16, 16].item(), y[0, 0, 3, 16, 30].item()
    assert abs(inside) < 0.5 and abs(outside) < 0.5  # flat regions centre on zero
    assert y[0, 0, 3, 16, 11].item() > 0.5 > -0.5 > y[0, 0, 3, 16, 22].item()  # edge: bright side > dark side
    added = LocalContrast3d([0.3, 2.0, 2.0], mode="add")(x)
    assert added.shape[1] == 2 and torch.equal(added[:, :1], x)
    with pytest.raises(ValueError, match="mode"):
        LocalContrast3d([1, 1, 1], mode="swap")


def test_network_input_channels_follow_the_mode() -> None:
    for mode, cin in (("add", 2), ("replace", 1)):
        net = EfsMedSegNet(1, 3, widths=[4, 8], local_contrast=[0.5, 2.0, 2.0], local_contrast_mode=mode)
        assert net.enc[0].body[0].in_channels == cin
        out = net.forward_train(torch.rand(1, 1, 4, 16, 16))
        assert out["recon"].shape == (1, 1, 4, 16, 16)  # the VAE still reconstructs the image
        assert net(torch.rand(1, 1, 3, 13, 11)).shape == (1, 3, 3, 13, 11)
    assert EfsMedSegNet(1, 3, widths=[4, 8]).local_contrast is None


def test_local_contrast_is_planned_in_mm_and_survives_save_load(tmp_path) -> None:
    assert segmenter_class("efs-medseg").default_config()["local_contrast"] == 0.0  # off by default
    torch.manual_seed(0)
    atlas, lab = phantom(0)
    seg = nms.load_model("efs-medseg", **TINY, local_contrast=4.0, local_contrast_mode="replace")
    for _ in seg.finetune([atlas], [lab], steps=2, spacing=(5.0, 1.0, 1.0)):
        pass
    target = seg.config["target_spacing"]
    assert seg.config["local_contrast_sigma"] == pytest.approx([4.0 / s for s in target], abs=1e-3)
    assert seg.module.local_contrast is not None and seg.module.enc[0].body[0].in_channels == 1
    loaded = nms.load_model(seg.save(tmp_path / "lc.safetensors"), device="cpu")
    assert loaded.config["local_contrast_sigma"] == seg.config["local_contrast_sigma"]
    np.testing.assert_array_equal(
        loaded.segment(atlas, spacing=(5.0, 1.0, 1.0)), seg.segment(atlas, spacing=(5.0, 1.0, 1.0))
    )
    plain = nms.load_model("efs-medseg", **TINY)
    for _ in plain.finetune([atlas], [lab], steps=1, spacing=(5.0, 1.0, 1.0)):
        pass
    assert plain.config["local_contrast_sigma"] is None and plain.module.local_contrast is None
