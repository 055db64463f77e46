"""The Generator interface: per-seed determinism, declared == counted NFE, labels, loading by kind."""

import dataclasses
import re

import pytest
import torch

from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS, SampleConfig, UNetConfig
from pagoda.diffusion import EDMPrecond
from pagoda.errors import UserError
from pagoda.generator import DiffusionGenerator, as_seeds, load_generator, seeded_draws, seeded_noise
from pagoda.networks.unet import UNet
from pagoda.samplers import NFECounter

NET = UNetConfig(resolution=8, model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(),
                 num_head_channels=32, num_classes=3)
CFG = dataclasses.replace(PRESETS["smoke"].teacher, network=NET,
                          sample=SampleConfig(sampler="euler", steps=3, guidance=1.0))


def _net(num_classes=3):
    torch.manual_seed(0)
    net = UNet(**dataclasses.asdict(dataclasses.replace(NET, num_classes=num_classes)))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)  # random, so that samples depend on seeds and labels
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return _net()


def _gen(net, sampler="heun", steps=2, **kw):
    return DiffusionGenerator(EDMPrecond(net), resolution=8, num_classes=net.num_classes, sampler=sampler,
                              steps=steps, name="tiny", **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, net):
    path = tmp_path_factory.mktemp("ckpt") / "teacher.safetensors"
    save_model(path, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=CFG, step=1, ema_rate=0.9))
    return path


def test_seeded_noise_depends_on_the_seed_only():
    a = seeded_noise(torch.tensor([5, 6, 7]), (3, 4, 4))
    b = torch.cat([seeded_noise(torch.tensor([s]), (3, 4, 4)) for s in (7, 6, 5)]).flip(0)
    assert a.dtype == torch.float32 and a.shape == (3, 3, 4, 4) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    eps, labels = seeded_draws(torch.tensor([5, 6, 7]), (3, 4, 4), "cpu", num_classes=1000)
    assert torch.equal(eps, a) and labels.dtype == torch.int64 and len(set(labels.tolist())) == 3


def test_samples_do_not_depend_on_batch_size(net):
    gen = _gen(net)
    seeds = torch.arange(100, 107)
    full = gen.sample(seeds)
    assert full.dtype == torch.uint8 and full.shape == (7, 3, 8, 8)
    assert full.float().std() > 1  # not a constant image
    for batch in (1, 4):
        assert torch.equal(torch.cat(list(gen.sample_batches(seeds, batch=batch))), full)  # bitwise on CPU
    assert torch.equal(gen.sample(seeds.flip(0)), full.flip(0))


def test_labels_drawn_from_seeds_are_batch_independent(net):
    gen = _gen(net, sampler="euler", steps=1)
    seeds = torch.arange(40)
    labels = gen.seed_labels(seeds)
    assert labels.shape == (40,) and set(labels.tolist()) == {0, 1, 2}
    assert torch.equal(torch.cat([gen.seed_labels(seeds[i:i + 3]) for i in range(0, 40, 3)]), labels)
    # sample() without labels uses exactly those labels
    assert torch.equal(gen.sample(seeds[:4]), gen.sample(seeds[:4], labels=labels[:4]))
    other = (labels[:4] + 1) % 3
    assert not torch.equal(gen.sample(seeds[:4], labels=other), gen.sample(seeds[:4]))


@pytest.mark.parametrize("sampler,steps", [("heun", 3), ("euler", 3), ("ddim", 2), ("heun", 1)])
@pytest.mark.parametrize("guidance", [None, 1.0, 2.0])
def test_declared_nfe_equals_counted(net, sampler, steps, guidance):
    gen = _gen(net, sampler=sampler, steps=steps)
    counter = NFECounter(gen.denoiser)
    gen.denoiser = counter
    gen.sample(torch.arange(3), guidance=guidance)
    assert counter.nfe == gen.nfe_for(guidance) > 0
    assert gen.nfe == gen.nfe_for(None) == (2 * steps - 1 if sampler == "heun" else steps)


def test_default_guidance_counts_in_nfe(net):
    gen = _gen(net, sampler="euler", steps=2, guidance=1.5)
    assert gen.nfe == 4 and gen.nfe_for(1.0) == 2
    assert torch.equal(gen.sample(torch.arange(2)), gen.sample(torch.arange(2), guidance=1.5))
    assert not torch.equal(gen.sample(torch.arange(2)), gen.sample(torch.arange(2), guidance=1.0))


def test_unconditional_model():
    gen = _gen(_net(num_classes=0), sampler="euler", steps=1)
    assert gen.seed_labels(torch.arange(3)) is None and not gen.supports_guidance
    assert gen.sample(torch.arange(3)).shape == (3, 3, 8, 8)
    with pytest.raises(UserError, match="unconditional"):
        gen.sample(torch.arange(3), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(UserError, match="guidance"):
        gen.sample(torch.arange(3), guidance=2.0)


@pytest.mark.parametrize("seeds,labels,needle", [
    ([0.5, 1.0], None, "integers"), ([-1, 2], None, "negative"), ([0, 1], [0, 1, 2], "3 labels for 2 seeds"),
    ([0, 1], [0, 4], "[0, 2]")])
def test_bad_inputs(net, seeds, labels, needle):
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        _gen(net).sample(torch.tensor(seeds), labels=None if labels is None else torch.tensor(labels))


def test_as_seeds_accepts_lists_and_ranges():
    assert torch.equal(as_seeds(range(3)), torch.arange(3)) and as_seeds([4, 5]).dtype == torch.int64


def test_load_generator_uses_the_checkpoint_settings(ckpt, net):
    gen = load_generator(ckpt)
    assert (gen.kind, gen.sampler, gen.steps, gen.nfe, gen.resolution, gen.num_classes) == \
        ("teacher", "euler", 3, 3, 8, 3)
    assert gen.name == "teacher" and gen.supports_guidance  # trained with label dropout 0.1
    seeds = torch.arange(3)
    assert torch.equal(gen.sample(seeds), _gen(net, sampler="euler", steps=3).sample(seeds))
    heun = load_generator(ckpt, sampler="heun", steps=2)
    assert (heun.sampler, heun.nfe, heun.method, gen.method) == ("heun", 3, "heun", "ddim")
    assert torch.equal(heun.sample(seeds), _gen(net, sampler="heun", steps=2).sample(seeds))


def test_load_generator_refuses_other_kinds(tmp_path, net):
    path = tmp_path / "domain.safetensors"
    save_model(path, net.state_dict(), {"kind": "domain-classifier"})
    with pytest.raises(UserError) as e:
        load_generator(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'domain-classifier'" in msg and "'teacher'" in msg


def test_load_generator_refuses_an_unknown_sampler(ckpt):
    with pytest.raises(UserError, match="sampler 'rk4'"):
        load_generator(ckpt, sampler="rk4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_noise(ckpt):
    cpu = load_generator(ckpt)
    cuda = load_generator(ckpt, device="cuda")
    assert torch.equal(seeded_noise(torch.arange(4), (3, 8, 8), "cuda").cpu(), seeded_noise(torch.arange(4), (3, 8, 8)))
    diff = (cuda.sample(torch.arange(8)).cpu().int() - cpu.sample(torch.arange(8)).int()).abs()
    assert diff.max() <= 1  # different kernels may round a pixel the other way


def test_bfloat16_autocast_stays_close(net):
    seeds = torch.arange(4)
    full = _gen(net, sampler="euler", steps=2).sample(seeds)
    half = _gen(net, sampler="euler", steps=2, dtype=torch.bfloat16).sample(seeds)
    assert half.dtype == torch.uint8 and (half.int() - full.int()).abs().float().mean() < 2


def test_load_generator_of_a_file_with_network_meta_only(tmp_path, net):
    # what an importer may write: no training config, no sample settings, no label dropout
    from pagoda.config import to_dict
    path = tmp_path / "imported.safetensors"
    save_model(path, net.state_dict(), {"kind": "teacher", "stage": "teacher", "resolution": 8,
                                        "network": to_dict(NET)})
    gen = load_generator(path, steps=1)
    assert (gen.sampler, gen.steps, gen.nfe, gen.num_classes, gen.supports_guidance) == ("heun", 1, 1, 3, False)
    assert load_generator(path).steps == SampleConfig().steps


@pytest.mark.parametrize("spec, needle", [("heun:karras-rho0.2", "[1, 100]"), ("heun:karras-rhoinf", "[1, 100]"),
                                          ("euler:foo", "grid 'foo'"), ("dpm", "'dpm' is unknown"),
                                          ("dpmpp2m:", "ends with ':'")])
def test_bad_sampler_specs_are_one_line_errors(spec, needle):
    from pagoda.config import split_sampler_spec
    for check in (split_sampler_spec, lambda s: SampleConfig(sampler=s).validate()):
        with pytest.raises(UserError) as e:
            check(spec)
        assert needle in str(e.value)


def test_sampler_labels_are_canonical():
    # Specs that sample identically get one label in rows (so eval.gate matches them): the default grid is implicit,
    # ddim is euler, and an explicit rho equal to the model's is dropped.
    den = EDMPrecond(UNet(**dataclasses.asdict(PRESETS["smoke"].teacher.network)))
    label = lambda spec: DiffusionGenerator(den, resolution=8, num_classes=16, sampler=spec, steps=3).sampler  # noqa: E731
    assert label("heun") == label("heun:karras") == label("heun:karras-rho7") == "heun"
    assert label("ddim") == label("euler") == "euler"
    assert label("dpmpp2m:loguniform") == "dpmpp2m:loguniform" and label("heun:karras-rho3") == "heun:karras-rho3"
    gen = DiffusionGenerator(den, resolution=8, num_classes=16, sampler="ddim", steps=3)
    assert gen.method == "ddim"


def test_guidance_scale_bounded_and_non_finite_samples_refused(net):
    gen = _gen(net)  # class-conditional: CFG-capable
    assert gen.check_guidance(2.5) == 2.5 and gen.check_guidance(None) == 1.0
    for w in (-1.0, float("nan"), 1e30):
        with pytest.raises(UserError, match=r"pick a CFG scale w in \[0, 100\]"):
            gen.check_guidance(w)
    # A w that overflows D_u + w (D_c - D_u) gives NaN: refused naming the seed and w, not black pixels.
    with pytest.raises(UserError, match=r"NaN/inf at seed 4 \(guidance 1e\+38\)"):
        gen.sample(torch.tensor([4, 5]), guidance=1e38)
    # Control: a sane w samples.
    assert gen.sample(torch.tensor([4, 5]), guidance=3.0).dtype == torch.uint8


def test_edited_one_step_meta_refused_in_one_line(tmp_path):
    # Files without a checksum (written before it existed) still load, so their meta values are checked.
    cfg = PRESETS["smoke"].teacher
    gcfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, guidance_embed=True))
    state = UNet(**dataclasses.asdict(gcfg.network)).state_dict()

    def write(name, config=gcfg, **extra):
        path = tmp_path / f"{name}.safetensors"
        save_model(path, state, model_meta(kind="pagoda", stage="distill", config=config, step=0, ema_rate=0.0,
                                           extra={"guidance_range": [1.0, 3.0], **extra}))
        return path

    assert load_generator(write("ok")).guidance_range == (1.0, 3.0)  # control
    cases = {"range": (dict(guidance_range="abc"), "guidance_range 'abc'"),
             "res": (dict(resolution=-3), "resolution -3 is not its network's output size 8"),
             "scale": (dict(config=dataclasses.replace(gcfg, network=dataclasses.replace(
                 gcfg.network, guidance_emb_scale=-5.0))), "guidance_emb_scale=-5.0 must be > 0"),
             "sigma": (dict(config=dataclasses.replace(gcfg, diffusion=dataclasses.replace(
                 gcfg.diffusion, sigma_max=-1.0))), "diffusion constants no model was trained with")}
    for name, (kw, needle) in cases.items():
        with pytest.raises(UserError, match=re.escape(needle)):
            load_generator(write(name, **kw))


def test_one_step_nan_names_the_seed_and_w(tmp_path):
    # decode's NaN refusal formats the scalar w (the network gets a per-item tensor of it).
    cfg = PRESETS["smoke"].teacher
    gcfg = dataclasses.replace(cfg, network=dataclasses.replace(cfg.network, guidance_embed=True))
    net = UNet(**dataclasses.asdict(gcfg.network))
    with torch.no_grad():
        net.out[-1].bias.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_model(path, net.state_dict(), model_meta(kind="pagoda", stage="distill", config=gcfg, step=0, ema_rate=0.0,
                                                  extra={"guidance_range": [1.0, 3.0]}))
    with pytest.raises(UserError, match=r"NaN/inf at seed 9 \(guidance 2\)"):
        load_generator(path).sample(torch.tensor([9]), guidance=2.0)
