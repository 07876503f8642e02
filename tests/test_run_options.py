"""Run-time options: every network's list matches its config, and values are checked."""

from __future__ import annotations

import pytest

from napari_medseg.engine.registry import list_models, segmenter_class
from napari_medseg.engine.run_options import RunOption, apply_run_options


@pytest.mark.parametrize("name", list_models())
def test_each_option_is_a_config_key_with_the_same_default(name):
    cls = segmenter_class(name)
    config = cls.default_config()
    for opt in cls.run_options():
        assert opt.key in config, f"{name}: {opt.key} is not a config key"
        assert opt.check(opt.default) == config[opt.key], f"{name}: {opt.key} default drifted"
        assert opt.help, f"{name}: {opt.key} has no help text"
        if opt.kind == "choice":
            assert len(opt.labels()) == len(opt.choices)


def test_networks_offer_their_inference_options():
    assert {o.key for o in segmenter_class("s3-net").run_options()} >= {"mode", "restarts", "flatten"}
    assert {o.key for o in segmenter_class("efs-medseg").run_options()} == {"tta", "keep_largest"}
    assert [o.key for o in segmenter_class("hf-sam").run_options()] == ["refine"]


def test_apply_checks_types_ranges_and_keys_and_leaves_the_input_alone():
    options = segmenter_class("s3-net").run_options() + segmenter_class("efs-medseg").run_options()
    config = {"restarts": 1, "mode": "paper", "keep_largest": "auto"}
    out = apply_run_options(options, config, {"restarts": "3", "mode": "released", "keep_largest": True})
    assert out == {"restarts": 3, "mode": "released", "keep_largest": True}
    assert config == {"restarts": 1, "mode": "paper", "keep_largest": "auto"}  # not changed
    for bad, message in (
        ({"restarts": 0}, "outside 1…10"),
        ({"restarts": 2.5}, "whole number"),
        ({"restarts": "many"}, "expected a number"),
        ({"mode": "fast"}, "expected one of"),
        ({"keep_largest": 1}, "expected one of"),  # 1 is not the choice True
        ({"channels": 8}, "unknown run option"),
    ):
        with pytest.raises(ValueError, match=message):
            apply_run_options(options, config, bad)


def test_bool_option_writes_its_own_values():
    opt = RunOption("refine", "Refine", "bool", "boxes", "help", values=("off", "boxes"))
    assert (opt.check(False), opt.check(True), opt.check("off")) == ("off", "boxes", "off")
    assert opt.shown({"refine": "off"}) is False and opt.shown({}) is True
    with pytest.raises(ValueError, match="expected one of"):
        opt.check("yes")


def test_load_model_checks_run_options_like_the_widget():
    import napari_medseg as nms

    seg = nms.load_model("s3-net", device="cpu", restarts="3", max_iter=7)
    assert seg.config["restarts"] == 3 and isinstance(seg.config["restarts"], int)
    with pytest.raises(ValueError, match=r"s3-net: Runs per image \(restarts\): 0 is outside 1…10"):
        nms.load_model("s3-net", device="cpu", restarts=0)
    with pytest.raises(ValueError, match="expected one of"):
        nms.load_model("s3-net", device="cpu", mode="fast")
