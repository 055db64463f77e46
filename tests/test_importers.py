"""Importer of the public EDM ImageNet-64 teacher: published keys/shapes, qkv layout, noise input, bad files."""

import dataclasses
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from pagoda import importers
from pagoda.checkpoint import load_network
from pagoda.config import PRESETS, UNetConfig
from pagoda.errors import UserError, run_cli
from pagoda.importers import (
    EDM_IMAGENET64,
    convert_edm_imagenet64,
    import_edm_imagenet64,
    load_state_dict_safely,
    published_edm_imagenet64_shapes,
)
from pagoda.networks.unet import UNet, count_parameters

# Facts of consistency-models `cm/unet.py` (commit e32b69e) with the ImageNet-64 EDM flags: 541 tensors,
# 295,899,267 parameters, and these shapes (qkv / proj_out are 1x1 Conv2d there).
PUBLISHED_KEYS, PUBLISHED_PARAMS = 541, 295_899_267
PUBLISHED_SPOT_SHAPES = {
    "time_embed.0.weight": (768, 192),
    "label_emb.weight": (1000, 768),
    "input_blocks.0.0.weight": (192, 3, 3, 3),
    "input_blocks.4.0.emb_layers.1.weight": (384, 768),  # the first down ResBlock, scale-shift
    "input_blocks.5.1.qkv.weight": (1152, 384, 1, 1),  # first attention, at 32x32
    "middle_block.1.qkv.weight": (2304, 768, 1, 1),
    "middle_block.1.proj_out.weight": (768, 768, 1, 1),
    "output_blocks.3.0.in_layers.2.weight": (768, 1344, 3, 3),
    "output_blocks.3.2.out_layers.3.weight": (768, 768, 3, 3),  # the first up ResBlock
    "output_blocks.15.0.skip_connection.weight": (192, 384, 1, 1),
    "out.2.weight": (3, 192, 3, 3),
}

# A small stand-in for the released architecture, for tests that run the whole pipeline on a file.
SMALL = UNetConfig(resolution=16, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(16, 8), num_head_channels=32, num_classes=10)


def _synthetic(shapes: dict, seed: int = 0, randomize=lambda k: True) -> dict:
    """A fake release: the published keys and shapes, fp16, random where asked, zeros elsewhere."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * 0.1).half() if randomize(k) else torch.zeros(s, dtype=torch.float16)
            for k, s in shapes.items()}


def _published_attention(sd: dict, prefix: str, x: torch.Tensor, head_channels: int = 64, legacy=False):
    """The released AttentionBlock, written from its description: GN32 -> 1x1 qkv -> "b (three h d) s" split
    (legacy=True: ADM's "b (h three d) s") -> softmax(q.k / sqrt(d)) -> 1x1 proj_out -> residual."""
    w = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
    b, C, H, W = x.shape
    h = F.group_norm(x, 32, w["norm.weight"], w["norm.bias"], eps=1e-5)
    qkv = F.conv2d(h, w["qkv.weight"], w["qkv.bias"]).reshape(b, 3 * C, H * W)
    heads = C // head_channels
    if legacy:
        q, k, v = qkv.reshape(b, heads, 3, head_channels, H * W).unbind(2)
    else:
        q, k, v = qkv.reshape(b, 3, heads, head_channels, H * W).unbind(1)
    weight = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(head_channels), dim=-1)
    a = torch.einsum("bhts,bhcs->bhct", weight, v).reshape(b, C, H, W)
    return x + F.conv2d(a, w["proj_out.weight"], w["proj_out.bias"])


def _published_embedding(sd: dict, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The released embedding: ADM sinusoids of 1000 ln(sigma) / 4 (cos first), Linear-SiLU-Linear, + label row."""
    w = {k: v.float() for k, v in sd.items()}
    t = 1000 * 0.25 * torch.log(sigma)
    half = w["time_embed.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    s = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    e = F.linear(F.silu(F.linear(s, w["time_embed.0.weight"], w["time_embed.0.bias"])),
                 w["time_embed.2.weight"], w["time_embed.2.bias"])
    return e + w["label_emb.weight"][y]


def _load(cfg: UNetConfig, state_dict: dict) -> UNet:
    with torch.device("meta"):
        net = UNet(**dataclasses.asdict(cfg))
    net.load_state_dict(state_dict, strict=True, assign=True)
    return net.eval()


def test_published_shapes_are_the_released_ones():
    shapes = published_edm_imagenet64_shapes()
    assert len(shapes) == PUBLISHED_KEYS
    assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED_PARAMS
    for k, s in PUBLISHED_SPOT_SHAPES.items():
        assert shapes[k] == s, k


def test_importer_config_is_the_imagenet64_preset():
    assert EDM_IMAGENET64 == PRESETS["imagenet64"].teacher.network


@pytest.fixture(scope="module")
def released():
    # Full size, fp16; random values only where the references below look (the rest zeros, to stay fast).
    wanted = ("time_embed.", "label_emb.", "middle_block.1.", "input_blocks.5.1.")
    sd = _synthetic(published_edm_imagenet64_shapes(), randomize=lambda k: k.startswith(wanted))
    ours = convert_edm_imagenet64(sd)
    return sd, ours, _load(EDM_IMAGENET64, ours)


def test_conversion_loads_strictly_as_float32_with_a_zero_null_row(released):
    sd, ours, net = released
    assert set(ours) == set(sd) and all(v.dtype == torch.float32 for v in ours.values())
    assert torch.equal(ours["label_emb.weight"][:1000], sd["label_emb.weight"].float())
    assert torch.equal(ours["label_emb.weight"][1000], torch.zeros(768))
    assert net.label_emb.num_embeddings == 1001


@pytest.mark.parametrize("prefix,channels,size", [("middle_block.1.", 768, 8), ("input_blocks.5.1.", 384, 32)])
def test_attention_uses_the_released_qkv_layout(released, prefix, channels, size):
    sd, _, net = released
    block = net.get_submodule(prefix.rstrip("."))
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, _published_attention(sd, prefix, x), rtol=1e-4, atol=1e-4)
    # The check can tell the layouts apart: ADM's legacy (heads x qkv) order gives another answer.
    assert not torch.allclose(out, _published_attention(sd, prefix, x, legacy=True), rtol=1e-3, atol=1e-3)


def test_noise_input_is_1000_ln_sigma_over_4(released):
    sd, _, net = released
    sigma, y = torch.tensor([0.002, 0.5, 80.0]), torch.tensor([0, 999, 421])
    with torch.no_grad():
        emb = net.embed(torch.log(sigma) / 4, y, None, 3)  # EDM c_noise = ln(sigma) / 4
        null = net.embed(torch.log(sigma) / 4, None, None, 3)
    ref = _published_embedding(sd, sigma, y)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(null, ref - sd["label_emb.weight"].float()[y], rtol=1e-4, atol=1e-4)


def test_float32_release_converts_too(monkeypatch):
    monkeypatch.setattr(importers, "EDM_IMAGENET64", SMALL)
    sd = {k: v.float() for k, v in _synthetic(published_edm_imagenet64_shapes()).items()}
    ours = convert_edm_imagenet64(sd)
    assert all(torch.equal(ours[k], v) for k, v in sd.items() if k != "label_emb.weight")


@pytest.mark.parametrize("damage,match", [
    (lambda sd: sd.pop("middle_block.1.qkv.bias"), "lacks key 'middle_block.1.qkv.bias'"),
    (lambda sd: sd.__setitem__("module.extra", torch.zeros(1)), "unexpected key 'module.extra'"),
    (lambda sd: sd.__setitem__("out.2.weight", torch.zeros(6, 192, 3, 3)), "'out.2.weight' has shape"),
    (lambda sd: sd.__setitem__("label_emb.weight", torch.zeros(1001, 768)), "'label_emb.weight' has shape"),
    (lambda sd: sd.__setitem__("out.2.bias", [0.0, 0.0, 0.0]), "not a float tensor"),
])
def test_wrong_state_dict_is_a_user_error(released, damage, match):
    sd = dict(released[0])
    damage(sd)
    with pytest.raises(UserError, match=match) as e:
        convert_edm_imagenet64(sd)
    assert "not the EDM ImageNet-64 checkpoint" in str(e.value) and "\n" not in str(e.value)


class _Evil:
    # Unpickling this would create a directory: the proof that code from the file ran.
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("write", [
    lambda path, marker: torch.save({"out.2.weight": _Evil(marker)}, path),
    lambda path, marker: path.write_bytes(pickle.dumps(_Evil(marker))),
])
def test_malicious_pickle_is_refused_without_running(tmp_path, write):
    path, marker = tmp_path / "edm_imagenet64_ema.pt", str(tmp_path / "pwned")
    write(path, marker)
    with pytest.raises(UserError, match="cannot be loaded as a plain tensor state dict") as e:
        load_state_dict_safely(str(path))
    assert str(path) in str(e.value) and not os.path.exists(marker)


def test_non_dict_or_missing_file_is_a_user_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        load_state_dict_safely(str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict_safely(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt cannot be loaded"):
        load_state_dict_safely(str(tmp_path / "junk.pt"))


def test_cli_writes_a_teacher_checkpoint(tmp_path, monkeypatch, capsys):
    # The whole pipeline on a small stand-in for the released architecture (same code path, seconds not minutes).
    monkeypatch.setattr(importers, "EDM_IMAGENET64", SMALL)
    sd = _synthetic(published_edm_imagenet64_shapes())
    src, dst = tmp_path / "edm_imagenet64_ema.pt", tmp_path / "teacher.safetensors"
    torch.save(sd, src)
    assert run_cli(importers.main, [str(src), "-o", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    net, meta = load_network(str(dst), kind="teacher", resolution=SMALL.resolution)  # rebuilt from its meta
    assert meta["stage"] == "teacher" and meta["num_classes"] == 10 and meta["diffusion"]["label_dropout"] == 0
    assert meta["source_sha256"] == importers.sha256_file(str(src)) and "consistency-models" in meta["source"]
    ref = _load(SMALL, convert_edm_imagenet64(sd))
    x, c_noise, y = torch.randn(2, 3, 16, 16), torch.tensor([0.1, -0.3]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(net(x, c_noise, y), ref(x, c_noise, y))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04junk")
    assert run_cli(importers.main, [str(tmp_path / "bad.pt"), "-o", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "t.safetensors").exists()


def test_full_size_import_end_to_end(tmp_path):
    sd = _synthetic(published_edm_imagenet64_shapes())
    src, dst = tmp_path / "edm_imagenet64_ema.pt", tmp_path / "teacher.safetensors"
    torch.save(sd, src)
    meta = import_edm_imagenet64(str(src), str(dst))
    net, saved = load_network(str(dst), kind="teacher", resolution=64)
    assert saved["network"] == meta["network"] and count_parameters(net) == PUBLISHED_PARAMS + 768
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64), torch.tensor([0.0]), torch.tensor([1]))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
