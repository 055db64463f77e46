"""Stage 3 and the guidance-conditioned G on tiny networks: growing copies the source by structure, a fresh stage
is the nearest-upsampled source up to a stated bound, the frozen trunk stays bit-identical, grown checkpoints are
one-step Generators at their output resolution, w-conditioned G equals the unconditioned one until trained and
refuses a w outside its range, and bad inputs end in one line with exit code 2."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pairs import _save_teacher as save_tiny_teacher

from eval.ref import main as ref_main
from eval.run import main as run_main
from pagoda.__main__ import main
from pagoda.checkpoint import build_network, load_network, model_meta, save_model
from pagoda.config import PRESETS, GrowConfig, TrainConfig, UNetConfig, from_dict, to_dict
from pagoda.data import build_dataset, save_npz
from pagoda.data import psnr as psnr_fn
from pagoda.diffusion import one_step
from pagoda.edit import slerp
from pagoda.errors import UserError, run_cli
from pagoda.generator import OneStepGenerator, load_generator
from pagoda.networks.domain import DomainNet, save_domain_net
from pagoda.pairs import load_pairs, make_pairs, pair_batch
from pagoda.stages.distill import generator_network
from pagoda.stages.grow import GrowStage, drift, freeze, grow_network, upsampling_gap_bound
from pagoda.train import train

BASE = 8  # the smoke preset's base resolution
pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0, scale: float = 0.05, **kw):
    """A smoke-layout UNet with every weight random (no zero heads), so outputs depend on everything."""
    cfg = to_dict(dataclasses.replace(PRESETS["smoke"].teacher.network, **kw))
    torch.manual_seed(seed)
    net = build_network({"network": cfg})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, scale)
    return net, cfg


def _z(n: int = 4, res: int = BASE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return 80 * torch.randn(n, 3, res, res, generator=g), torch.randint(16, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# The grown network.

def test_grown_network_copies_every_source_weight_and_doubles_the_output():
    src, cfg = _net()
    g1, cfg1 = grow_network(src, cfg)
    g2, cfg2 = grow_network(g1, cfg1)
    assert (cfg1["grow_stages"], cfg2["grow_stages"]) == (1, 2)
    for small, big in ((src, g1), (g1, g2)):
        sd, bd = small.state_dict(), big.state_dict()
        assert all(torch.equal(sd[k], bd[k]) for k in sd)  # every source tensor copied, under its own path
        new = set(bd) - set(sd)
        assert new and all(k.startswith("output_blocks.") for k in new)
        assert len(big.output_blocks) == len(small.output_blocks) + 3  # up-ResBlock + 2 ResBlocks
        assert all(big.output_blocks[i][0].out_layers[3].weight.abs().sum() == 0
                   for i in range(len(small.output_blocks), len(big.output_blocks)))  # zero-initialised outputs
    z, y = _z()
    with torch.no_grad():
        shapes = [one_step(n, z, y, sigma_max=80.0).shape for n in (src, g1, g2)]
    assert shapes == [(4, 3, 8, 8), (4, 3, 16, 16), (4, 3, 32, 32)]  # input stays 3 x base x base


def _head_input(net, z, y):
    feats = []
    hook = net.out.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.no_grad():
        out = one_step(net, z, y, sigma_max=80.0)
    hook.remove()
    return out, feats[0]


def test_fresh_grown_g_is_the_upsampled_source_up_to_the_head_conv_bound():
    src, cfg = _net()
    grown, _ = grow_network(src, cfg)
    z, y = _z()
    small, h = _head_input(src, z, y)
    with torch.no_grad():
        big = one_step(grown, z, y, sigma_max=80.0)
    up = F.interpolate(small, scale_factor=2, mode="nearest")
    gap = (big - up).abs().amax(dim=(1, 2, 3))
    bound = upsampling_gap_bound(src, h)
    assert (gap <= bound + 1e-5).all(), (gap, bound)
    assert (gap > 0).all()  # not exact: the head's 3x3 conv sees a different neighbourhood after upsampling
    # The grown trunk is exactly up(h): GroupNorm and SiLU commute with nearest upsampling, the conv is the gap.
    _, h_big = _head_input(grown, z, y)
    assert torch.equal(h_big, F.interpolate(h, scale_factor=2, mode="nearest"))
    assert torch.equal(big, grown.out(h_big))
    # Control: new blocks whose output convs are not zero do not pass h on upsampled.
    with torch.no_grad():
        for i in range(len(src.output_blocks), len(grown.output_blocks)):
            grown.output_blocks[i][0].out_layers[3].weight.normal_(0, 0.05)
    _, h_wrong = _head_input(grown, z, y)
    assert (h_wrong - h_big).abs().max() > 1e-2 * h_big.abs().max()


def test_freeze_set_and_unknown_names():
    src, cfg = _net()
    grown, _ = grow_network(src, cfg)
    names = freeze(grown, PRESETS["smoke"].grow.freeze)
    assert "guidance_emb" not in names  # absent from an unguided G: skipped
    frozen = {n for n, p in grown.named_parameters() if not p.requires_grad}
    assert all(n.split(".")[0] in ("time_embed", "label_emb", "input_blocks", "middle_block")
               or n.startswith("output_blocks.0.") for n in frozen)
    assert not any(n.startswith(("out.", "output_blocks.1.", "output_blocks.4.")) for n in frozen)
    with pytest.raises(UserError, match="not a module"):
        freeze(grown, ["encoder"])


def test_imagenet_freeze_set_is_the_papers():
    freeze_in64 = PRESETS["in64to256"].grow.freeze
    assert freeze_in64[-1] == "output_blocks.8" and "output_blocks.9" not in freeze_in64
    assert PRESETS["in64to256"].grow.train.batch == 360 and PRESETS["in64to512"].grow.train.batch == 512


# ---------------------------------------------------------------------------------------------
# Guidance-conditioned G.

def test_fresh_w_conditioned_g_equals_the_unconditioned_one_at_every_w():
    src, cfg = _net()
    guided, gcfg = generator_network(src, cfg, guided=True)
    assert gcfg["guidance_embed"] and guided.guidance_emb is not None
    z, y = _z()
    with torch.no_grad():
        plain = one_step(src, z, y, sigma_max=80.0)
        for w in (0.0, 1.0, 1.5, 4.0):
            out = one_step(guided, z, y, sigma_max=80.0, guidance=torch.full((4,), w))
            assert torch.equal(out, plain)
        # Control: once the embedding's last layer is not zero, w moves the output.
        guided.guidance_emb[2].weight.data.normal_(0, 0.1)
        moved = one_step(guided, z, y, sigma_max=80.0, guidance=torch.full((4,), 3.0))
    assert (moved - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# End to end through the CLI on a tiny teacher.

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny teacher; 16 labelled photo crops at 32 px (the stages crop them to 8 / 16 / 32); plain pairs, guided
    pairs over w in [1, 2]; a G trained on each (2 steps)."""
    d = tmp_path_factory.mktemp("grow")
    photos = build_dataset("photos", 32)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 16))
    save_npz(d / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    teacher = save_tiny_teacher(d / "teacher.safetensors")
    make_pairs(teacher, str(d / "data.npz"), d / "pairs", shard_size=8, batch=8, progress=False)
    make_pairs(teacher, str(d / "data.npz"), d / "gpairs", shard_size=8, batch=8, guidance=(1.0, 2.0), progress=False)
    out = {"dir": d, "teacher": teacher, "data": str(d / "data.npz"), "pairs": str(d / "pairs"),
           "gpairs": str(d / "gpairs")}
    for name, pairs in (("g", out["pairs"]), ("gg", out["gpairs"])):
        assert run_cli(main, ["distill", "--preset", "smoke", "--teacher", teacher, "--pairs", pairs,
                              "--out", str(d / name), "--set", "train.steps=2"]) == 0
        out[name] = str(d / name / "G.safetensors")
    return out


def _grow(src, pairs, out, *more):
    return run_cli(main, ["grow", "--preset", "smoke", "--from", str(src), "--pairs", str(pairs), "--out", str(out),
                          *map(str, more)])


def test_guided_pairs_record_w_and_the_guided_g_serves_its_range(files):
    pairs = load_pairs(files["gpairs"])
    w = torch.stack([pairs[j][3] for j in range(len(pairs))])
    assert pairs.guidance_range == (1.0, 2.0) and (w >= 1).all() and (w <= 2).all() and w.std() > 0.2
    assert json.loads((pairs.folder / "index.json").read_text())["nfe_per_item"] == 156  # cond + uncond rows
    plain = load_pairs(files["pairs"])
    assert all(plain[j][3] == 1 for j in range(4)) and plain.guidance_range is None
    g = load_generator(files["gg"])
    assert g.supports_guidance and g.guidance_range == (1.0, 2.0) and g.nfe_for(2.0) == 1
    assert g.sample(torch.arange(4), guidance=2.0).shape == (4, 3, BASE, BASE)
    z, y = _z()
    with torch.no_grad():  # trained (2 steps): w moves the output
        a, b = (one_step(g.net, z, y, sigma_max=80.0, guidance=torch.full((4,), w)) for w in (1.0, 2.0))
    assert (a - b).abs().max() > 0
    with pytest.raises(UserError, match=r"outside the range \[1, 2\]"):
        g.sample(torch.arange(2), guidance=3.0)
    with pytest.raises(UserError, match="trained without guidance"):
        load_generator(files["g"]).sample(torch.arange(2), guidance=2.0)


def test_guided_g_trains_its_fresh_w_embedding_faster_and_logs_the_cfg_term(files):
    """The guided run's RAdam has a second group, exactly the w-embedding, at guidance_lr_mult x lr (the loop keeps
    the multiple when it sets the schedule's lr); the unguided run has one group; the CFG term is logged."""
    gg_dir, g_dir = files["dir"] / "gg", files["dir"] / "g"
    opt = torch.load(gg_dir / "state.pt", weights_only=True)["optimizer"]
    cfg = PRESETS["smoke"].distill
    assert [len(g["params"]) for g in opt["param_groups"]][1] == 4  # guidance_emb: 2 Linear layers (W, b)
    assert opt["param_groups"][1]["lr"] == pytest.approx(cfg.guidance_lr_mult * cfg.train.lr)
    assert opt["param_groups"][0]["lr"] == pytest.approx(cfg.train.lr)
    assert len(torch.load(g_dir / "state.pt", weights_only=True)["optimizer"]["param_groups"]) == 1
    rows = [json.loads(line) for line in (gg_dir / "log.jsonl").read_text().splitlines()]
    assert all(r["l_cfg"] > 0 for r in rows if "l_adv" in r)
    assert all("l_cfg" not in r for r in map(json.loads, (g_dir / "log.jsonl").read_text().splitlines()))


def test_cfg_target_is_the_guided_teacher_solution(files):
    """cfg_target(z, y, w) is the w-guided teacher's ODE solution at each item's own w (batched per-item scales equal
    one call per scale); control: the unguided solution differs from the w = 2 one by far more than the tolerance."""
    from pagoda.checkpoint import load_teacher
    from pagoda.samplers import dpmpp_2m
    from pagoda.stages.distill import DistillStage

    teacher = load_teacher(files["teacher"])
    net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
    stage = DistillStage(PRESETS["smoke"].distill, net, diffusion, network=meta["network"], guided=True)
    z, y = _z(4)
    w = torch.tensor([1.0, 2.0, 1.0, 2.0])
    got = stage.cfg_target(z, y, w)
    cfg = PRESETS["smoke"].distill.loss
    from pagoda.diffusion import karras_sigmas
    sigmas = karras_sigmas(cfg.cfg_steps, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max,
                           rho=diffusion.rho)
    for k in range(4):
        ref = dpmpp_2m(stage.teacher, z[k:k + 1], sigmas, labels=y[k:k + 1], guidance=float(w[k])).clamp(-1, 1)
        torch.testing.assert_close(got[k:k + 1], ref, atol=1e-5, rtol=1e-5)
    plain = stage.cfg_target(z, y, torch.ones(4))
    assert (plain[1::2] - got[1::2]).abs().max() > 1e-2 and torch.allclose(plain[::2], got[::2], atol=1e-5)


class _Recorder(torch.nn.Module):
    """A discriminator stand-in that records the images it judges and returns a zero logit per image."""

    def __init__(self):
        super().__init__()
        self.seen, self.scale = [], torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, labels, w):
        self.seen.append(x.detach().clone())
        return self.scale * x.flatten(1).mean(1, keepdim=True)


def test_adv_real_teacher_shows_d_the_guided_teachers_samples(files, tmp_path):
    """loss.adv_real = teacher: D's real images are the teacher's samples at the items' labels and w from fresh noise
    (the generator's draw after the fakes' noise), not the pairs' photos; control: with data they are the photos,
    which differ from the teacher's samples by far more than the tolerance. A run trains with it and records it."""
    from pagoda.checkpoint import load_teacher
    from pagoda.data import to_model
    from pagoda.stages.distill import DistillStage

    teacher = load_teacher(files["teacher"])
    net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
    pairs = load_pairs(files["gpairs"])
    batch = [torch.stack([pairs[j][k] for j in range(4)]) for k in range(4)]
    seen = {}
    for real in ("data", "teacher"):
        cfg = PRESETS["smoke"].distill
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, adv_real=real, augment=False))
        stage = DistillStage(cfg, net, diffusion, network=meta["network"], guided=True)
        rec = _Recorder()
        stage.d_step(rec, stage.net, batch, torch.Generator().manual_seed(5))
        seen[real] = rec.seen[0]  # (real, fake): the real images come first
    gen = torch.Generator().manual_seed(5)
    z = batch[2]
    torch.randn(z.shape, generator=gen)  # the fakes' noise
    expected = stage.cfg_target(80.0 * torch.randn(z.shape, generator=gen), batch[1], batch[3].float())
    torch.testing.assert_close(seen["teacher"], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(seen["data"], to_model(batch[0]))
    assert (seen["data"] - expected).abs().mean() > 0.1  # control
    out = tmp_path / "gt"
    assert run_cli(main, ["distill", "--preset", "smoke", "--teacher", files["teacher"], "--pairs", files["gpairs"],
                          "--out", str(out), "--set", "train.steps=1", "--set", "loss.adv_real=teacher"]) == 0
    assert json.loads((out / "config.json").read_text())["loss"]["adv_real"] == "teacher"


def test_moves_measure_gs_and_the_teachers_guidance_moves(files, tmp_path, capsys):
    """bench.moves: G's and the teacher's RMS moves X(w) - X(1) and their cosine, in rows; the result does not
    depend on --batch; bad inputs (an unguided G, a w outside G's range, a teacher of another size) end in one
    line, exit 2."""
    from bench.moves import main as moves_main

    out = tmp_path / "moves.jsonl"
    common = [files["gg"], "--teacher", files["teacher"], "--steps", "2", "--w", "1.5,2", "--seeds", "0-5"]
    assert run_cli(moves_main, [*common, "--batch", "6", "-o", str(out)]) == 0
    assert run_cli(moves_main, [*common, "--batch", "4", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first, second = rows[:len(rows) // 2], rows[len(rows) // 2:]
    assert len(first) == 6 and [r["value"] for r in first] == pytest.approx([r["value"] for r in second], rel=1e-6)
    teacher_move = {r["guidance"]: r["value"] for r in first if r["model"] == files["teacher"]}
    assert set(teacher_move) == {1.5, 2.0} and 0 < teacher_move[1.5] < teacher_move[2.0]
    cos = [r["value"] for r in first if r["metric"] == "guidance_move_cosine"]
    assert len(cos) == 2 and all(-1 <= c <= 1 for c in cos)
    assert all(r["num_samples"] == 6 and r["resolution"] == BASE for r in first)
    other = tmp_path / "t16.safetensors"
    save_tiny_teacher(other, num_classes=7)
    capsys.readouterr()
    for argv, needle in (([files["g"], "--teacher", files["teacher"]], "trained without guidance"),
                         ([files["gg"], "--teacher", files["teacher"], "--w", "3"], "outside the range"),
                         ([files["gg"], "--teacher", str(other), "--w", "2"], "is not the teacher"),
                         ([files["gg"], "--teacher", files["g"], "--w", "2"], "not a teacher"),
                         ([files["gg"], "--teacher", files["teacher"], "--w", "2,2"], "each CFG scale once"),
                         ([files["gg"], "--teacher", files["teacher"], "--w", "x"], "comma-separated")):
        assert run_cli(moves_main, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1], err


def test_guided_g_from_init_starts_as_the_plain_g_at_every_w(files, tmp_path):
    """--init: the guided G starts from the plain G (its weights copied, the w-embedding fresh and zero), so
    G_0(z, y, w) = G_plain(z, y) at every w; the run records the init file and its hash."""
    from pagoda.checkpoint import load_teacher
    from pagoda.pairs import load_pairs as load
    from pagoda.stages.distill import DistillStage, load_init

    teacher = load_teacher(files["teacher"])
    net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
    init, network = load_init(files["g"], net, load(files["gpairs"]), True, meta["network"])
    stage = DistillStage(PRESETS["smoke"].distill, net, diffusion, network=network, guided=True, init=init)
    plain, _ = load_network(files["g"])
    z, y = _z()
    with torch.no_grad():
        ref = one_step(plain, z, y, sigma_max=80.0)
        for w in (1.0, 1.5, 2.0):
            assert torch.equal(stage.G(stage.net, z, y, torch.full((4,), w)), ref.float())
        assert not torch.equal(one_step(net, z, y, sigma_max=80.0), ref)  # control: the teacher's output differs
    out = tmp_path / "gi"
    assert run_cli(main, ["distill", "--preset", "smoke", "--teacher", files["teacher"], "--pairs", files["gpairs"],
                          "--init", files["g"], "--out", str(out), "--set", "train.steps=1"]) == 0
    g_meta = load_network(out / "G.safetensors")[1]
    assert g_meta["init"] == files["g"] and len(g_meta["init_sha256"]) == 64 and g_meta["guidance_range"] == [1, 2]
    changed = tmp_path / "init.safetensors"  # the same path with other contents: a different run, refused
    changed.write_bytes(Path(files["g"]).read_bytes())
    argv = ["distill", "--preset", "smoke", "--teacher", files["teacher"], "--pairs", files["gpairs"], "--init",
            str(changed), "--out", str(tmp_path / "gc"), "--set", "train.steps=1"]
    assert run_cli(main, argv) == 0
    changed.write_bytes(Path(files["gg"]).read_bytes())
    assert run_cli(main, argv) == 2


@pytest.mark.parametrize("case", ["other_teacher", "grown", "guided_for_plain_pairs"])
def test_distill_init_bad_inputs(case, files, tmp_path, capsys):
    if case == "other_teacher":
        other = save_tiny_teacher(tmp_path / "other.safetensors", seed=9)
        make_pairs(other, files["data"], tmp_path / "op", shard_size=8, batch=8, progress=False)
        teacher, pairs, init, needle = other, tmp_path / "op", files["g"], "another teacher"
    elif case == "grown":
        assert _grow(files["g"], files["pairs"], tmp_path / "g16", "--set", "train.steps=1") == 0
        teacher, pairs, init, needle = files["teacher"], files["gpairs"], tmp_path / "g16" / "G.safetensors", "grown"
    else:
        teacher, pairs, init, needle = files["teacher"], files["pairs"], files["gg"], "guidance-conditioned"
    capsys.readouterr()
    out = tmp_path / "gi"
    assert run_cli(main, ["distill", "--preset", "smoke", "--teacher", str(teacher), "--pairs", str(pairs),
                          "--init", str(init), "--out", str(out), "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "--init" in err[0], err
    assert not out.exists()


def test_grow_trains_freezes_and_loads_as_a_one_step_generator(files, tmp_path):
    out = tmp_path / "g16"
    assert _grow(files["g"], files["pairs"], out, "--set", "train.steps=2") == 0
    state = torch.load(out / "state.pt", weights_only=True)
    source, _ = load_network(files["g"])
    grown, meta = load_network(out / "G.safetensors")
    trainable = {n for n, p in grown.named_parameters()} - {
        n for n, _ in source.named_parameters() if n.split(".")[0] in ("time_embed", "label_emb", "input_blocks",
                                                                      "middle_block") or n.startswith("output_blocks.0.")}
    assert set(state["ema"]) == trainable  # frozen parameters: no EMA state ...
    assert len(state["optimizer"]["state"]) == len(trainable)  # ... and no optimiser state
    src_sd, net_sd = source.state_dict(), state["net"]
    for n in src_sd:
        if n in trainable:
            continue
        assert torch.equal(src_sd[n], net_sd[n]), n  # the frozen trunk, bit for bit after 2 optimiser steps
    assert any(not torch.equal(src_sd[n], net_sd[n]) for n in src_sd if n in trainable)  # the rest moved
    assert meta["resolution"] == 16 and meta["noise_resolution"] == BASE and meta["grow_stage"] == 1
    g = load_generator(out / "G.safetensors")
    assert isinstance(g, OneStepGenerator) and g.nfe == 1 and g.resolution == 16 and g.noise_shape == (3, 8, 8)
    x = g.sample(torch.arange(4))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(x, torch.cat([g.sample(torch.arange(2)), g.sample(torch.arange(2, 4))]))
    rows_out = tmp_path / "new" / "drift.jsonl"  # `drift --out` makes its folder, as every other writer does
    assert run_cli(main, ["drift", "--low", str(files["g"]), "--high", str(out / "G.safetensors"), "--seeds", "0-3",
                          "--out", str(rows_out)]) == 0
    assert [json.loads(line)["metric"] for line in rows_out.read_text().splitlines()][0] == "drift_rms"

    # Stage 2 (k = 2): two G updates per step (L_rec, then L_adv); with the reconstructions' discriminator on.
    out32 = tmp_path / "g32"
    assert _grow(out / "G.safetensors", files["pairs"], out32, "--set", "train.steps=1",
                 "--set", "loss.rec_disc_from=2", "--set", "train.log_every=1") == 0
    g32 = load_generator(out32 / "G.safetensors")
    assert g32.resolution == 32 and g32.noise_shape == (3, 8, 8)
    rows = [json.loads(line) for line in (out32 / "log.jsonl").read_text().splitlines()]
    state32 = torch.load(out32 / "state.pt", weights_only=True)
    assert any(k.startswith("rec.") for k in state32["disc"])
    assert all(int(v["step"]) == 2 for v in state32["optimizer"]["state"].values())  # two updates in one step
    assert {"l_rec", "l_adv", "l_adv_rec", "d_rec"} <= rows[-1].keys() and "lambda" not in rows[-1]


def test_grown_guided_g_and_eval_across_resolutions_and_guidance(files, tmp_path):
    out = tmp_path / "gg16"
    assert _grow(files["gg"], files["gpairs"], out, "--set", "train.steps=1") == 0
    g = load_generator(out / "G.safetensors")
    assert g.guidance_range == (1.0, 2.0) and g.resolution == 16
    torch.manual_seed(0)
    save_domain_net(DomainNet(16).eval(), tmp_path / "domain-photos.safetensors", {})
    common = ["--extractor", "domain", "--weights-dir", str(tmp_path), "--allow-small"]
    for res in (8, 16):
        assert run_cli(ref_main, [f"photos:heldout:{res}", "-o", str(tmp_path / f"ref{res}.npz"), *common]) == 0
    rows_path = tmp_path / "rows.jsonl"
    code = run_cli(run_main, ["--ckpt", files["gg"], "--ckpt", str(out / "G.safetensors"), "--ref",
                              str(tmp_path / "ref8.npz"), "--ref", str(tmp_path / "ref16.npz"), "--guidance", "1,2",
                              "--metrics", "fid", "--num-samples", "16", "--out", str(rows_path), *common])
    assert code == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    cells = sorted((r["resolution"], r["guidance"]) for r in rows)
    assert cells == [(8, 1.0), (8, 2.0), (16, 1.0), (16, 2.0)] and all(r["nfe"] == 1 for r in rows)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written.

@pytest.mark.parametrize("case", ["not_2x", "other_base_pairs", "teacher_as_source", "guidance_out_of_range",
                                  "unknown_freeze", "other_guidance_pairs", "no_source", "all_frozen", "new_frozen",
                                  "drift_swapped", "low_res_data", "drift_other_lineage"])
def test_bad_inputs(case, files, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "low_res_data":  # 8 px images would reach the 16 px stage only by upscaling
        x, y = zip(*(build_dataset(files["data"], 8)[i] for i in range(8)))
        save_npz(tmp_path / "d8.npz", torch.stack(x).permute(0, 2, 3, 1).numpy(), torch.stack(y).numpy())
        make_pairs(files["teacher"], str(tmp_path / "d8.npz"), tmp_path / "p8", shard_size=8, batch=8,
                   progress=False)
        code, needle = _grow(files["g"], tmp_path / "p8", out), "has images of 8 px (its 8 images checked)"
    elif case == "not_2x":
        code, needle = _grow(files["g"], files["pairs"], out, "--resolution", "32"), "not twice"
    elif case == "other_base_pairs":
        teacher16 = tmp_path / "t16.safetensors"
        net, ncfg = _net(resolution=16)
        cfg = dataclasses.replace(PRESETS["smoke"].teacher, network=from_dict(UNetConfig, ncfg))
        save_model(teacher16, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=cfg, step=0,
                                                           ema_rate=0.999))
        make_pairs(str(teacher16), files["data"], tmp_path / "p16", shard_size=8, batch=8, progress=False)
        capsys.readouterr()
        code, needle = _grow(files["g"], tmp_path / "p16", out), "at resolution 16, not 8"
    elif case == "teacher_as_source":
        code, needle = _grow(files["teacher"], files["pairs"], out), "'pagoda' checkpoint is needed"
    elif case == "guidance_out_of_range":
        code = run_cli(main, ["sample", "--ckpt", files["gg"], "--seeds", "0-1", "--guidance", "2.5",
                              "-o", str(tmp_path / "s.png")])
        out, needle = tmp_path / "s.png", "outside the range [1, 2]"
    elif case == "unknown_freeze":
        code, needle = _grow(files["g"], files["pairs"], out, "--set", 'freeze=["encoder"]'), "not a module"
    elif case == "other_guidance_pairs":
        code, needle = _grow(files["g"], files["gpairs"], out), "are guided pairs (w in [1, 2])"
    elif case == "all_frozen":
        names = '["time_embed","label_emb","input_blocks","middle_block","output_blocks","out","grow_out"]'
        code, needle = _grow(files["g"], files["pairs"], out, "--set", f"freeze={names}"), "nothing to train"
        assert not out.exists()
    elif case == "new_frozen":
        code, needle = _grow(files["g"], files["pairs"], out, "--set", 'freeze=["output_blocks.5"]'), "must be trained"
        assert not out.exists()
    elif case == "drift_other_lineage":
        assert _grow(files["g"], files["pairs"], tmp_path / "g16", "--set", "train.steps=1") == 0
        capsys.readouterr()
        code = run_cli(main, ["drift", "--low", files["gg"], "--high", str(tmp_path / "g16" / "G.safetensors"),
                              "--seeds", "0-3"])
        needle = "was not grown from"
    elif case == "drift_swapped":
        assert _grow(files["g"], files["pairs"], tmp_path / "g16", "--set", "train.steps=1") == 0
        capsys.readouterr()
        code = run_cli(main, ["drift", "--low", str(tmp_path / "g16" / "G.safetensors"), "--high", files["g"],
                              "--seeds", "0-3"])
        needle = "swap them"
    else:
        code, needle = run_cli(main, ["grow", "--preset", "smoke", "--pairs", files["pairs"], "--out", str(out)]), \
            "--from"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (out / "G.safetensors").exists() and not (out.is_file())


def test_grow_presets_resolve():
    for name in ("smoke", "photos", "in64to128", "in64to256", "in64to512"):
        cfg = PRESETS[name].grow
        cfg.validate()
        assert isinstance(cfg, GrowConfig) and isinstance(cfg.train, TrainConfig)
    assert PRESETS["in64to512"].grow.resolution == 512 and PRESETS["in64to128"].grow.loss.w_adv == 1.0


def test_grow_stage_phases_and_discriminators_by_stage():
    src, cfg = _net()
    smoke = PRESETS["smoke"].grow
    assert GrowStage(smoke, src, cfg, sigma_max=80.0, sigma_data=0.5, stage_index=1, guided=False).phases is None
    g1, cfg1 = grow_network(src, cfg, start=smoke.start)
    s2 = GrowStage(smoke, g1, cfg1, sigma_max=80.0, sigma_data=0.5, stage_index=2, guided=False)
    assert s2.phases == ("rec", "adv") and not hasattr(s2.disc, "rec")
    g2, cfg2 = grow_network(g1, cfg1, start=smoke.start)
    s3 = GrowStage(smoke, g2, cfg2, sigma_max=80.0, sigma_data=0.5, stage_index=3, guided=False)
    assert s3.disc.rec is not None and s3.net.output_resolution == 64
    no_rec = dataclasses.replace(smoke, loss=dataclasses.replace(smoke.loss, w_rec=0.0))
    assert GrowStage(no_rec, g1, cfg1, sigma_max=80.0, sigma_data=0.5, stage_index=2, guided=False).phases == ("adv",)


def test_train_loop_gives_frozen_parameters_no_state(tmp_path):
    """The one loop: frozen parameters of any stage get no optimiser or EMA state and do not move."""
    src, cfg = _net()
    stage = GrowStage(dataclasses.replace(PRESETS["smoke"].grow, loss=dataclasses.replace(
        PRESETS["smoke"].grow.loss, w_adv=0.0)), src, cfg, sigma_max=80.0, sigma_data=0.5, stage_index=1, guided=False)
    before = {n: p.detach().clone() for n, p in stage.net.named_parameters()}
    photos = build_dataset("photos", 16)
    x, y = pair_batch(photos, range(8))
    z = 80 * torch.randn(8, 3, BASE, BASE, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, y, z, torch.ones(8))
    tcfg = TrainConfig(batch=4, steps=2, lr=1e-3, lr_warmup=0, snapshot_every=2, log_every=1)
    train(stage=stage, cfg=tcfg, out_dir=tmp_path, config_dict={"train": to_dict(tcfg)}, dataset=data)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    frozen = {n for n, p in stage.net.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(state["ema"])
    assert all(torch.equal(before[n], state["net"][n]) for n in frozen)
    assert all(not torch.equal(before[n], state["net"][n]) for n in state["ema"]
               if n.endswith("out_layers.3.weight") and n.startswith("output_blocks.4"))


# ---------------------------------------------------------------------------------------------
# Editing (pagoda.edit).

def test_psnr_and_slerp():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # MSE 100 -> 10 log10(255^2 / 100)
    p = psnr_fn(b, a)
    assert p[0].item() == pytest.approx(10 * math.log10(255 ** 2 / 100)) and math.isinf(p[1].item())
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    b[1, :, 2:] = 50  # outside the mask: no error counted
    assert math.isinf(psnr_fn(b, a, mask)[1].item())
    u, v = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.equal(slerp(u, v, 0.0), u) and torch.allclose(slerp(u, v, 1.0), v, atol=1e-6)
    mid = slerp(u, v, 0.5)
    assert mid.norm().item() == pytest.approx(3.0) and mid[0].item() == pytest.approx(mid[1].item())


def _edit(task, gen, files, out, *more):
    return run_cli(main, ["edit", task, "--generator", str(gen), "--teacher", files["teacher"], "--data", files["data"],
                          "--items", "0-2", "-o", str(out), *map(str, more)])


def test_edit_tasks_write_grids_and_numbers(files, tmp_path, capsys):
    grown = tmp_path / "g16"
    assert _grow(files["g"], files["pairs"], grown, "--set", "train.steps=1") == 0
    cases = [("reconstruct", files["g"], ("psnr_db", "d")), ("superres", grown / "G.safetensors",
                                                             ("psnr_db", "psnr_bicubic_db")),
             ("inpaint", files["g"], ("psnr_hole_db", "psnr_hole_grey_db")),
             ("transfer", files["g"], ("psnr_db",)), ("interpolate", files["g"], ("psnr_endpoints_db",))]
    for task, gen, keys in cases:
        more = {"transfer": ["--to-class", "3"], "interpolate": ["--frames", "3"], "inpaint": ["--iterations", "2"]}
        out = tmp_path / f"{task}.png"
        args = more.get(task, [])
        if task == "interpolate":
            code = run_cli(main, ["edit", task, "--generator", str(gen), "--teacher", files["teacher"], "--data",
                                  files["data"], "--items", "0,5", "-o", str(out), *args])
        else:
            code = _edit(task, gen, files, out, *args)
        assert code == 0, capsys.readouterr().err
        numbers = json.loads(out.with_suffix(".json").read_text())
        assert all(k in numbers for k in keys) and numbers["task"] == task
        from PIL import Image
        w, h = Image.open(out).size
        size = 16 if task == "superres" else 8
        cols = {"reconstruct": 2, "superres": 3, "inpaint": 3, "transfer": 3, "interpolate": 5}[task]
        rows = 1 if task == "interpolate" else 3
        assert (w, h) == (cols * size, rows * size)


@pytest.mark.parametrize("case", ["mask_size", "superres_base", "other_teacher", "to_class", "item_range",
                                  "missing_teacher", "mask_no_hole", "mask_grey", "mask_all_hole", "no_to_class",
                                  "other_tasks_option"])
def test_edit_bad_inputs(case, files, tmp_path, capsys):
    out = tmp_path / "e.png"
    if case == "mask_size":
        from PIL import Image
        Image.new("L", (5, 5), 255).save(tmp_path / "m.png")
        code, needle = _edit("inpaint", files["g"], files, out, "--mask", tmp_path / "m.png"), "is 5x5"
    elif case == "superres_base":
        code, needle = _edit("superres", files["g"], files, out), "needs a grown G"
    elif case == "other_teacher":
        other = save_tiny_teacher(tmp_path / "other.safetensors", seed=9)
        code = run_cli(main, ["edit", "reconstruct", "--generator", files["g"], "--teacher", other, "--data",
                              files["data"], "-o", str(out)])
        needle = "not the teacher"
    elif case == "to_class":
        code, needle = _edit("transfer", files["g"], files, out, "--to-class", "99"), "--to-class 99"
    elif case == "other_tasks_option":
        code, needle = _edit("reconstruct", files["g"], files, out, "--frames", "4"), "--frames: option(s) of another"
    elif case == "no_to_class":
        code, needle = _edit("transfer", files["g"], files, out), "needs --to-class"
    elif case == "missing_teacher":
        code = run_cli(main, ["edit", "reconstruct", "--generator", files["g"], "--teacher", str(tmp_path / "nope"),
                              "--data", files["data"], "-o", str(out)])
        needle = "does not exist"
    elif case == "mask_no_hole":
        from PIL import Image
        Image.new("L", (8, 8), 255).save(tmp_path / "m.png")
        code, needle = _edit("inpaint", files["g"], files, out, "--mask", tmp_path / "m.png"), "keeps every pixel"
    elif case in ("mask_grey", "mask_all_hole"):  # mid-grey counts as white (keep); all black keeps nothing
        from PIL import Image
        Image.new("L", (8, 8), 128 if case == "mask_grey" else 0).save(tmp_path / "m.png")
        code = _edit("inpaint", files["g"], files, out, "--mask", tmp_path / "m.png")
        needle = "every value is > 127" if case == "mask_grey" else "keeps no pixel"
    else:
        code = run_cli(main, ["edit", "reconstruct", "--generator", files["g"], "--teacher", files["teacher"],
                              "--data", files["data"], "--items", "0,400", "-o", str(out)])
        needle = "out of range"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_drift_is_small_for_a_fresh_grown_g_and_large_for_an_unrelated_one():
    src, cfg = _net(scale=0.2)
    grown, _ = grow_network(src, cfg)
    other, _ = _net(seed=7, scale=0.2)
    other_grown, _ = grow_network(other, cfg)

    def gen(net, res, name):
        return OneStepGenerator(net, resolution=res, num_classes=16, noise_resolution=BASE, name=name)
    low = gen(src, BASE, "g8")
    near = drift(low, gen(grown, 16, "g16"), range(32))
    far = drift(low, gen(other_grown, 16, "other16"), range(32))
    assert near["drift_rms"] * 3 < far["drift_rms"] and near["drift_psnr_db"] > far["drift_psnr_db"]
    # the border profile: an exact (skip) start differs from up(G) nowhere; the kept head's 3x3 conv differs
    # most in the outermost ring, where it reads the zero padding
    exact, _ = grow_network(src, cfg, start="skip")
    assert drift(low, gen(exact, 16, "s16"), range(32))["ring_rms"] == [0.0] * 5
    rings = near["ring_rms"]
    assert len(rings) == 5 and near["frame_rms"] == rings[0] > 0
    with pytest.raises(UserError, match="grown from it"):
        drift(low, gen(grown, 16, "g16").__class__(grown, resolution=16, num_classes=16, noise_resolution=16), [0])


# ---------------------------------------------------------------------------------------------
# The guided G's pulls (bench.pulls): each term's gradient and D's view at one w.

def test_pulls_of_a_guided_run_and_its_bad_inputs(files, tmp_path, capsys):
    from bench.pulls import main as pulls_main

    run = str(Path(files["gg"]).parent)
    out = tmp_path / "pulls.jsonl"
    assert run_cli(pulls_main, [run, "--w", "2", "--band", "0.3", "--batch", "4", "--batches", "2", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    norms = {r["extra"]["term"]: r["value"] for r in rows if r["metric"] == "grad_norm"}
    cos = {r["extra"]["pair"]: r["value"] for r in rows if r["metric"] == "grad_cosine"}
    logits = {r["extra"]["images"]: r["value"] for r in rows if r["metric"] == "d_logit"}
    assert set(norms) == {"rec", "cfg", "adv"} and all(0 < v < math.inf for v in norms.values()), norms
    assert set(cos) == {"rec/cfg", "rec/adv", "cfg/adv"} and all(-1 <= v <= 1 for v in cos.values()), cos
    assert set(logits) == {"real", "teacher", "generator"} and all(math.isfinite(v) for v in logits.values())
    assert all(r["guidance"] == 2.0 and r["num_samples"] == 8 for r in rows)
    capsys.readouterr()
    started = tmp_path / "started"  # a run folder before its first step: config.json, no state.pt
    started.mkdir()
    (started / "config.json").write_text((Path(run) / "config.json").read_text())
    replaced = tmp_path / "replaced"  # the run, its config naming another teacher than the one it was made from
    replaced.mkdir()
    config = json.loads((Path(run) / "config.json").read_text())
    config["teacher"] = save_tiny_teacher(tmp_path / "other-teacher.safetensors", seed=5)
    (replaced / "config.json").write_text(json.dumps(config))
    (replaced / "state.pt").write_bytes((Path(run) / "state.pt").read_bytes())
    for argv, needle in (([str(Path(files["g"]).parent)], "unguided pairs"),
                         ([run, "--w", "5", "--band", "10"], "outside the run's guidance range [1, 2]"),
                         ([run, "--w", "1.5", "--band", "0"], "no pair item"),
                         ([str(tmp_path)], "no readable config.json"), ([str(started)], "holds no state.pt"),
                         ([str(replaced)], "inputs.teacher_sha256 differs")):
        assert run_cli(pulls_main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
