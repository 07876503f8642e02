"""Run-time options: every network's list matches its config, and values are checked."""

from __future__ import annotations

import pytest

from napari_medseg.engine.registry import list_models, segmenter_class
from napari_medseg.engine.run_options import RunOption, apply_run_options, find_recipe


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
    hf_sam = [o.key for o in segmenter_class("hf-sam").run_options()]
    assert hf_sam == ["refine", "refine_score_margin", "tta"]


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
        ({"lr": 0.1}, "unknown run option"),
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


def test_recipes_are_checked_run_options_and_paper_is_the_defaults():
    for name in list_models():
        cls = segmenter_class(name)
        names = [r.name for r in cls.RUN_RECIPES]
        assert len(names) == len(set(names)), name
        for r in cls.RUN_RECIPES:
            assert apply_run_options(cls.run_options(), {}, r.as_dict()) == r.as_dict(), (name, r.name)
    s3 = segmenter_class("s3-net")
    paper, consensus = (find_recipe(s3.RUN_RECIPES, n) for n in ("paper", "consensus"))
    defaults = {o.key: o.default for o in s3.run_options()}
    assert paper.matches(s3.run_options(), defaults) and not consensus.matches(s3.run_options(), defaults)
    assert consensus.matches(s3.run_options(), defaults | consensus.as_dict())
    with pytest.raises(ValueError, match=r"unknown recipe 'fast'; known: \['paper', 'consensus'\]"):
        find_recipe(s3.RUN_RECIPES, "fast")


def test_load_model_recipe_sets_its_options_and_explicit_options_win(tmp_path):
    import napari_medseg as nms

    seg = nms.load_model("s3-net", device="cpu", recipe="consensus", restarts=2)
    assert (seg.config["channels"], seg.config["restarts"], seg.config["flatten"]) == (16, 2, 0.25)
    with pytest.raises(ValueError, match="s3-net: unknown recipe 'x'"):
        nms.load_model("s3-net", device="cpu", recipe="x")
    with pytest.raises(ValueError, match="efs-medseg: it has no recipes"):
        nms.load_model("efs-medseg", device="cpu", recipe="consensus")
    # From a checkpoint, options get the same checks as by name.
    path = tmp_path / "s3.safetensors"
    nms.load_model("s3-net", device="cpu", channels=8).save(path)
    again = nms.load_model(path, device="cpu", recipe="paper", restarts=3)
    assert (again.config["channels"], again.config["restarts"]) == (8, 3)
    with pytest.raises(ValueError, match=r"Runs per image \(restarts\): 0 is outside"):
        nms.load_model(path, device="cpu", restarts=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\]"):
        nms.load_model(path, device="cpu", bogus=1)
    fixed = nms.load_model(path, device="cpu", preset="uint8", class_names=["background", "clusters"])
    assert fixed.preset is not None and fixed.preset.name == "uint8" and "preset" not in fixed.config
    assert fixed.class_names == ["background", "clusters"]
