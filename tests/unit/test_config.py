from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.common.config import ConfigError, flatten, parse_overrides
from pipelines.training.config import TrainConfig, load_train_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_defaults_are_the_embedded_demo():
    cfg = TrainConfig()
    assert cfg.data.train_manifest is None and cfg.data.synthetic is not None
    assert cfg.tracking.tracking_uri.startswith("sqlite:///")
    assert cfg.per_worker_batch == cfg.optim.batch_size // cfg.scaling.num_workers


def test_demo_yaml_is_the_embedded_demo_and_sections_start_from_paper_defaults():
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    assert load_train_config(demo) == TrainConfig()
    cfg = load_train_config(None, ["model.num_classes=4"])  # the demo's options stay
    assert cfg.model.options == {"width_mult": 0.5, "separable": True}
    # ... and are checked against the backbone when loaded, not in a train worker
    with pytest.raises(ConfigError, match="unknown option.s. width_mult for deeplabv3plus with resnet18"):
        load_train_config(None, ["model.backbone=resnet18"])
    assert load_train_config(None, ["model.backbone=resnet18", "model.options={}"]).model.options == {}
    # A whole `model:`/`optim:` section (as in a preset) does not inherit the demo's choices.
    cfg = TrainConfig.model_validate({"model": {"backbone": "resnet18"}, "optim": {"max_iters": 5}})
    assert cfg.model.options == {} and cfg.optim.name == "sgd"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_presets_validate_and_build_valid_model_arguments(path):
    from deeplab_core import build_model

    cfg = load_train_config(path)
    kwargs = cfg.model.build_kwargs()
    kwargs["pretrained"] = None  # no downloads here; the architecture must build as configured
    model = build_model(**kwargs)
    assert model.config["num_classes"] == cfg.model.num_classes
    if path.name != "demo.yaml":
        assert cfg.data.crop_size in (321, 513, 769)
        assert cfg.data.train_manifest and cfg.data.val_manifest


def test_overrides_are_yaml_typed_and_nested():
    assert parse_overrides(["optim.base_lr=0.01", "model.options={width_mult: 0.25}", "run.name=x"]) == {
        "optim": {"base_lr": 0.01}, "model": {"options": {"width_mult": 0.25}}, "run": {"name": "x"}}
    cfg = load_train_config(None, ["optim.max_iters=7", "scaling.num_workers=1"])
    assert cfg.optim.max_iters == 7 and cfg.scaling.num_workers == 1


@pytest.mark.parametrize("overrides, message", [
    (["optim.base_lrr=0.1"], "base_lrr"),
    (["optim.batch_size=7"], "divisible"),
    (["data.scale_min=2.0"], "scale_min"),
    (["data.train_manifest=a.parquet"], "both"),
    (["optim"], "section.key=value"),
])
def test_bad_configs_fail_with_clear_messages(overrides, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        load_train_config(None, overrides)


def test_a_misspelled_key_gets_one_line_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        load_train_config(None, ["optim.base_lrr=0.1"])
    assert str(info.value) == "unknown key optim.base_lrr; did you mean optim.base_lr?"


@pytest.mark.parametrize("override, line", [
    ("optim.lr=0.01", "unknown key optim.lr; did you mean optim.base_lr?"),  # a sibling, not the section
    ("optimm.max_iters=5", "unknown key optimm; did you mean optim?"),
    ("model.arch=deeplabv4", "model: unknown arch 'deeplabv4'; choose from: deeplabv1, deeplabv2, deeplabv3, "
                             "deeplabv3plus"),
    ("model.options={aspp_rates: [6, 12, 18], dropuot: 0.1}", "model: unknown option(s) dropuot for deeplabv3plus"),
])
def test_mistakes_a_newcomer_makes_are_one_line_before_anything_starts(override, line):
    with pytest.raises(ConfigError) as info:
        load_train_config(None, [override])
    assert str(info.value).startswith(line)


def test_a_missing_required_field_names_its_flag():
    from pipelines.segmentation.config import SegmentConfig
    from pipelines.common.config import load_config

    with pytest.raises(ConfigError, match=r"^model is required \(--model or model=\.\.\.\)$"):
        load_config(SegmentConfig, None, [], {"input": "in", "output": "out"})


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_a_missing_preset_names_the_presets_there_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the repository's presets are listed
    with pytest.raises(ConfigError) as err:
        load_train_config("configs/voc_deeplabv3_r50.yaml", [])
    message = str(err.value)
    assert "did you mean configs/voc_deeplabv3_r101.yaml?" in message
    assert "presets: " in message and "demo.yaml" in message
    with pytest.raises(ConfigError) as err:  # any other missing file: just the error
        load_train_config(str(tmp_path / "mine.yaml"), [])
    assert "presets" not in str(err.value)
