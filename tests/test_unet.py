"""ADM UNet: shapes, conditioning, batch independence, autocast / channels_last, growth, the paper's size."""

import dataclasses
import math
import statistics
import time

import pytest
import torch

from pagoda.checkpoint import build_network
from pagoda.config import PRESETS, UNetConfig, to_dict
from pagoda.networks.unet import (
    LEGACY_W_EMB_SCALE,
    NO_GUIDANCE,
    W_EMB_SCALE,
    ResBlock,
    TimestepEmbedSequential,
    UNet,
    count_parameters,
    timestep_embedding,
)

# Exact parameter count of consistency-models `cm/unet.py` (commit e32b69e) built with the ImageNet-64 EDM flags
# of its scripts/launch.sh (192 ch, mult 1,2,3,4, 3 res blocks, attn 32,16,8, 64-ch heads, scale-shift,
# resblock_updown, class_cond, learn_sigma False): 541 tensors. Counted once by instantiating that code.
PUBLISHED_EDM_IMAGENET64_PARAMS = 295_899_267

TINY = dict(resolution=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            num_head_channels=32, num_classes=5)


def _randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Fresh ADM nets have zero residual branches and a zero head; give every weight a value so tests see through.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _tiny(**kw) -> UNet:
    return _randomized(UNet(**{**TINY, **kw})).eval()


def _inputs(N: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, 8, 8, generator=g)
    c_noise = torch.log(torch.tensor([0.002, 0.3, 2.0, 80.0][:N])) / 4
    labels = torch.tensor([0, 4, 5, 2][:N])  # 5 = the null class
    return x, c_noise, labels


def test_timestep_embedding_is_adm_cos_then_sin():
    t = torch.tensor([0.0, 1.5, -250.0])
    emb = timestep_embedding(t, 192)
    assert emb.shape == (3, 192) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :96], torch.ones(96)) and torch.equal(emb[0, 96:], torch.zeros(96))
    f = math.exp(-math.log(10000) * 5 / 96)
    assert emb[1, 5].item() == pytest.approx(math.cos(1.5 * f), abs=1e-6)
    assert emb[2, 96 + 5].item() == pytest.approx(math.sin(-250.0 * f), abs=1e-5)


def test_fresh_network_outputs_zero():
    # ADM initialisation: the output conv starts at zero, so F = 0 before training.
    x, c_noise, labels = _inputs()
    out = UNet(**TINY)(x, c_noise, labels)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("num_classes,out_channels", [(5, 3), (0, 3), (5, 6)])
def test_forward_shapes(num_classes, out_channels):
    net = _tiny(num_classes=num_classes, out_channels=out_channels)
    x, c_noise, labels = _inputs()
    out = net(x, c_noise, labels if num_classes else None)
    assert out.shape == (4, out_channels, 8, 8) and out.dtype == x.dtype and torch.isfinite(out).all()
    assert (net.label_emb is None) == (num_classes == 0)


def test_labels_condition_and_none_means_null_class():
    net = _tiny()
    x, c_noise, _ = _inputs()
    with torch.no_grad():
        null = net(x, c_noise, torch.full((4,), 5))
        assert torch.equal(net(x, c_noise, None), null)
        assert not torch.allclose(net(x, c_noise, torch.zeros(4, dtype=torch.long)), null)


def test_noise_level_and_scalar_c_noise():
    net = _tiny()
    x, _, labels = _inputs()
    with torch.no_grad():
        a, b = net(x, torch.full((4,), 0.1), labels), net(x, torch.full((4,), 0.2), labels)
        assert not torch.allclose(a, b)
        assert torch.equal(net(x, torch.tensor(0.1), labels), a)  # a scalar broadcasts over the batch


def test_unconditional_rejects_labels_and_guidance():
    net = _tiny(num_classes=0)
    x, c_noise, labels = _inputs()
    with pytest.raises(ValueError, match="unconditional"):
        net(x, c_noise, labels)
    with pytest.raises(ValueError, match="guidance"):
        net(x, c_noise, None, torch.ones(4))


def test_gradient_reaches_every_parameter():
    net = _tiny().train()
    x, c_noise, labels = _inputs()
    net(x, c_noise, labels).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_sample_does_not_depend_on_batch():
    net = _tiny()
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        full = net(x, c_noise, labels)
        for i in range(4):
            alone = net(x[i:i + 1], c_noise[i:i + 1], labels[i:i + 1])
            torch.testing.assert_close(alone, full[i:i + 1], rtol=0, atol=1e-5)


def test_dropout_only_in_train_mode():
    net = _tiny(dropout=0.5)
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, c_noise, labels), net(x, c_noise, labels))
        net.train()
        assert not torch.allclose(net(x, c_noise, labels), net(x, c_noise, labels))


def test_channels_last_matches_contiguous():
    net = _tiny()
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last), c_noise, labels)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    net = _tiny()
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, c_noise, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.05


def test_guidance_embedding_starts_neutral_then_conditions():
    plain = _tiny()
    guided = UNet(**TINY, guidance_embed=True).eval()
    missing, unexpected = guided.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_emb.") for k in missing)
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        # A fresh w-embedding adds zero: a w-conditioned copy of a teacher is the teacher.
        torch.testing.assert_close(guided(x, c_noise, labels, torch.full((4,), 3.0)), plain(x, c_noise, labels))
        _randomized(guided.guidance_emb, seed=3)
        w1, w3 = guided(x, c_noise, labels, torch.full((4,), 1.0)), guided(x, c_noise, labels, torch.full((4,), 3.0))
        assert not torch.allclose(w1, w3)
        assert torch.equal(guided(x, c_noise, labels, None), w1) and NO_GUIDANCE == 1.0



def test_guidance_embedding_is_smooth_in_w():
    # The w-features must change little for a small change of w compared with the span of the guidance range,
    # or a G trained on scales drawn from [1, 3] sees nearby w as unrelated. Control: the timestep's 1000 * w.
    def jump_ratio(scale):
        e = {w: timestep_embedding(scale * torch.tensor([w]), 192) for w in (1.0, 2.0, 2.05, 3.0)}
        return ((e[2.05] - e[2.0]).norm() / (e[3.0] - e[1.0]).norm()).item()

    assert jump_ratio(W_EMB_SCALE) < 0.2 < 0.5 < jump_ratio(LEGACY_W_EMB_SCALE)  # measured 0.14, 0.74


def test_guided_network_without_scale_key_loads_with_the_legacy_scale():
    # Guided files written before `guidance_emb_scale` existed embedded 1000 * w: they must decode as trained.
    cfg = {**to_dict(UNetConfig(**TINY)), "guidance_embed": True}
    old = {k: v for k, v in cfg.items() if k != "guidance_emb_scale"}
    assert build_network({"network": old}).guidance_emb_scale == LEGACY_W_EMB_SCALE
    assert build_network({"network": cfg}).guidance_emb_scale == W_EMB_SCALE != LEGACY_W_EMB_SCALE

def test_appended_up_block_and_new_head_double_the_resolution():
    # Stage 3 growth: blocks appended past the last skip take h alone (here the head keeps its width).
    net = _tiny()
    emb_dim = 4 * TINY["model_channels"]
    net.output_blocks.append(TimestepEmbedSequential(_randomized(ResBlock(32, emb_dim, 0.0, 32, up=True))))
    x, c_noise, labels = _inputs()
    with torch.no_grad():
        out = net(x, c_noise, labels)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_builds_from_every_preset_config(preset):
    cfg = PRESETS[preset].teacher.network
    with torch.device("meta"):
        net = UNet(**dataclasses.asdict(cfg))
    assert net.num_classes == cfg.num_classes and count_parameters(net) > 0


def test_imagenet64_parameter_count_matches_the_published_teacher():
    with torch.device("meta"):
        net = UNet(**dataclasses.asdict(PRESETS["imagenet64"].teacher.network))
    n = count_parameters(net)
    assert abs(n - PUBLISHED_EDM_IMAGENET64_PARAMS) / PUBLISHED_EDM_IMAGENET64_PARAMS < 0.01
    assert n == PUBLISHED_EDM_IMAGENET64_PARAMS + 4 * 192  # exactly one extra label_emb row (the null class)


@pytest.mark.slow
def test_imagenet64_cpu_forward_time():
    net = UNet(**dataclasses.asdict(PRESETS["imagenet64"].teacher.network)).eval()
    x, c_noise, y = torch.randn(1, 3, 64, 64), torch.tensor([0.0]), torch.tensor([7])
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            out = net(x, c_noise, y)
            times.append(time.perf_counter() - t0)
    print(f"\nimagenet64 UNet, batch 1, fp32 CPU ({torch.get_num_threads()} threads): "
          f"median {statistics.median(times[1:]):.3f} s over {len(times) - 1} runs after warm-up")
    assert out.shape == (1, 3, 64, 64)
