"""Issue 27: the protocol in every row, eval.gate refusing other protocols, eval.run --repeat, FDr_k, eval.diff.

Invariants: a checkpoint's row leaves no protocol field unknown; --repeat K's rows equal K single runs on the same
seed ranges; the validation set scores FDr 1 in each space and FDr_k equals two hand computations (a control: the
references swapped moves it far); eval.diff names the one differing field and --measure accounts for the whole gap;
two rows of one protocol exit 0; a published row's unknown fields are listed.
"""

import json
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from eval.diff import main as diff_main
from eval.extractors import get_extractor
from eval.gate import main as gate_main
from eval.metrics import frechet_distance
from eval.ref import main as ref_main
from eval.run import main as run_main
from eval.stats import load_reference
from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS
from pagoda.errors import run_cli
from pagoda.generator import load_generator
from pagoda.networks.unet import UNet
from pagoda.rows import PROTOCOL, protocol, protocol_unknown, read_rows
from reports.paper import paper_rows, published_key
from reports.rows import latest
from reports.tables import MISSING, QUALITY, quality_table

N = 150  # > the domain net's 128 feature dimensions: the covariances are full rank


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The smoke teacher (16 classes, label dropout: CFG), one Euler step, random weights."""
    cfg = PRESETS["smoke"].teacher
    cfg = replace(cfg, sample=replace(cfg.sample, sampler="euler", steps=1))
    torch.manual_seed(1)
    net = UNet(**{k: getattr(cfg.network, k) for k in cfg.network.__dataclass_fields__})
    path = tmp_path_factory.mktemp("ckpt") / "teacher.safetensors"
    save_model(path, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    return str(path)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, domain_weights):
    """Training (photos:train:8) and validation (photos:heldout:8) statistics in the domain space, and training
    statistics at another resolution (photos:train:16)."""
    folder = tmp_path_factory.mktemp("refs")
    out = {}
    for split, spec in (("train", "photos:train:8"), ("heldout", "photos:heldout:8"), ("other_res", "photos:train:16")):
        out[split] = str(folder / f"{split}.npz")
        assert run_cli(ref_main, [spec, "-o", out[split], "--extractor", "domain", "--weights-dir",
                                  str(domain_weights), "--store-features", "0"]) == 0
    return out


def _eval(tmp_path, name, *argv):
    out = tmp_path / f"{name}.jsonl"
    assert run_cli(run_main, [*argv, "-o", str(out), "--batch", "64"]) == 0
    return read_rows(out)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err[0]


# ---------------------------------------------------------------------------------------------
# The protocol in rows, and the gate.


def test_checkpoint_rows_leave_no_protocol_field_unknown(ckpt, refs, domain_weights, tmp_path):
    rows = _eval(tmp_path, "r", "--ckpt", ckpt, "--ref", refs["train"], "--extractor", "domain", "--metrics", "fid",
                 "--num-samples", str(N), "--seed", "7", "--guidance", "1,2", "--weights-dir", str(domain_weights))
    plain, guided = rows
    assert protocol_unknown(plain) == [] and protocol_unknown(guided) == []
    p = protocol(plain)
    assert p["reference"] == "photos:train:8" and "/" not in p["reference"]  # a name, not a path
    assert p["reference_sha256"] == load_reference(refs["train"]).stats_sha256()
    assert (p["uint8"], p["feature_dtype"], p["seeds"], p["labels"]) == ("round", "float32", f"7-{7 + N - 1}", "seed")
    assert (p["selection"], p["space"], p["dtype"], p["trained_on_evaluator"]) == ("single", "pixel", "float32", False)
    assert p["guidance_cost"] == "none" and protocol(guided)["guidance_cost"] == "x2"  # a teacher's CFG: 2 rows / step
    assert {"torch", "numpy", "pagoda"} <= set(p["versions"])
    assert set(PROTOCOL) - {"estimator"} <= set(p)


def test_stats_digest_is_of_the_numbers(refs):
    ref = load_reference(refs["train"])
    digest = ref.stats_sha256()
    ref.mu = ref.mu.astype(np.float32).astype(np.float64)  # a float32 round trip moves the last bits
    assert ref.stats_sha256() != digest and load_reference(refs["train"]).stats_sha256() == digest


def test_gate_refuses_another_protocol_and_notes_rebuilt_references(tmp_path, capsys):
    row = {"model": "m", "method": "pagoda", "resolution": 8, "metric": "fid", "value": 10.0, "extractor": "domain",
           "reference": "photos:heldout:8", "num_samples": 500,
           "extra": {"labels": "seed", "seeds": "0-499", "uint8": "round", "reference_sha256": "a" * 64}}
    base, argv = tmp_path / "b.jsonl", ["--baseline", str(tmp_path / "b.jsonl"), "--results"]
    base.write_text(json.dumps(row) + "\n")
    for name, change, needle in (("labels", {"labels": "balanced"}, "labels 'seed' in the baseline vs 'balanced'"),
                                 ("seeds", {"seeds": "500-999"}, "seeds '0-499' in the baseline vs '500-999'"),
                                 ("uint8", {"uint8": "floor"}, "uint8 'round'")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(dict(row, extra={**row["extra"], **change})) + "\n")
        assert run_cli(gate_main, argv + [str(tmp_path / f"{name}.jsonl")]) == 2
        _one_error_line(capsys, "different protocol", needle)
    rebuilt = dict(row, extra={**row["extra"], "reference_sha256": "b" * 64})
    (tmp_path / "rebuilt.jsonl").write_text(json.dumps(rebuilt) + "\n")
    assert run_cli(gate_main, argv + [str(tmp_path / "rebuilt.jsonl")]) == 0
    assert "note: reference_sha256 differs" in capsys.readouterr().err
    # A baseline selected otherwise (min-of-3, or one range of --repeat) is refused by name, not shown MISSING + new.
    for change, needle in (({"selection": "min-of-3"}, "'min-of-3' in the baseline vs 'single'"),
                           ({"selection": "single", "repeat": 1}, "'single' (range 1 of --repeat) in the baseline")):
        base.write_text(json.dumps(dict(row, extra={**row["extra"], **change})) + "\n")
        assert run_cli(gate_main, argv + [str(tmp_path / "rebuilt.jsonl")]) == 2
        _one_error_line(capsys, "selected differently", needle)
    old = dict(row, extra={})  # a baseline from before the protocol fields: unknown there, so not compared
    base.write_text(json.dumps(old) + "\n")
    assert run_cli(gate_main, argv + [str(tmp_path / "labels.jsonl")]) == 0


# ---------------------------------------------------------------------------------------------
# --repeat K.


def test_repeat_agrees_with_single_runs(ckpt, refs, domain_weights, tmp_path):
    common = ["--ckpt", ckpt, "--ref", refs["train"], "--extractor", "domain", "--metrics", "fid,is",
              "--num-samples", str(N), "--weights-dir", str(domain_weights), "--estimator", "is_splits=5"]
    rows = _eval(tmp_path, "rep", *common, "--repeat", "3")
    singles = [_eval(tmp_path, f"s{k}", *common, "--seed", str(k * N)) for k in range(3)]
    for metric, best in (("fid", min), ("is", max)):
        each = [next(r for r in s if r["metric"] == metric) for s in singles]
        values = [r["value"] for r in each]
        reps = [r for r in rows if r["metric"] == metric and "repeat" in r["extra"]]
        assert [r["value"] for r in reps] == values and [r["extra"]["seeds"] for r in reps] == \
               [r["extra"]["seeds"] for r in each] == [f"{k * N}-{(k + 1) * N - 1}" for k in range(3)]
        agg = {r["extra"]["selection"]: r for r in rows if r["metric"] == metric and "repeat" not in r["extra"]}
        worst = "min-of-3" if metric == "fid" else "max-of-3"
        assert set(agg) == {"mean-of-3", worst} and all(r["extra"]["selection"] == "single" for r in reps)
        assert agg["mean-of-3"]["value"] == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert agg["mean-of-3"]["extra"]["repeat_std"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
        assert agg[worst]["value"] == best(values) and agg[worst]["extra"]["seeds"] == f"0-{3 * N - 1}"
    # The report keeps every one of them (reports.build showed one range and no mean or min), and a run of the same
    # model under another label policy on a line of its own, marked with the field that differs.
    balanced = _eval(tmp_path, "bal", *common, "--labels", "balanced")
    shown = latest(rows + balanced)
    assert len(shown) == len(rows) + len(balanced)
    table = quality_table(shown, [], QUALITY, "quality")
    lines = [line for _, body in table.sections for line in body]
    sel, fd = table.columns.index("Sel."), table.columns.index("FD-domain ↓")
    assert sorted(line[sel] for line in lines) == ["max-of-3", "mean-of-3", "min-of-3", "single", "single, range 0",
                                                   "single, range 1", "single, range 2"]
    cells, fids = {line[sel]: line[fd] for line in lines}, [next(r["value"] for r in s if r["metric"] == "fid")
                                                          for s in singles]
    assert [cells[f"single, range {k}"] for k in range(3)] == [f"{v:.2f}" for v in fids]
    assert cells["min-of-3"] == f"{min(fids):.2f}" and cells["mean-of-3"] == f"{np.mean(fids):.2f}"
    assert cells["max-of-3"] == MISSING  # IS's line: no FD there
    n = {line[sel]: line[table.columns.index("n")] for line in lines}  # an aggregate counts its K ranges
    assert n["mean-of-3"] == n["min-of-3"] == f"3x{N}" and n["single, range 1"] == f"{N:g}"
    marked = next(line for line in lines if line[sel] == "single")
    note = next(n for n in table.notes if n.startswith(marked[0].split()[-1] + ":"))
    assert "labels balanced (table: seed)" in note
    src = {line[sel]: line[0] for line in lines}  # an aggregate's seeds are the union of its ranges: not marked
    assert src["mean-of-3"] == src["min-of-3"] == src["single, range 0"] == "ours" and "*" in src["single, range 1"]


def test_repeat_on_a_sample_set_takes_disjoint_windows(refs, domain_weights, tmp_path, capsys):
    common = ["--ref", refs["train"], "--extractor", "domain", "--weights-dir", str(domain_weights)]
    rows = _eval(tmp_path, "w", "--images", "photos:heldout:8", *common, "--num-samples", "300", "--repeat", "2")
    reps = [r for r in rows if "repeat" in r["extra"]]
    assert [r["extra"]["seeds"] for r in reps] == ["0-299", "300-599"] and reps[0]["value"] != reps[1]["value"]
    capsys.readouterr()
    assert run_cli(run_main, ["--images", "photos:heldout:8", *common, "--num-samples", "600", "--repeat", "2",
                              "-o", str(tmp_path / "x.jsonl")]) == 2
    _one_error_line(capsys, "fewer than the 1200 that --repeat 2 needs")


def test_repeat_aggregates_average_or_select_the_per_range_extras():
    """A mean-of-K fdr row holds the mean of the ranges' fdr_spaces / fd_train, a min-of-K row the selected
    range's (it used to copy range 0's into both); entries equal in every range are kept as they are."""
    from eval.repeat import repeat_rows
    from eval.rows import make_row

    def fdr(i, value, ratio, fd):
        return [make_row(model="g", metric="fdr", value=value, extractor="domain", resolution=8,
                         extra=dict(seeds=f"{10 * i}-{10 * i + 9}", fdr_spaces={"domain": ratio},
                                    fd_train={"domain": fd}, fd_val={"domain": 2.0}, labels="seed"))]
    out = repeat_rows([fdr(0, 3.0, 3.0, 6.0), fdr(1, 1.0, 1.0, 2.0), fdr(2, 2.0, 2.0, 4.0)])
    mean = next(r for r in out if r["extra"].get("selection") == "mean-of-3")
    low = next(r for r in out if r["extra"].get("selection") == "min-of-3")
    assert mean["value"] == 2.0 and mean["extra"]["fdr_spaces"] == {"domain": 2.0}
    assert mean["extra"]["fd_train"] == {"domain": 4.0} and "repeat_best" not in mean["extra"]
    assert low["value"] == 1.0 and low["extra"]["fdr_spaces"] == {"domain": 1.0} and low["extra"]["repeat_best"] == 1
    assert low["extra"]["fd_train"] == {"domain": 2.0}
    for r in (mean, low):
        assert r["extra"]["fd_val"] == {"domain": 2.0} and r["extra"]["labels"] == "seed"
        assert r["extra"]["seeds"] == "0-29" and r["extra"]["repeat_values"] == [3.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# FDr_k.


def _hand_fd(features: np.ndarray, mu, sigma) -> float:
    """FD from features by numpy's mean and covariance (ddof 1), independent of eval's streaming sums."""
    return frechet_distance(features.mean(0), np.cov(features, rowvar=False), mu, sigma)


def test_fdr_of_the_validation_set_is_one_and_of_a_model_its_ratio(ckpt, refs, domain_weights, tmp_path):
    common = ["--ref", refs["train"], "--val-ref", refs["heldout"], "--extractor", "domain", "--metrics", "fid,fdr",
              "--weights-dir", str(domain_weights)]
    val = {r["metric"]: r for r in _eval(tmp_path, "val", "--images", "photos:heldout:8", *common)}
    assert abs(val["fdr"]["value"] - 1) < 1e-9 and val["fdr"]["extra"]["fdr_spaces"] == {"domain": val["fdr"]["value"]}
    rows = {r["metric"]: r for r in _eval(tmp_path, "g", "--ckpt", ckpt, *common, "--num-samples", str(N))}
    fdr = rows["fdr"]
    assert fdr["extractor"] == "domain" and fdr["extra"]["val_reference"] == {"domain": "photos:heldout:8"}
    assert fdr["extra"]["fd_train"]["domain"] == rows["fid"]["value"]  # FD to the training set is the FID row
    # By hand: the model's features, numpy's statistics, the two FDs and their ratio.
    ex, gen = get_extractor("domain", weights_dir=domain_weights), load_generator(ckpt)
    seeds = torch.arange(N)
    feats = ex(gen.sample(seeds, labels=gen.seed_labels(seeds)))["features"].double().numpy()
    train, held = load_reference(refs["train"]), load_reference(refs["heldout"])
    hand = _hand_fd(feats, train.mu, train.sigma) / frechet_distance(held.mu, held.sigma, train.mu, train.sigma)
    assert fdr["value"] == pytest.approx(hand, rel=1e-6)
    swapped = _hand_fd(feats, held.mu, held.sigma) / frechet_distance(train.mu, train.sigma, held.mu, held.sigma)
    assert abs(swapped - hand) > 1e3 * 1e-6 * hand  # control: the wrong way round moves it far beyond the tolerance
    # FID against the held-out photos (the demo's), FDr against the training set (--train-ref): the same FDr
    apart = {r["metric"]: r for r in _eval(tmp_path, "apart", "--ckpt", ckpt, "--ref", refs["heldout"], "--train-ref",
                                           refs["train"], *common[2:], "--num-samples", str(N))}
    assert apart["fdr"]["value"] == fdr["value"] and apart["fid"]["reference"] == "photos:heldout:8"


def test_fdr_averages_two_spaces(refs, domain_weights, dinov2_weights, tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    for f in (domain_weights / "domain-photos.safetensors", dinov2_weights):
        shutil.copy(f, weights / f.name)
    dino = {}
    for split in ("train", "heldout"):
        dino[split] = str(tmp_path / f"dino-{split}.npz")
        assert run_cli(ref_main, [f"photos:{split}:8", "-o", dino[split], "--extractor", "dinov2-vits14",
                                  "--weights-dir", str(weights), "--max-samples", "64", "--store-features", "0",
                                  "--allow-small"]) == 0
    rows = _eval(tmp_path, "two", "--images", "photos:heldout:8", "--num-samples", "48", "--metrics", "fdr",
                 "--ref", refs["train"], "--ref", dino["train"], "--val-ref", refs["heldout"], "--val-ref",
                 dino["heldout"], "--extractor", "domain", "--weights-dir", str(weights), "--allow-small")
    (fdr,) = rows
    assert fdr["extractor"] == "domain+dinov2-vits14"
    from eval.sources import open_source
    images = open_source("photos:heldout:8", num_samples=48).load(torch.arange(48))[0]
    ratios = {}
    for name, (train, held) in {"domain": (refs["train"], refs["heldout"]),
                                "dinov2-vits14": (dino["train"], dino["heldout"])}.items():
        feats = get_extractor(name, weights_dir=weights)(images)["features"].double().numpy()
        t, v = load_reference(train), load_reference(held)
        ratios[name] = _hand_fd(feats, t.mu, t.sigma) / frechet_distance(v.mu, v.sigma, t.mu, t.sigma)
    assert fdr["extra"]["fdr_spaces"] == pytest.approx(ratios, rel=1e-5)
    assert fdr["value"] == pytest.approx(np.mean(list(ratios.values())), rel=1e-5)


def test_fdr_refusals(ckpt, refs, domain_weights, tmp_path, capsys):
    base = ["--ckpt", ckpt, "--ref", refs["train"], "--extractor", "domain", "--weights-dir", str(domain_weights),
            "--num-samples", str(N), "-o", str(tmp_path / "x.jsonl")]
    for extra, needle in ((["--metrics", "fdr"], "--val-ref"),
                          (["--metrics", "fdr", "--val-ref", refs["train"]], "same statistics as --ref (the"),
                          (["--metrics", "fdr", "--val-ref", refs["heldout"], "--train-ref", refs["heldout"]],
                           "same statistics as --train-ref"),
                          (["--metrics", "fid", "--val-ref", refs["heldout"]], "add fdr"),
                          (["--metrics", "fid", "--train-ref", refs["train"]], "add fdr"),
                          (["--metrics", "fid", "--fdr-extractors", "domain"], "add fdr"),
                          (["--metrics", "fid", "--seed", str(2**63 - 100), "--repeat", "3"], "largest int64 seed"),
                          (["--metrics", "fid", "--repeat", "99999999999"], "lower --repeat or --num-samples"),
                          (["--metrics", "fid", "--num-samples", "100", "--allow-small", "--seed", "-5"],
                           "--seed -5 is negative"),  # refused before the small-N warning, not after sampling
                          # the checkpoint's small-N warning is not printed before the sample set's refusal
                          (["--metrics", "fid", "--images", "photos:heldout:8", "--num-samples", "100",
                            "--allow-small", "--repeat", "12"], "that --repeat 12 needs"),
                          (["--metrics", "fdr", "--val-ref", refs["heldout"], "--train-ref", refs["other_res"]],
                           "no --train-ref for fdr at resolution")):
        assert run_cli(run_main, base + extra) == 2
        _one_error_line(capsys, needle)
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# eval.diff.


def test_diff_names_resize_and_measures_the_whole_gap(dinov2_weights, tmp_path, capsys):
    weights, images = dinov2_weights.parent, "photos:heldout:8"
    common = ["--images", images, "--num-samples", "24", "--metrics", "fd_dinov2", "--weights-dir", str(weights),
              "--allow-small"]
    files, refs = {}, []
    for resize in ("pil-bicubic", "edm2-torch"):
        ref = str(tmp_path / f"ref-{resize}.npz")
        assert run_cli(ref_main, ["photos:train:8", "-o", ref, "--extractor", "dinov2-vits14", "--resize", resize,
                                  "--weights-dir", str(weights), "--max-samples", "32", "--store-features", "0",
                                  "--allow-small"]) == 0
        refs += ["--ref", ref]
        files[resize] = tmp_path / f"{resize}.jsonl"
        assert run_cli(run_main, [*common, "--ref", ref, "--extractor", f"dinov2=dinov2-vits14,resize={resize}",
                                  "-o", str(files[resize])]) == 0
    a, b = (read_rows(files[r])[0] for r in ("pil-bicubic", "edm2-torch"))
    # each side scored against its own convention's reference: a small gap, but far above float noise (~1e-12)
    assert abs(b["value"] - a["value"]) > 1e-6 * a["value"]
    capsys.readouterr()
    assert run_cli(diff_main, [str(files["pil-bicubic"]), str(files["edm2-torch"]), "--measure", images,
                               "--weights-dir", str(weights), *refs]) == 1
    out = capsys.readouterr().out
    assert "1 protocol field(s) differ" in out and "follows resize" in out
    table = out.split("differ:")[1].strip().split("\n\n")[0]
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["resize", "reference_sha256"]
    share = next(line for line in out.splitlines() if line.startswith("resize ") and "%" in line)
    assert share.split()[-1] == "100.0%"
    assert "unexplained by the fields above: " in out and "(0.0% of the gap" in out


def test_diff_same_protocol_exits_0_and_lists_what_a_published_row_leaves_unknown(ckpt, refs, domain_weights,
                                                                                     tmp_path, capsys):
    common = ["--ckpt", ckpt, "--ref", refs["train"], "--extractor", "domain", "--weights-dir", str(domain_weights),
              "--num-samples", str(N)]
    _eval(tmp_path, "a", *common)
    _eval(tmp_path, "b", *common)
    capsys.readouterr()
    assert run_cli(diff_main, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "the protocol is the same" in out and re.search(r"; versions [^;]*pagoda ", out.split("same: ")[1])
    row = read_rows(tmp_path / "a.jsonl")[0]
    (tmp_path / "c.jsonl").write_text(json.dumps(dict(row, resolution=2 * row["resolution"])) + "\n")
    assert run_cli(diff_main, [str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")]) == 0  # the cell, not protocol
    assert f"note: the rows are at different resolution (A {row['resolution']} px, B {2 * row['resolution']} px)" \
        in capsys.readouterr().out
    dmd2 = next(published_key(r) for r in paper_rows() if r["model"] == "DMD2")
    assert run_cli(diff_main, [str(tmp_path / "a.jsonl"), f"published:{dmd2}"]) == 1
    out = capsys.readouterr().out
    unknown = next(line for line in out.splitlines() if line.startswith("unknown in B"))
    for field in ("seeds", "labels", "uint8", "extractor_sha256", "reference_sha256", "versions"):
        assert field in unknown
    assert "selection" in out.split("differ:")[1] and "best-checkpoint" in out
    assert "note: the rows are of different data sets (A photos, B ImageNet)" in out
    assert "note: the numbers are in different feature spaces (A fid (FD-domain), B fid)" in out
    assert re.search(r"^A  .* fid \(FD-domain\) = ", out, re.M) and re.search(r"^B  .*: DMD2 fid = ", out, re.M)
    assert f"note: B does not state its guidance (the other is at {row['guidance']:g})" in out


def test_diff_reads_options_between_the_rows_and_no_reference_of_is(tmp_path, capsys):
    """`A --model X B` parses (the second row was refused as an unrecognised argument); an IS row, which reads no
    reference, is not said to leave its reference unknown; a file without the metric names what it holds."""
    rows = [{"model": m, "metric": metric, "value": v, "reference": ref, "extra": {"labels": "seed"}}
            for m, metric, v, ref in (("g16", "is", 3.0, None), ("g32", "is", 4.0, None), ("g16", "fid", 9.0, "r"))]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(diff_main, [f"{f}:1", "--model", "g32", str(f), "--metric", "is"]) == 0
    out = capsys.readouterr().out
    assert "B  " in out and "g32 is = 4" in out
    unknown = [line for line in out.splitlines() if line.startswith("unknown in")]
    assert unknown and not any("reference" in line for line in unknown)
    assert run_cli(diff_main, [f"{f}:3", "--model", "g16", str(f), "--metric", "kid"]) == 2
    _one_error_line(capsys, "holds no row of kid of model g16", "it holds fid of g16, is of g16, is of g32")


@pytest.mark.parametrize("case", ["missing", "ambiguous", "empty", "bad_line", "published_unknown", "measure_published",
                                  "measure_without_ref", "measure_aggregate", "two_metrics",
                                  "published_with_rows", "measure_two_resolutions",
                                  "measure_missing", "measure_small_set", "measure_combined"])
def test_diff_bad_input_is_one_line(case, tmp_path, capsys):
    rows = [{"model": m, "metric": "fid", "value": v, "reference": "photos:train:8", "extra": {"selection": sel}}
            for m, v, sel in (("a", 1.0, "single"), ("b", 2.0, "mean-of-3"))]
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = tmp_path / "photos-train-8.npz"  # a reference named as the rows name it
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4), provenance=np.array(json.dumps({"source": "photos:train:8"})))
    res = tmp_path / "res.jsonl"
    res.write_text("".join(json.dumps(dict(rows[0], resolution=r)) + "\n" for r in (16, 32)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    small = tmp_path / "small.npz"  # 3 images: not the samples behind rows of N = 500
    np.savez(small, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    mid = tmp_path / "mid.npz"  # A (images 500-999) and B (0-999) fit, A's first image with B's N does not
    np.savez(mid, arr_0=np.zeros((1200, 8, 8, 3), np.uint8))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(dict(rows[0], num_samples=n, extra={"seeds": s, "selection": "single"}))
                             + "\n" for n, s in ((500, "500-999"), (1000, "0-999"))))
    n500 = tmp_path / "n500.jsonl"
    n500.write_text("".join(json.dumps(dict(rows[0], num_samples=500, extra={"seeds": s, "selection": "single"}))
                            + "\n" for s in ("0-499", "500-999")))
    kid = tmp_path / "kid.jsonl"
    kid.write_text(json.dumps(dict(rows[0], metric="kid")) + "\n")
    argv, needle = {"missing": ([str(tmp_path / "nope.jsonl"), str(two)], "not a rows file"),
                    "ambiguous": ([str(two), str(two)], "pick one"),
                    "empty": ([str(empty), f"{two}:1"], "holds no rows: give a rows file"),
                    "bad_line": ([f"{two}:9", f"{two}:1"], "no row on line 9"),
                    "published_unknown": ([f"{two}:1", "published:NoSuchModel"], "matches 0 published rows"),
                    "measure_published": (["published:DMD2@64", f"{two}:1", "--measure", "x.npz"],
                                          "is a published row"),
                    "measure_without_ref": ([f"{two}:1", f"{two}:2", "--measure", "x.npz"], "pass its file with --ref"),
                    "measure_aggregate": ([f"{two}:2", f"{two}:1", "--measure", "x.npz"], "is a mean-of-3 row"),
                    "two_metrics": ([f"{kid}:1", f"{two}:1"], "compare rows of one metric"),
                    "published_with_rows": (["--published", f"{two}:1", f"{two}:2"], "drop A B"),
                    "measure_small_set": ([f"{n500}:1", f"{n500}:2", "--measure", str(small), "--ref", str(ref)],
                                          "holds 3 images, but A's N and seeds need 500 and B's N and seeds need"),
                    "measure_combined": ([f"{mixed}:1", f"{mixed}:2", "--measure", str(mid), "--ref", str(ref)],
                                         "holds 1200 images, but A's protocol with B's num_samples needs 1500"),
                    "measure_missing": ([f"{two}:1", f"{two}:1", "--measure", "nope.safetensors", "--ref", str(ref)],
                                        "does not exist"),
                    "measure_two_resolutions": ([f"{res}:1", f"{res}:2", "--measure", "x.npz", "--ref", "r.npz"],
                                                "compare rows of one resolution")}[case]
    assert run_cli(diff_main, argv) == 2
    _one_error_line(capsys, needle)


def test_diff_measure_refuses_a_checkpoint_of_another_resolution(ckpt, tmp_path, capsys):
    """A --measure checkpoint that cannot have made A (its header says another resolution) is named as such, before
    any weights load (it ended on a missing reference of that resolution)."""
    row = {"model": "g", "metric": "fid", "value": 1.0, "resolution": 16, "reference": "photos:train:16",
           "extra": {"selection": "single", "labels": "seed"}}
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps(dict(row, value=2.0, extra={"labels": "balanced"})) + "\n")
    ref = tmp_path / "photos-train-16.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4), provenance=np.array(json.dumps({"source": "photos:train:16"})))
    assert run_cli(diff_main, [f"{f}:1", f"{f}:2", "--measure", ckpt, "--ref", str(ref)]) == 2
    _one_error_line(capsys, "makes 8 px images, but A", "at 16 px")


def test_published_rows_carry_their_protocol():
    rows = paper_rows()
    assert len({published_key(r) for r in rows}) == len(rows)
    for r in rows:
        assert r["source"] and r["extra"]["conf"] in ("A", "A (transcript)", "B", "C")
        assert r["extra"]["guidance_cost"] in ("none", "x2", "in-1") and math.isfinite(r["value"])
    flagged = [r for r in rows if r["extra"]["trained_on_evaluator"]]
    assert [(r["resolution"], r["value"], r["extractor"]) for r in flagged] == [(256, 0.72, "inception")]
    assert {r["extra"]["conf"] for r in rows if r["model"] == "PaGoDA"} == {"C"}  # not re-read in the paper


def test_table_protocol_does_not_depend_on_row_order():
    """A tie between two label policies states the same one whichever file was read first (it was the first met)."""
    from reports.protocol import table_protocol

    rows = [{"model": m, "metric": "fid", "value": 1.0, "resolution": 16, "extra": {"labels": lab}}
            for m, lab in (("a", "seed"), ("b", "balanced"))]
    assert table_protocol(rows)[16]["labels"] == table_protocol(rows[::-1])[16]["labels"] == "balanced"
    assert table_protocol(rows + rows[:1])[16]["labels"] == "seed"  # the most frequent wins


def test_sampler_and_steps_on_a_one_step_generator_are_noted(capsys):
    """--sampler / --steps do not apply to a one-step G: one cell, and a note (they were dropped silently)."""
    from types import SimpleNamespace

    from eval.measure import cells_of

    g = SimpleNamespace(sweepable=False, num_classes=0, supports_guidance=False)
    assert len(cells_of("G.safetensors", g, [None], ["heun"], [4])) == 1
    assert "note: G.safetensors samples in one network call: --sampler and --steps do not apply" in \
        capsys.readouterr().err
    cells_of("G.safetensors", g, [None], [None], [None])
    assert capsys.readouterr().err == ""


def test_trained_on_the_evaluator_is_read_from_the_config():
    from types import SimpleNamespace

    from eval.measure import protocol_extra
    from pagoda.generator import feature_nets

    meta = {"config": {"loss": {"backbone": "paper"}, "disc": {"backbone": "domain"}}}
    assert feature_nets(meta) == ("deit", "domain", "efficientnet-lite0")
    assert feature_nets({"config": {"loss": {"backbone": "random"}}}) == () == feature_nets({})
    ex = SimpleNamespace(name="domain", resize="r", feature_dtype="float32", weights_trust="made here")
    for nets, want in ((("domain",), True), ((), False), (None, None)):
        extra = protocol_extra(SimpleNamespace(feature_nets=nets), ex)
        assert extra.get("trained_on_evaluator") is want
    assert protocol_extra(SimpleNamespace(feature_nets=("domain",)), ex, ("inception", "domain"))["trained_on_evaluator"]
