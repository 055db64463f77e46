"""Config: presets validate, JSON round trip is exact, overrides and mistakes give clear errors."""

import json

import pytest

from pagoda.config import PRESETS, TeacherConfig, UNetConfig, dumps, from_dict, load_json, resolve, to_dict
from pagoda.errors import UserError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = PRESETS[name].teacher
    cfg.validate()
    again = from_dict(TeacherConfig, json.loads(dumps(cfg)))
    assert again == cfg  # tuples survive the trip through JSON lists


def test_override_types_and_nesting():
    cfg = resolve("teacher", "photos", ["train.steps=7", "network.channel_mult=[1,2]", "data.source=some/dir"])
    assert cfg.train.steps == 7
    assert cfg.network.channel_mult == (1, 2)
    assert cfg.data.source == "some/dir"
    assert PRESETS["photos"].teacher.train.steps != 7  # presets are not mutated


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.stepz=1"], "stepz"),
        (["train.steps=ten"], "train.steps"),
        (["train.steps"], "key.path=value"),
        (["network.channel_mult=3"], "network.channel_mult"),
        (["network.attention_resolutions=[5]"], "attention_resolutions"),
        (["data.resolution=24"], "data.resolution"),
        (["data.resolution=32"], "differs from data.resolution"),
        (["train.batch=30", "train.micro_batch=8"], "multiple"),
        (["train.dtype=\"fp8\""], "train.dtype"),
        (["train.lr=1e400"], "train.lr=1e400 must be a finite number"),  # JSON reads 1e400 and Infinity as inf
        (["train.lr=-Infinity"], "must be a finite number, got -inf"),
        (["train.steps.x=1"], "'x' goes below a plain value (int): set the value itself, e.g. --set train.steps="),
        (["network.channel_mult.0=3"], "--set network.channel_mult=..."),
    ],
)
def test_bad_overrides_are_one_line_user_errors(overrides, needle):
    with pytest.raises(UserError) as e:
        resolve("teacher", "smoke", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_distill_overrides_are_one_line_user_errors():
    with pytest.raises(UserError) as e:
        resolve("distill", "smoke", ['loss.adv_real="photos"'])
    assert "loss.adv_real='photos' must be one of data, teacher" in str(e.value) and "\n" not in str(e.value)
    assert resolve("distill", "smoke", ['loss.adv_real="teacher"']).loss.adv_real == "teacher"


def test_unknown_preset_lists_known_ones():
    with pytest.raises(UserError, match="photos"):
        resolve("teacher", "imagenet65")


def test_config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(to_dict(PRESETS["smoke"].teacher)))
    assert resolve("teacher", "photos", config_file=str(path)) == PRESETS["smoke"].teacher
    path.write_text("{not json")
    with pytest.raises(UserError, match="cfg.json"):
        load_json("teacher", str(path))
    path.write_text(json.dumps({"netwrk": {}}))
    with pytest.raises(UserError, match="netwrk"):
        load_json("teacher", str(path))


def test_unet_fields_are_constructor_arguments():
    # UNet(**asdict(UNetConfig)) is the contract between config and network.
    from pagoda.networks.unet import UNet

    UNet(**to_dict(UNetConfig(resolution=8, channel_mult=(1, 2), attention_resolutions=(4,))))
