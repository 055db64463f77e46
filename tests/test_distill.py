"""Stage 2b on a tiny teacher and 32 pairs: G starts as the teacher exactly, trains through the one loop
(resume bitwise), loads as a one-step Generator that eval measures unchanged, and refuses bad inputs."""

import dataclasses
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_pairs import _save_teacher as save_tiny_teacher

from eval.fid import main as fid_main
from eval.ref import main as ref_main
from pagoda.__main__ import main
from pagoda.checkpoint import load_teacher
from pagoda.config import PRESETS
from pagoda.data import build_dataset, save_npz
from pagoda.diffusion import edm_scalings
from pagoda.dist import shutdown
from pagoda.errors import run_cli
from pagoda.generator import OneStepGenerator, load_generator
from pagoda.networks.domain import DomainNet, save_domain_net
from pagoda.pairs import make_pairs, pair_batch
from pagoda.stages.distill import DistillStage

RES = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny teacher, 16 labelled photo crops at 8 px (32 items with flips) and their pairs."""
    d = tmp_path_factory.mktemp("distill")
    photos = build_dataset("photos", RES)
    x, y = pair_batch(photos, range(0, 2 * len(photos), 2 * len(photos) // 16))
    save_npz(d / "data.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    teacher = save_tiny_teacher(d / "teacher.safetensors")
    make_pairs(teacher, str(d / "data.npz"), d / "pairs", shard_size=8, batch=8, progress=False)
    other = save_tiny_teacher(d / "other.safetensors", seed=5)
    return {"dir": d, "teacher": teacher, "other": other, "pairs": str(d / "pairs"), "data": str(d / "data.npz")}


def _distill(files, out, *more):
    return run_cli(main, ["distill", "--preset", "smoke", "--teacher", files["teacher"], "--pairs", files["pairs"],
                          "--out", str(out), *map(str, more)])


def test_g_starts_as_the_teacher_raw_output_at_sigma_max(files):
    teacher = load_teacher(files["teacher"])
    net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
    stage = DistillStage(PRESETS["smoke"].distill, net, diffusion, network=meta["network"])
    z = 80 * torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 5, 15])
    sigma = torch.full((4,), 80.0)
    _, _, c_in, c_noise = edm_scalings(sigma, diffusion.sigma_data)
    with torch.no_grad():
        raw = net(c_in.view(-1, 1, 1, 1) * z, c_noise, y, None)
        assert torch.equal(stage.G(stage.net, z, y), raw.float())  # bit for bit


def test_distill_trains_resumes_bitwise_and_loads_as_one_step_generator(files, tmp_path):
    assert _distill(files, tmp_path / "a", "--set", "train.steps=4", "--set", "train.snapshot_every=2") == 0
    b = tmp_path / "b"
    assert _distill(files, b, "--set", "train.steps=2", "--set", "train.snapshot_every=2") == 0
    cfg = (b / "config.json").read_text().replace('"steps": 2', '"steps": 4')
    (b / "config.json").write_text(cfg)  # the same run, continued to 4 steps
    assert _distill(files, b, "--set", "train.steps=4", "--set", "train.snapshot_every=2") == 0
    ga, gb = (load_file(str(p / "G.safetensors")) for p in (tmp_path / "a", b))
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)  # bitwise (meta has a time)
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (tmp_path / "a", b))
    assert all(torch.equal(sa["disc"][k], sb["disc"][k]) for k in sa["disc"])
    g = load_generator(tmp_path / "a" / "G.safetensors")
    assert isinstance(g, OneStepGenerator) and g.nfe == 1 and g.method == "pagoda" and g.sampler is None
    x = g.sample(torch.arange(6))
    assert x.dtype == torch.uint8 and x.shape == (6, 3, RES, RES)
    assert torch.equal(x, torch.cat([g.sample(torch.arange(3)), g.sample(torch.arange(3, 6))]))


def test_eval_measures_the_one_step_generator(files, tmp_path):
    assert _distill(files, tmp_path / "g", "--set", "train.steps=2") == 0
    torch.manual_seed(0)
    save_domain_net(DomainNet(16).eval(), tmp_path / "domain-photos.safetensors", {})
    common = ["--extractor", "domain", "--weights-dir", str(tmp_path), "--allow-small"]
    assert run_cli(ref_main, [files["data"], "-o", str(tmp_path / "ref.npz"), *common]) == 0
    out = tmp_path / "r.jsonl"
    assert run_cli(fid_main, ["--ckpt", str(tmp_path / "g" / "G.safetensors"), "--ref", str(tmp_path / "ref.npz"),
                              "--num-samples", "16", "--out", str(out), *common]) == 0
    row = json.loads(out.read_text())
    assert row["method"] == "pagoda" and row["nfe"] == 1 and row["sampler"] is None and row["value"] > 0
    # the row says what training the model had: steps, images seen, displacement in lr units (RAdam, 2 steps: ~0)
    assert row["extra"]["train_step"] == 2 and row["extra"]["train_images"] == 2 * PRESETS["smoke"].distill.train.batch
    assert 0 <= row["extra"]["displacement_lr"] < 2


def test_l_dstl_variant_runs(files, tmp_path):
    assert _distill(files, tmp_path / "d", "--set", "train.steps=2", "--set", "loss.kind=dstl",
                    "--set", "loss.dstl_steps=2") == 0


@pytest.mark.parametrize("case", ["other_teacher", "generator_as_teacher", "teacher_as_generator_source",
                                  "missing_pairs", "no_teacher", "guidance_of_unguided_g"])
def test_bad_inputs(case, files, tmp_path, capsys):
    out = tmp_path / "g"
    if case == "other_teacher":
        code = run_cli(main, ["distill", "--preset", "smoke", "--teacher", files["other"], "--pairs", files["pairs"],
                              "--out", str(out)])
        needle = "not by this teacher"
    elif case == "generator_as_teacher":
        assert _distill(files, tmp_path / "g0", "--set", "train.steps=1") == 0
        code = run_cli(main, ["distill", "--preset", "smoke", "--teacher", str(tmp_path / "g0" / "G.safetensors"),
                              "--pairs", files["pairs"], "--out", str(out)])
        needle = "'teacher' checkpoint is needed"
    elif case == "teacher_as_generator_source":
        code = run_cli(main, ["pairs", "--teacher", files["teacher"], "--data", files["data"], "--out",
                              str(tmp_path / "p2"), "--shard-size", "8", "--batch", "8"])
        assert code == 0
        capsys.readouterr()
        code = run_cli(main, ["sample", "--ckpt", files["teacher"], "--seeds", "0-1", "--steps", "1", "-o",
                              str(tmp_path / "s.png")])
        assert code == 0  # a teacher samples as a diffusion generator; the reverse is refused below
        capsys.readouterr()
        assert _distill(files, tmp_path / "g1", "--set", "train.steps=1") == 0
        capsys.readouterr()
        code = run_cli(main, ["sample", "--ckpt", str(tmp_path / "g1" / "G.safetensors"), "--seeds", "0-1",
                              "--steps", "4", "-o", str(tmp_path / "t.png")])
        needle = "one-step generator"
    elif case == "guidance_of_unguided_g":  # its own reason (no guided pairs), not "unconditional or no dropout"
        assert _distill(files, tmp_path / "g1", "--set", "train.steps=1") == 0
        capsys.readouterr()
        code = run_cli(main, ["sample", "--ckpt", str(tmp_path / "g1" / "G.safetensors"), "--seeds", "0-1",
                              "--guidance", "2", "-o", str(tmp_path / "t.png")])
        needle = "trained without guidance"
    elif case == "missing_pairs":
        code = run_cli(main, ["distill", "--preset", "smoke", "--teacher", files["teacher"], "--pairs",
                              str(tmp_path / "nope"), "--out", str(out)])
        needle = "nope"
    else:
        code = run_cli(main, ["distill", "--preset", "smoke", "--pairs", files["pairs"], "--out", str(out)])
        needle = "--teacher"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (out / "G.safetensors").exists()


def test_smoke_and_photos_presets_resolve():
    for name in ("smoke", "photos", "imagenet64"):
        cfg = PRESETS[name].distill
        assert cfg.loss.kind == "rec" and cfg.disc.lr > 0
    paper = PRESETS["imagenet64"].distill
    assert (paper.train.batch, paper.train.lr, paper.disc.lr, paper.train.ema_rate, paper.loss.w_adv) == \
        (96, 8e-6, 2e-3, 0.999, 0.2)
    assert paper.loss.backbone == paper.disc.backbone == "paper"
    assert dataclasses.replace(paper).train.dtype == "float16"


def _ddp_distill(rank: int, init_file: str, files: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert _distill(files, out, "--set", "train.steps=3", "--set", "train.log_every=1") == 0
    finally:
        shutdown()


def test_two_gloo_processes_equal_one_process(files, tmp_path):
    """Two processes of one micro-batch each == one process accumulating the same two micro-batches: the same
    data, noise and DiffAugment draws (per micro-batch), D gradients averaged, spectral norms per step."""
    mp.spawn(_ddp_distill, args=(str(tmp_path / "init"), files, str(tmp_path / "two")), nprocs=2, join=True)
    assert _distill(files, tmp_path / "one", "--set", "train.steps=3", "--set", "train.log_every=1",
                    "--set", "train.micro_batch=4") == 0
    one, two = (torch.load(tmp_path / p / "state.pt", weights_only=True) for p in ("one", "two"))
    for part in ("net", "ema", "disc"):
        for k in one[part]:
            if one[part][k].is_floating_point() and "running_" not in k:  # BN running stats: per process
                torch.testing.assert_close(one[part][k], two[part][k], rtol=0, atol=1e-5, msg=f"{part}.{k}")
    rows = [[json.loads(line) for line in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in ("one", "two")]
    assert [r["l_rec"] for r in rows[1]] == pytest.approx([r["l_rec"] for r in rows[0]], rel=1e-5)
