"""Checkpoints: bitwise round trips, one-line errors for every bad file, atomic writes."""

import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch

from pagoda import checkpoint
from pagoda.checkpoint import (
    build_network,
    load_model,
    load_network,
    load_training_state,
    model_meta,
    read_meta,
    save_model,
    save_training_state,
)
from pagoda.config import PRESETS, UNetConfig, to_dict
from pagoda.errors import UserError
from pagoda.networks.unet import UNet

NET = UNetConfig(resolution=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(4,),
                 num_head_channels=32, num_classes=3)
CFG = dataclasses.replace(PRESETS["smoke"].teacher, network=NET)


def _net(seed=0):
    torch.manual_seed(seed)
    net = UNet(**dataclasses.asdict(NET))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # the zero-initialised output conv would hide a bad load
    return net


@pytest.fixture
def saved(tmp_path):
    net = _net()
    meta = model_meta(kind="teacher", stage="teacher", config=CFG, step=7, ema_rate=0.99)
    path = tmp_path / "teacher.safetensors"
    save_model(path, net.state_dict(), meta)
    return path, net, meta


def _one_line(e, *needles):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def test_round_trip_is_bitwise(saved):
    path, net, meta = saved
    state, loaded = load_model(path, kind="teacher", resolution=8)
    assert loaded == meta and set(state) == set(net.state_dict())
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in net.state_dict().items())


def test_meta_rebuilds_the_network(saved):
    path, net, meta = saved
    assert meta["kind"] == "teacher" and meta["resolution"] == 8 and meta["num_classes"] == 3
    assert meta["network"] == to_dict(NET) and meta["config"] == to_dict(CFG) and meta["step"] == 7
    assert meta["diffusion"] == to_dict(CFG.diffusion) and meta["sample"] == to_dict(CFG.sample)
    assert {"git_commit", "pagoda_version", "torch_version", "time"} <= set(meta)
    json.dumps(meta)  # plain JSON
    loaded, _ = load_network(path, kind="teacher")
    assert not loaded.training and all(not t.is_meta for t in loaded.state_dict().values())
    x, c_noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0.3, -1.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, c_noise, y), net.eval()(x, c_noise, y))


def test_model_meta_takes_a_dict_config_and_extra():
    meta = model_meta(kind="teacher", stage="teacher", config=to_dict(CFG), step=1, ema_rate=0.5, extra={"x": (1, 2)})
    assert meta["config"] == to_dict(CFG) and meta["x"] == [1, 2] and meta["resolution"] == 8


def test_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 6)
    state = {"a": base, "b": base, "t": base.t(), "s": base[:, 1]}
    save_model(tmp_path / "m.safetensors", state, {"kind": "test"})
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "nope.safetensors")
    _one_line(e, "nope.safetensors", "does not exist")


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_file(saved, tmp_path, keep):
    path = saved[0]
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(UserError) as e:
        load_model(bad)
    _one_line(e, bad, "truncated")


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError) as e:
        load_model(path)
    _one_line(e, path, "not a pagoda checkpoint", "import-edm")


def test_wrong_kind_and_resolution(saved):
    path = saved[0]
    with pytest.raises(UserError) as e:
        load_model(path, kind="generator")
    _one_line(e, path, "'teacher'", "'generator'")
    with pytest.raises(UserError) as e:
        load_network(path, resolution=16)
    _one_line(e, path, "resolution 8", "16")


def test_bad_network_meta(tmp_path):
    with pytest.raises(UserError) as e:
        build_network({"network": {**to_dict(NET), "channels": 3}}, where="ckpt.safetensors")
    _one_line(e, "ckpt.safetensors", "channels")
    # weights that do not fit the architecture in the meta
    meta = model_meta(kind="teacher", stage="teacher", config=CFG, step=0, ema_rate=0.0)
    state = _net().state_dict()
    state.pop("out.2.bias")
    save_model(tmp_path / "m.safetensors", state, meta)
    with pytest.raises(UserError) as e:
        load_network(tmp_path / "m.safetensors")
    _one_line(e, "m.safetensors", "do not match")


def test_failed_write_keeps_the_old_file(saved, monkeypatch):
    path, net, meta = saved
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        save_model(path, _net(1).state_dict(), {**meta, "step": 8})
    with pytest.raises(OSError):
        save_training_state(path.with_name("state.pt"), {"step": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before and read_meta(path)["step"] == 7
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temp files left, no state.pt


def test_training_state_round_trip(tmp_path):
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    net(torch.randn(2, 3, 8, 8), torch.zeros(2)).square().mean().backward()
    opt.step()
    state = {"step": 3, "net": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    save_training_state(tmp_path / "state.pt", state)
    back = load_training_state(tmp_path / "state.pt")
    assert back["step"] == 3 and torch.equal(back["rng"], state["rng"])
    assert all(torch.equal(back["net"][k], v) for k, v in state["net"].items())
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    exp = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert all(torch.equal(a["exp_avg"], b) for a, b in zip(back["optimizer"]["state"].values(), exp))


def test_training_state_refuses_objects(tmp_path):
    with pytest.raises(TypeError, match="slice"):
        save_training_state(tmp_path / "state.pt", {"step": 0, "bad": slice(1)})
    assert not (tmp_path / "state.pt").exists()


@pytest.mark.parametrize("content", [b"", b"garbage", "truncated", "no_step"])
def test_bad_training_state(tmp_path, content):
    path = tmp_path / "state.pt"
    if content == "truncated":
        save_training_state(path, {"step": 1, "w": torch.randn(1000)})
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "no_step":
        torch.save({"w": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        load_training_state(path)
    _one_line(e, path, "delete")


def test_training_state_does_not_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    path = tmp_path / "state.pt"
    torch.save({"step": 1, "x": Evil()}, path)
    with pytest.raises(UserError):
        load_training_state(path)
    assert not (tmp_path / "pwned").exists()


def test_version_matches_the_package_metadata():
    import re
    from pathlib import Path

    from pagoda.version import __version__, git_commit
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == __version__
    assert git_commit() == git_commit() and git_commit()  # cached, never empty ("unknown" outside git)


def test_a_flipped_byte_in_tensor_data_is_refused(saved, tmp_path):
    path = saved[0]
    data = bytearray(path.read_bytes())
    bad = tmp_path / "flipped.safetensors"
    data[-5] ^= 0x10  # inside the last tensor's bytes: the header still parses, the values are wrong
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        load_model(bad)
    _one_line(e, bad, "damaged", "checksum")
    load_model(path)  # the intact file loads


def test_tensors_sha256_covers_names_dtypes_shapes_and_values():
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor(3.0, dtype=torch.bfloat16)}
    h = checkpoint.tensors_sha256(base)
    assert h == checkpoint.tensors_sha256(dict(reversed(list(base.items()))))  # name order, not insertion order
    for other in ({**base, "a": base["a"].reshape(3, 2)}, {**base, "a": base["a"].double()},
                  {"c": base["a"], "b": base["b"]}, {**base, "b": torch.tensor(3.5, dtype=torch.bfloat16)}):
        assert checkpoint.tensors_sha256(other) != h


def test_model_files_get_the_umask_mode_not_0600(saved):
    old = os.umask(0o022)
    try:
        path = saved[0]
        save_model(path, _net().state_dict(), saved[2])
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_an_edited_network_config_is_refused(saved, tmp_path):
    # One changed digit in the meta (model_channels 32 -> 12 would make the UNet's own ValueError): the checksum
    # covers the meta; without the checksum key, the UNet's refusal is still one line.
    path = saved[0]
    data = path.read_bytes()
    needle = b'\\"model_channels\\": '
    at = data.index(needle) + len(needle)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(data[:at] + (b"7" if data[at:at + 1] != b"7" else b"5") + data[at + 1:])
    with pytest.raises(UserError) as e:
        load_model(edited)
    _one_line(e, edited, "damaged")
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["pagoda"])
    meta["network"]["model_channels"] = 12  # GroupNorm(32) cannot split 12 channels
    with pytest.raises(UserError) as e:
        checkpoint.build_network(meta, where=f"checkpoint {edited}")
    _one_line(e, edited, "cannot be built")
