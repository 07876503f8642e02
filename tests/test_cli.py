"""The command line, in process (the toy network stands in for a trained model)."""

from __future__ import annotations

import numpy as np
import pytest

import napari_medseg as nms
from conftest import disc_image
from napari_medseg.cli import build_parser, main
from napari_medseg.engine.io import read_image, write_image
from napari_medseg.engine.metrics import dice


def test_help_on_every_command(capsys):
    for cmd in ([], ["models"], ["segment"], ["train"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0
    assert "segment" in capsys.readouterr().out
    assert {"models", "segment", "train", "demo"} <= set(build_parser()._subparsers._group_actions[0].choices)


def test_models_lists_networks(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), out


def test_models_name_describes_the_network_and_its_run_options(capsys):
    assert main(["models", "s3-net"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("s3-net: S³-Net")
    assert 'mode = "paper"  (choice: "paper" | "released")' in out
    assert "restarts = 1  (int: 1…10)" in out and "flatten = 0.0  (float: 0…0.5)" in out
    assert main(["models", "hf-sam"]) == 0
    assert 'refine = "boxes"  (bool: "off" | "boxes")' in capsys.readouterr().out
    assert main(["models", "no-such-net"]) != 0
    assert "known networks" in capsys.readouterr().err


def test_segment_recipe_sets_run_options_and_options_override_it(tmp_path, capsys):
    assert main(["models", "s3-net"]) == 0
    assert "consensus: channels=16, restarts=7, flatten=0.25" in capsys.readouterr().out
    image, _ = disc_image(seed=0, center=(20, 20))
    write_image(tmp_path / "img.tif", image[:40, :40])
    out = tmp_path / "clusters.tif"
    base = ["segment", "s3-net", str(tmp_path / "img.tif"), "-o", str(out), "--device", "cpu"]
    fast = ["--option", "restarts=2", "--option", "max_iter=2", "--option", "working_size=24"]
    assert main([*base, "--recipe", "consensus", *fast]) == 0
    expect = nms.load_model(
        "s3-net", device="cpu", recipe="consensus", restarts=2, max_iter=2, working_size=24
    )
    assert np.array_equal(read_image(out).data, expect.segment(image[:40, :40]))  # the recipe reached the run
    assert main([*base, "--recipe", "fastest"]) != 0
    assert "unknown recipe 'fastest'; known: ['paper', 'consensus']" in capsys.readouterr().err


def test_train_then_segment(toy_registered, tmp_path, capsys):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    for i in range(3):
        image, mask = disc_image(seed=i, center=(28 + 3 * i, 30))
        write_image(imgs / f"case{i}.tif", image)
        write_image(labs / f"case{i}.tif", mask * 255)  # 0/255 masks are read as class 1
    ckpt = tmp_path / "toy.safetensors"
    rc = main(
        [
            "train",
            "toy-test-net",
            "--images",
            str(imgs),
            "--labels",
            str(labs),
            "-o",
            str(ckpt),
            "--steps",
            "80",
            "--augment",
            "none",
            "--orientation",
            "upright",
            "--device",
            "cpu",
            "--option",
            "lr=0.02",
        ]
    )
    assert rc == 0 and ckpt.is_file()
    assert "best validation Dice" in capsys.readouterr().out
    provenance = nms.load_model(ckpt).provenance
    assert provenance["options"]["orientation"] == provenance["data"]["orientation"] == "upright"
    out = tmp_path / "pred.nii.gz"
    assert main(["segment", str(ckpt), str(imgs / "case1.tif"), "-o", str(out), "--device", "cpu"]) == 0
    pred = read_image(out).data
    truth = read_image(labs / "case1.tif").data > 0
    assert pred.shape == truth.shape and dice(pred == 1, truth) > 0.9


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["segment", "hf-sam", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such file") and err.count("\n") == 1
    assert main(["segment", "nope-net", str(tmp_path / "x.png"), "-o", "o.png"]) == 2


def test_train_needs_matching_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_image(tmp_path / "a" / "x.png", np.zeros((16, 16), np.uint8))
    write_image(tmp_path / "b" / "y.png", np.zeros((16, 16), np.uint8))
    write_image(tmp_path / "a" / "z.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(SystemExit, match="same name"):
        main(
            [
                "train",
                "sts-net",
                "--images",
                str(tmp_path / "a"),
                "--labels",
                str(tmp_path / "b"),
                "-o",
                "x.safetensors",
            ]
        )
