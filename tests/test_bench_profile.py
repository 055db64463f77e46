"""bench.profile and bench.compare: counted NFE of every kind of generator, the shape of the cost rows, the
tensor-memory and FLOP counts against hand-computed values, and the CLI's sweep and bad inputs.

Timings are never asserted (only that they are positive and ordered as medians and p90s must be)."""

from dataclasses import replace

import pytest
import torch

from bench.compare import main as compare_main
from bench.profile import (
    TensorMemory,
    count_nfe,
    flop_counter,
    flops_per_image,
    network_of,
    percentile,
    profile,
    sampler_call,
)
from bench.train_cost import main as train_cost_main
from bench.train_cost import nfe_flops, step_flops
from eval.ref import main as ref_main
from eval.rows import make_row
from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS
from pagoda.data import PHOTO_CLASSES, PhotosDataset
from pagoda.errors import UserError, run_cli
from pagoda.generator import load_generator
from pagoda.networks.domain import DomainNet, save_domain_net
from pagoda.networks.unet import UNet
from pagoda.rows import ROW_KEYS, read_rows, row_key
from pagoda.stages.teacher import TeacherStage

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(cfg, **changes):
    torch.manual_seed(1)
    return UNet(**{**{k: getattr(cfg.network, k) for k in cfg.network.__dataclass_fields__}, **changes})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A smoke-sized teacher (CFG-capable), a one-step G, a guidance-conditioned G and a 2-step PD student."""
    folder = tmp_path_factory.mktemp("ckpts")
    cfg = PRESETS["smoke"].teacher
    paths = {name: folder / f"{name}.safetensors" for name in ("teacher", "G", "Gw", "pd-2")}
    save_model(paths["teacher"], _unet(cfg).state_dict(),
               model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    save_model(paths["G"], _unet(cfg).state_dict(),
               model_meta(kind="pagoda", stage="distill", config=cfg, step=0, ema_rate=0.999))
    gcfg = replace(cfg, network=replace(cfg.network, guidance_embed=True))
    save_model(paths["Gw"], _unet(gcfg).state_dict(),
               model_meta(kind="pagoda", stage="distill", config=gcfg, step=0, ema_rate=0.999,
                          extra=dict(guidance_range=[1.0, 3.0])))
    save_model(paths["pd-2"], _unet(cfg).state_dict(),
               model_meta(kind="pd", stage="pd-2", config=cfg, step=0, ema_rate=0.0,
                          extra=dict(method="pd", pd=dict(steps=2, formulation="edm"))))
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("sampler,steps,guidance,nfe", [
    ("euler", 4, None, 4), ("euler", 4, 2.0, 8), ("heun", 4, None, 7), ("heun", 3, 2.0, 10),
    ("dpmpp2m", 5, None, 5), ("dpmpp2m:loguniform", 3, 1.5, 6), ("ddim", 2, None, 2)])
def test_counted_nfe_of_the_teacher_solvers(ckpts, sampler, steps, guidance, nfe):
    # Euler-N = N, Heun-N = 2N - 1, DPM-Solver++-N = N, doubled under CFG: counted, and equal to the declared.
    gen = load_generator(ckpts["teacher"], sampler=sampler, steps=steps)
    assert count_nfe(gen, guidance=guidance, batch=3) == nfe == gen.nfe_for(guidance)


def test_counted_nfe_of_one_step_and_pd(ckpts):
    assert count_nfe(load_generator(ckpts["G"])) == 1
    assert count_nfe(load_generator(ckpts["Gw"]), guidance=2.5) == 1  # w is an input, not a second call
    assert count_nfe(load_generator(ckpts["pd-2"])) == 2
    # The control: a sampler that secretly calls the network twice per step is caught (the count is not declared).
    gen = load_generator(ckpts["teacher"], sampler="euler", steps=4)
    inner = gen.sampler_fn
    gen.sampler_fn = lambda d, x, s, **kw: inner(d, inner(d, x, s, **kw) * 0 + x, s, **kw)
    assert count_nfe(gen) == 8 != gen.nfe


def test_tensor_memory_counts_live_storages():
    # 1 MiB + 2 MiB live, an in-place result and a view add nothing, a storage stays live while a view of it
    # does (so the next 1 MiB makes a peak of 4 MiB over the base), and freed storages leave the count.
    mib = 2**20 // 4
    with TensorMemory(base=100) as mode:
        a = torch.ones(mib)
        b = torch.ones(2 * mib)
        b.add_(1)
        view = a[: mib // 2].view(-1)
        del a
        c = torch.ones(mib)  # a is still alive through its view
        del view, b, c
        d = torch.ones(mib)
    assert mode.peak == 100 + 4 * 2**20
    assert d.sum() == mib


def test_flops_match_a_direct_forward(ckpts):
    g = load_generator(ckpts["G"])
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network_of(g)(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert flops_per_image(g) == counter.get_total_flops() > 0
    heun = load_generator(ckpts["teacher"], sampler="heun", steps=3)
    assert flops_per_image(heun) == pytest.approx(5 * counter.get_total_flops(), rel=1e-9)  # 2*3 - 1 NFE


def test_profile_rows_have_a_stable_shape(ckpts):
    gen = load_generator(ckpts["G"])
    rows = profile(gen, batches=[1, 4], reps=30, warmup=1, make_row=make_row, fields={"model": "G"})
    by = {(r["metric"], r["batch"]): r for r in rows}
    metrics = ("nfe", "latency_ms", "img_per_s", "peak_mem_mb", "gflops_per_image", "params")
    assert sorted(by) == sorted((m, b) for m in metrics for b in (1, 4))
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["model"] == "G" and r["method"] == "pagoda" and r["value"] > 0
        assert (r["device"], r["dtype"], r["extra"]["compile"]) == ("cpu", "float32", False)
        assert r["resolution"] == 8 and r["nfe"] == 1 and "threads" in r["extra"]["device_name"]
    for b in (1, 4):
        lat = by[("latency_ms", b)]
        assert lat["extra"]["p90_ms"] >= lat["value"] and lat["extra"]["reps"] == 30
        assert by[("img_per_s", b)]["value"] == pytest.approx(b / lat["value"] * 1e3)
    params = sum(p.numel() for p in network_of(gen).parameters())
    assert by[("params", 1)]["value"] == params
    # Weights are live throughout, and a bigger batch holds more activations at its peak.
    assert params * 4 / 2**20 < by[("peak_mem_mb", 1)]["value"] < by[("peak_mem_mb", 4)]["value"]
    assert by[("peak_mem_mb", 1)]["extra"]["mem_kind"] == "tensor_peak"


def test_percentile_and_reps(ckpts):
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)  # numpy's linear rule
    assert percentile([5.0], 90) == 5.0
    with pytest.raises(UserError, match="at least 30"):
        profile(load_generator(ckpts["G"]), batches=[1], reps=10, make_row=make_row)


def test_sampler_call_is_the_generators_sample(ckpts):
    gen = load_generator(ckpts["G"])
    assert torch.equal(sampler_call(gen, 3, seed=5)(), gen.sample(torch.arange(5, 8)))


@pytest.fixture(scope="module")
def domain_ref(tmp_path_factory):
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("weights")
    save_domain_net(DomainNet(len(PHOTO_CLASSES)).eval(), weights / "domain-photos.safetensors", {})
    ref = weights.parent / "photos-8.npz"
    argv = ["photos:train:8", "-o", str(ref), "--extractor", "domain", "--weights-dir", str(weights),
            "--max-samples", "200", "--batch", "100"]
    assert run_cli(ref_main, argv) == 0
    return weights, ref


def test_compare_sweeps_cost_and_quality(ckpts, domain_ref, tmp_path, capsys):
    weights, ref = domain_ref
    out = tmp_path / "bench.jsonl"
    argv = ["--ckpt", ckpts["teacher"], "--ckpt", ckpts["G"], "--ckpt", ckpts["pd-2"], "--sampler", "euler,heun",
            "--steps", "2", "--batch", "1,2", "--reps", "30", "--warmup", "1", "-o", str(out), "--quality", str(ref),
            "--extractor", "domain", "--weights-dir", str(weights), "--num-samples", "16", "--allow-small"]
    assert run_cli(compare_main, argv) == 0
    rows = read_rows(out)
    settings = {(r["model"], r["sampler"], r["steps"]) for r in rows}
    assert settings == {(ckpts["teacher"], "euler", 2), (ckpts["teacher"], "heun", 2), (ckpts["G"], None, None),
                        (ckpts["pd-2"], "euler", 2)}
    nfe = {(r["model"], r["sampler"]): r["value"] for r in rows if r["metric"] == "nfe"}
    assert nfe == {(ckpts["teacher"], "euler"): 2, (ckpts["teacher"], "heun"): 3, (ckpts["G"], None): 1,
                   (ckpts["pd-2"], "euler"): 2}
    # Each setting has its cost rows per batch and one quality row, under the same setting keys.
    for s in settings:
        mine = [r for r in rows if (r["model"], r["sampler"], r["steps"]) == s]
        assert sorted(r["batch"] for r in mine if r["metric"] == "latency_ms") == [1, 2]
        (fid,) = [r for r in mine if r["metric"] == "fid"]
        assert fid["num_samples"] == 16 and fid["nfe"] == nfe[s[0], s[1]]
    assert "rows ->" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["reps", "warmup", "cuda", "fp16-cpu", "metrics-without-quality", "missing",
                                  "not-a-generator", "guidance-range", "batch", "device", "empty-batch",
                                  "extractor-without-quality", "unwritable", "quality-too-few"])
def test_compare_bad_input(case, ckpts, domain_ref, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    base = ["--ckpt", ckpts["G"], "-o", str(out)]
    weights, ref = domain_ref
    argv = {"reps": base + ["--reps", "5"], "warmup": base + ["--warmup", "0"],
            "cuda": base + ["--device", "cuda"], "fp16-cpu": base + ["--dtype", "float16", "--device", "cpu"],
            "metrics-without-quality": base + ["--metrics", "fid,pr"],
            "missing": ["--ckpt", str(tmp_path / "nope.safetensors"), "-o", str(out)],
            "not-a-generator": ["--ckpt", str(tmp_path), "-o", str(out)],
            "guidance-range": ["--ckpt", ckpts["Gw"], "--guidance", "5", "-o", str(out)],
            "batch": base + ["--batch", "0"], "device": base + ["--device", "tpu"],
            "empty-batch": base + ["--batch", ","], "extractor-without-quality": base + ["--extractor", "domain"],
            "unwritable": ["--ckpt", ckpts["G"], "-o", "/proc/pagoda-bench.jsonl"],
            # fewer samples than feature dimensions, without --allow-small: refused before anything is measured
            "quality-too-few": base + ["--quality", str(ref), "--extractor", "domain", "--weights-dir", str(weights),
                                       "--num-samples", "16"],
            }[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert run_cli(compare_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


def test_train_cost_rows(tmp_path, capsys):
    out = tmp_path / "cost.jsonl"
    argv = ["--preset", "smoke", "--factors", "1,2,4", "--time-up-to", "16", "--reps", "1", "--batch", "2",
            "-o", str(out)]
    assert run_cli(train_cost_main, argv) == 0
    rows = read_rows(out)
    flops = {r["extra"]["factor"]: r for r in rows if r["metric"] == "train_step_gflops"}
    ms = {r["extra"]["factor"]: r for r in rows if r["metric"] == "train_step_ms"}
    assert sorted(flops) == [1, 2, 4] and sorted(ms) == [1, 2]  # 4 x 8 px = 32 > --time-up-to 16: FLOPs only
    assert [flops[f]["resolution"] for f in (1, 2, 4)] == [8, 16, 32]
    # Convolutions grow with the pixel count (4x per 2x), attention (kept at the same depth) faster.
    assert 4 <= flops[2]["extra"]["ratio_vs_base"] and 16 <= flops[4]["extra"]["ratio_vs_base"]
    assert flops[4]["extra"]["ratio_vs_base"] / flops[2]["extra"]["ratio_vs_base"] >= 4
    assert ms[2]["extra"]["ratio_vs_base"] == ms[2]["value"] / ms[1]["value"]  # never a timing assertion
    assert ms[1]["extra"]["per_image_ms"] == ms[1]["value"] / 2
    kinds = {r["extra"]["kind"]: r for r in rows if r["metric"] == "pairs_cost_ratio"}
    assert set(kinds) == {"flops", "time"} and kinds["flops"]["nfe"] == 78
    assert kinds["flops"]["extra"]["items"] == 2 * len(PhotosDataset(8, "train"))
    assert kinds["flops"]["value"] > 0 and kinds["time"]["value"] > 0


def test_training_flops_on_fake_tensors_equal_real_ones():
    # The fake-tensor count (any size, no memory) equals a count on real tensors; backward ~ 2x forward.
    cfg = PRESETS["smoke"].teacher
    torch.manual_seed(0)
    stage = TeacherStage(cfg)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with counter:
        loss, _ = stage.step(stage.net, [torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)],
                             None)
        loss.backward()
    assert step_flops(cfg) == counter.get_total_flops() / 2
    assert 2.5 < step_flops(cfg) / nfe_flops(cfg) < 3.5


@pytest.mark.parametrize("argv", [["--factors", "2,4"], ["--preset", "imagenet64", "--time-up-to", "1"],
                                  ["--preset", "nope"]])
def test_train_cost_bad_input(argv, tmp_path, capsys):
    out = tmp_path / "cost.jsonl"
    assert run_cli(train_cost_main, argv + ["-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


def test_train_cost_attention_choice(tmp_path):
    # Attention kept at the base's resolutions costs less at 4x than attention at the same depths (whose token
    # count grows 16x), and the rows say which was measured.
    ratios = {}
    for att in ("depth", "resolution"):
        out = tmp_path / f"{att}.jsonl"
        argv = ["--preset", "smoke", "--factors", "1,4", "--time-up-to", "1", "--attention", att, "-o", str(out)]
        assert run_cli(train_cost_main, argv) == 0
        (row,) = [r for r in read_rows(out) if r["metric"] == "train_step_gflops" and r["extra"]["factor"] == 4]
        assert row["extra"]["attention"] == att
        ratios[att] = row["extra"]["ratio_vs_base"]
    assert ratios["resolution"] < ratios["depth"]


def test_tensor_memory_survives_address_reuse():
    # A freed storage's address is routinely handed to the next allocation; the new storage must still count.
    mib = 2**20 // 4
    with TensorMemory() as mode:
        for _ in range(5):
            a = torch.ones(mib)
            del a
        b = torch.ones(mib)
        c = torch.ones(mib)
    assert mode.peak == 2 * 2**20 and b.sum() + c.sum() == 2 * mib


def test_flop_counter_counts_attention():
    # The fused CPU attention kernels have no FLOP formula (they would count 0): counted on the math backend,
    # q k^T and the weighted sum are 2 * 2 * B * H * L^2 * d FLOPs.
    q = torch.randn(1, 4, 64, 32)
    with flop_counter() as counter, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * 2 * 4 * 64 * 64 * 32


def test_cost_rows_of_different_batches_are_different_measurements(ckpts):
    rows = profile(load_generator(ckpts["G"]), batches=[1, 2], reps=30, warmup=1, make_row=make_row,
                   fields={"model": "G"})
    assert len({row_key(r) for r in rows}) == len(rows)  # eval.gate and the reports never merge them
