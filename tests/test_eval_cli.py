"""eval.ref / eval.fid / eval.run end to end on a tiny checkpoint and the small `domain` extractor.

Bad input: exactly one `error:` line on stderr, exit 2, the --out file untouched. Invariants: FID
does not change with --batch, and two gloo processes give the FID of one.
"""

import math
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from eval.extractors import get_extractor
from eval.fid import main as fid_main
from eval.fid import measure
from eval.ref import main as ref_main
from eval.run import main as run_main
from eval.sources import DatasetSource, FolderSource, GeneratorSource, RandomOrder
from eval.stats import Reference, load_reference, save_reference
from pagoda.checkpoint import load_model, model_meta, save_model
from pagoda.config import PRESETS
from pagoda.dist import shutdown
from pagoda.errors import run_cli
from pagoda.generator import load_generator
from pagoda.networks.unet import UNet
from pagoda.rows import ROW_KEYS, read_rows

RES = 8


@pytest.fixture(scope="module")
def weights_dir(domain_weights):
    """A randomly initialised domain classifier where the `domain` extractor looks for it."""
    return domain_weights


@pytest.fixture(scope="module")
def extractor(weights_dir):
    return get_extractor("domain", weights_dir=weights_dir)


def _save_teacher(path, *, nan=False):
    cfg = PRESETS["smoke"].teacher
    cfg = replace(cfg, sample=replace(cfg.sample, sampler="euler", steps=1))
    torch.manual_seed(1)
    net = UNet(**{k: getattr(cfg.network, k) for k in cfg.network.__dataclass_fields__})
    state = {k: (torch.full_like(v, math.nan) if nan and v.is_floating_point() else v)
             for k, v in net.state_dict().items()}
    save_model(path, state, model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(_save_teacher(tmp_path_factory.mktemp("ckpt") / "teacher.safetensors"))


@pytest.fixture(scope="module")
def ref(tmp_path_factory, weights_dir):
    path = tmp_path_factory.mktemp("ref") / "photos-8.npz"
    argv = ["photos:train:8", "-o", str(path), "--extractor", "domain", "--weights-dir", str(weights_dir),
            "--max-samples", "400", "--store-features", "400", "--batch", "100"]
    assert run_cli(ref_main, argv) == 0
    return str(path)


@pytest.fixture(scope="module")
def dim(extractor):
    return extractor.feature_dim


def _fid(argv):
    return run_cli(fid_main, argv)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _base(ckpt, ref, weights_dir, out, n):
    return ["--ckpt", ckpt, "--ref", ref, "--extractor", "domain", "--weights-dir", str(weights_dir),
            "--num-samples", str(n), "--out", str(out)]


def test_fid_independent_of_batch(ckpt, ref, weights_dir, dim, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    n = 20  # < dim: a singular covariance is the harshest case for agreement to 1e-9
    assert _fid(_base(ckpt, ref, weights_dir, out, n) + ["--batch", "3", "--allow-small"]) == 0
    assert _fid(_base(ckpt, ref, weights_dir, out, n) + ["--batch", "8", "--allow-small"]) == 0
    assert "FID" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 2 and all(set(ROW_KEYS) <= set(r) for r in rows)
    assert abs(rows[0]["value"] - rows[1]["value"]) < 1e-9 and rows[0]["value"] > 0
    r = rows[0]
    assert (r["metric"], r["extractor"], r["num_samples"], r["resolution"], r["steps"]) == ("fid", "domain", n, RES, 1)


def _shard_fid(rank, world, init, ckpt, ref, weights_dir, n, result):
    """One process of a gloo group: the pipeline over its shard; rank 0 saves the FID."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ex = get_extractor("domain", weights_dir=weights_dir)
        source = GeneratorSource(load_generator(ckpt), n, seed=3)
        fid, _ = measure(source, ex, load_reference(ref), batch=4, device="cpu")
        if rank == 0:
            np.save(result, np.float64(fid))
    finally:
        shutdown()


def test_shards_merge_to_one(ckpt, ref, extractor):
    """In-process version of the gloo test below: two rank shards summed == one pass."""
    from eval.metrics import frechet_distance
    from eval.pipeline import extract
    from eval.stats import FeatureStats
    source = GeneratorSource(load_generator(ckpt), 20, seed=3)
    one = extract(source, {"d": extractor}, batch=7)["d"].stats
    two = FeatureStats(extractor.feature_dim)
    for rank in (0, 1):
        for x, _, _ in source.batches(4, rank=rank, world=2):
            two.update(extractor(x)["features"].double())
    r = load_reference(ref)
    assert one.n == two.n == 20
    assert abs(frechet_distance(one.mean(), one.cov(), r.mu, r.sigma) -
               frechet_distance(two.mean(), two.cov(), r.mu, r.sigma)) < 1e-9


def test_ref_independent_of_batch(ref, weights_dir, tmp_path):
    path = tmp_path / "ref.npz"
    assert run_cli(ref_main, ["photos:train:8", "-o", str(path), "--extractor", "domain", "--weights-dir",
                              str(weights_dir), "--max-samples", "400", "--store-features", "400",
                              "--batch", "7"]) == 0
    a, b = load_reference(ref), load_reference(path)
    assert a.n == b.n == 400 and a.provenance == b.provenance
    # float32 convolutions round differently per batch size (~3e-7 relative): that is the only difference
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.mu, b.mu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=0, atol=1e-6)


def test_two_processes_equal_one(ckpt, ref, weights_dir, dim, tmp_path):
    n = 20
    ex = get_extractor("domain", weights_dir=weights_dir)
    one, _ = measure(GeneratorSource(load_generator(ckpt), n, seed=3), ex, load_reference(ref), batch=7, device="cpu")
    result = str(tmp_path / "fid.npy")
    mp.start_processes(_shard_fid, args=(2, f"file://{tmp_path}/pg", ckpt, ref, str(weights_dir), n, result),
                       nprocs=2, join=True, start_method="spawn")
    assert abs(float(np.load(result)) - one) < 1e-6


def test_small_sample_refused_then_allowed(ckpt, ref, weights_dir, dim, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    argv = _base(ckpt, ref, weights_dir, out, 10)
    assert _fid(argv) == 2
    _one_error_line(capsys, "--allow-small", str(dim))
    assert not out.exists()
    assert _fid(argv + ["--allow-small"]) == 0
    assert "warning" in capsys.readouterr().err and len(read_rows(out)) == 1


def _png_folder(folder, n, size=RES):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def _bad_input(case, tmp_path, ckpt, ref, weights_dir, dim):
    """argv for eval.fid and the words its error line must contain."""
    common = ["--extractor", "domain", "--weights-dir", str(weights_dir), "--allow-small"]
    if case == "corrupt_image":  # found only when decoded: enough images that no --allow-small warning shows
        folder = _png_folder(tmp_path / "imgs", dim + 1)
        data = (folder / "0003.png").read_bytes()
        (folder / "0003.png").write_bytes(data[: len(data) // 2])
        return ["--images", str(folder), "--ref", ref] + common[:-1], ["0003.png"]
    if case == "garbage_image":
        folder = _png_folder(tmp_path / "imgs", 4)
        (folder / "0002.png").write_bytes(b"\x89PNG garbage")
        return ["--images", str(folder), "--ref", ref] + common, ["0002.png"]
    if case == "mixed_sizes":
        folder = _png_folder(tmp_path / "imgs", 4)
        Image.new("RGB", (RES * 2, RES * 2)).save(folder / "0009.png")
        return ["--images", str(folder), "--ref", ref] + common, ["0009.png", "16x16"]
    if case == "npz_without_arr_0":
        np.savez(tmp_path / "s.npz", images=np.zeros((4, RES, RES, 3), np.uint8))
        return ["--images", str(tmp_path / "s.npz"), "--ref", ref] + common, ["arr_0", "images"]
    if case == "other_extractor_ref":
        save_reference(tmp_path / "incep.npz", Reference(mu=np.zeros(2048), sigma=np.eye(2048), n=10, features=None,
                                                         provenance={"extractor": "inception", "feature_dim": 2048}))
        return ["--ckpt", ckpt, "--ref", str(tmp_path / "incep.npz"), "--num-samples", "4"] + common, ["incep.npz"]
    if case == "other_dim_ref":
        np.savez(tmp_path / "cleanfid.npz", mu=np.zeros(7), sigma=np.eye(7))
        return ["--ckpt", ckpt, "--ref", str(tmp_path / "cleanfid.npz"), "--num-samples", "4"] + common, ["cleanfid.npz"]
    if case == "pkl_imports_code":
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))
        (tmp_path / "stats.pkl").write_bytes(pickle.dumps({"fid": Evil()}))
        return ["--ckpt", ckpt, "--ref", str(tmp_path / "stats.pkl"), "--num-samples", "4"] + common, ["stats.pkl"]
    if case == "nan_checkpoint":
        bad = _save_teacher(tmp_path / "nan.safetensors", nan=True)
        return ["--ckpt", str(bad), "--ref", ref, "--num-samples", str(dim), "--batch", "4", "--seed", "11"] + \
            common[:-1], ["NaN", "seed 11"]
    if case == "missing_weights":
        (tmp_path / "empty").mkdir()
        return ["--ckpt", ckpt, "--ref", ref, "--num-samples", "4", "--extractor", "domain",
                "--weights-dir", str(tmp_path / "empty")], ["domain-photos.safetensors"]
    raise AssertionError(case)


BAD = ["corrupt_image", "garbage_image", "mixed_sizes", "npz_without_arr_0", "other_extractor_ref", "other_dim_ref",
       "pkl_imports_code", "nan_checkpoint", "missing_weights"]


@pytest.mark.parametrize("case", BAD)
def test_fid_bad_input(case, ckpt, ref, weights_dir, dim, tmp_path, capsys):
    argv, needles = _bad_input(case, tmp_path, ckpt, ref, weights_dir, dim)
    out = tmp_path / "results.jsonl"
    out.write_text("")
    assert _fid(argv + ["--out", str(out)]) == 2
    _one_error_line(capsys, *needles)
    assert out.read_text() == ""  # nothing appended
    assert not (tmp_path / "pwned").exists()


def test_fid_of_images_and_save_samples(ckpt, ref, weights_dir, dim, tmp_path, capsys):
    out, npz = tmp_path / "r.jsonl", tmp_path / "samples.npz"
    n = 20
    assert _fid(_base(ckpt, ref, weights_dir, out, n) + ["--save-samples", str(npz), "--batch", "8", "--allow-small"]) == 0
    with np.load(npz) as z:
        assert z["arr_0"].shape == (n, RES, RES, 3) and z["arr_0"].dtype == np.uint8
    assert _fid(["--images", str(npz), "--ref", ref, "--extractor", "domain", "--weights-dir", str(weights_dir),
                 "--out", str(out), "--allow-small"]) == 0
    gen, img = read_rows(out)
    assert img["method"] == "samples" and abs(gen["value"] - img["value"]) < 1e-9  # same pixels, same FID


def test_ref_fresh_stale_force(ref, weights_dir, tmp_path, capsys):
    path = tmp_path / "ref.npz"
    argv = ["photos:train:8", "-o", str(path), "--extractor", "domain", "--weights-dir", str(weights_dir),
            "--max-samples", "200", "--allow-small"]
    assert run_cli(ref_main, argv) == 0
    stamp = path.stat().st_mtime_ns
    assert run_cli(ref_main, argv) == 0 and "up to date" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == stamp
    stale = argv[:-2] + ["150", "--allow-small"]
    assert run_cli(ref_main, stale) == 2
    _one_error_line(capsys, "stale", "--force")
    assert path.stat().st_mtime_ns == stamp
    assert run_cli(ref_main, stale + ["--force"]) == 0
    assert load_reference(path).n == 150
    rows = tmp_path / "results.jsonl"  # not a reference: even --force never overwrites it
    rows.write_text('{"model": "a", "metric": "fid", "value": 1.0}\n')
    capsys.readouterr()
    assert run_cli(ref_main, [argv[0], "-o", str(rows), *argv[3:], "--force"]) == 2
    _one_error_line(capsys, "is not a reference", "choose another -o")
    assert rows.read_text() == '{"model": "a", "metric": "fid", "value": 1.0}\n'
    samples = tmp_path / "samples.npz"  # a samples npz is a zip too, but no reference
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    before = samples.read_bytes()
    assert run_cli(ref_main, [argv[0], "-o", str(samples), *argv[3:], "--force"]) == 2
    _one_error_line(capsys, "is not a reference")
    assert samples.read_bytes() == before
    empty = tmp_path / "empty.npz"  # what an interrupted copy leaves: the advice "rebuild it with --force" works
    empty.write_bytes(b"")
    assert run_cli(ref_main, [argv[0], "-o", str(empty), *argv[3:], "--force"]) == 0 and load_reference(empty).n == 200


def test_folder_matches_tensor_pixels(tmp_path):
    folder = _png_folder(tmp_path / "imgs", 5)
    x = torch.cat([b[0] for b in FolderSource(folder).batches(2, rank=0, world=1)])
    assert torch.equal(x[0], torch.from_numpy(np.array(Image.open(folder / "0000.png"))).permute(2, 0, 1))


def test_run_sweep_rows(ckpt, ref, weights_dir, dim, tmp_path, capsys):
    out = tmp_path / "sweep.jsonl"
    argv = ["--ckpt", ckpt, "--ref", ref, "--extractor", "domain", "--weights-dir", str(weights_dir),
            "--metrics", "fid,kid,is,pr", "--estimator", "kid_subset=10", "--guidance", "1,2", "--sampler", "euler", "--steps", "1,2",
            "--num-samples", "20", "--batch", "10", "--allow-small", "--out", str(out)]
    assert run_cli(run_main, argv) == 0
    rows = read_rows(out)
    cells = {(r["guidance"], r["steps"]) for r in rows}
    assert cells == {(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 2)}
    assert sorted({r["metric"] for r in rows}) == ["fid", "is", "kid", "precision", "recall"]
    assert len(rows) == 4 * 5 and all(set(ROW_KEYS) <= set(r) for r in rows)
    assert all(r["extra"]["style"] == "adm" for r in rows if r["metric"] == "is")
    assert all(r["nfe"] and r["sampler"] == "euler" for r in rows)
    table = capsys.readouterr().out
    assert "recall" in table and table.count("fid") >= 4
    assert run_cli(run_main, argv + ["--metrics", "fid,bogus"]) == 2  # argparse: one line, before anything runs
    _one_error_line(capsys, "bogus", "--metrics")


def test_bootstrap_intervals(ckpt, ref, weights_dir, tmp_path):
    """--bootstrap adds ci_low / ci_high to fid (eval.fid, eval.run) and precision / recall (eval.run)
    without changing the point values."""
    common = ["--ckpt", ckpt, "--ref", ref, "--extractor", "domain", "--weights-dir", str(weights_dir),
              "--num-samples", "40", "--batch", "20", "--allow-small"]
    rows = {}
    for name, extra in (("plain", []), ("boot", ["--estimator", "bootstrap=50"])):
        assert run_cli(run_main, common + ["--metrics", "fid,pr", "--out", str(tmp_path / f"{name}.jsonl")] + extra) == 0
        rows[name] = {r["metric"]: r for r in read_rows(tmp_path / f"{name}.jsonl")}
    assert rows["plain"].keys() == rows["boot"].keys() == {"fid", "precision", "recall"}
    for metric, plain in rows["plain"].items():
        boot = rows["boot"][metric]
        assert plain["ci_low"] is None and boot["value"] == pytest.approx(plain["value"], rel=1e-12)
        assert boot["ci_low"] <= boot["ci_high"]
        if metric != "fid":  # the mean of resampled indicators brackets the mean; a bootstrap FD sits above it
            assert boot["ci_low"] <= boot["value"] <= boot["ci_high"]
    assert _fid(common + ["--bootstrap", "20", "--out", str(tmp_path / "fid.jsonl")]) == 0
    (fid_row,) = read_rows(tmp_path / "fid.jsonl")
    assert fid_row["value"] == pytest.approx(rows["plain"]["fid"]["value"], rel=1e-9)
    assert 0 < fid_row["ci_low"] <= fid_row["ci_high"]


def test_run_kid_pr_with_adm_image_reference(ckpt, ref, weights_dir, tmp_path):
    """An ADM reference batch (mu, sigma and the images in arr_0, no features) serves KID and P/R: its
    images are run through the extractor, giving the numbers of our reference of the same images."""
    ours = load_reference(ref)
    assert ours.provenance["order"] == "random(seed=0)"  # --max-samples 400 of the train split: a random subset
    subset = RandomOrder(DatasetSource("photos", RES, "train"), seed=0)
    images = subset.load(torch.arange(ours.n))[0].permute(0, 2, 3, 1).numpy()
    adm = tmp_path / "VIRTUAL_photos8.npz"
    np.savez(adm, arr_0=images, mu=ours.mu, sigma=ours.sigma)
    values = {}
    for name, path in (("ours", ref), ("adm", str(adm))):
        out = tmp_path / f"{name}.jsonl"
        argv = ["--ckpt", ckpt, "--ref", path, "--extractor", "domain", "--weights-dir", str(weights_dir),
                "--metrics", "fid,kid,pr", "--estimator", "kid_subset=20", "--num-samples", "40", "--batch", "20", "--allow-small", "--out", str(out)]
        assert run_cli(run_main, argv) == 0
        values[name] = {r["metric"]: r["value"] for r in read_rows(out)}
    assert values["adm"].keys() == {"fid", "kid", "precision", "recall"}
    for metric, value in values["ours"].items():
        assert values["adm"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric


def test_run_dinov2_and_clip(ckpt, dinov2_weights, clip_weights, extractor_weights_dir, tmp_path, capsys):
    ref = tmp_path / "dino.npz"
    common = ["--weights-dir", str(extractor_weights_dir), "--batch", "10", "--allow-small"]
    assert run_cli(ref_main, ["photos:train:8", "-o", str(ref), "--extractor", "dinov2-vits14",
                              "--max-samples", "30"] + common) == 0
    out = tmp_path / "r.jsonl"
    assert run_cli(run_main, ["--ckpt", ckpt, "--ref", str(ref), "--metrics", "fd_dinov2,clip", "--extractor",
                              "inception,dinov2=dinov2-vits14,clip=clip-vitb32", "--num-samples", "12",
                              "--out", str(out)] + common) == 0
    rows = {r["metric"]: r for r in read_rows(out)}
    assert rows["fd_dinov2"]["extractor"] == "dinov2-vits14" and rows["fd_dinov2"]["value"] > 0
    assert rows["clip"]["extractor"] == "clip-vitb32" and 0 <= rows["clip"]["value"] <= 100
    assert rows["fd_dinov2"]["reference"] == "photos:train:8" and rows["clip"]["reference"] is None


def test_run_solvers_grids_and_a_pd_student(ckpt, ref, weights_dir, tmp_path):
    # A PD student (here: the teacher's weights saved as a 2-step student) sweeps with its own grid only; the
    # teacher's solvers each carry their grid; CFG rows say how the guided NFE is counted.
    cfg = PRESETS["smoke"].teacher
    state, _ = load_model(ckpt)
    student = tmp_path / "pd-2.safetensors"
    save_model(student, state, model_meta(kind="pd", stage="pd-2", config=cfg, step=0, ema_rate=0.0,
                                          extra=dict(method="pd", pd=dict(steps=2, formulation="edm"))))
    out = tmp_path / "rows.jsonl"
    argv = ["--ckpt", ckpt, "--ckpt", str(student), "--ref", ref, "--extractor", "domain", "--weights-dir",
            str(weights_dir), "--metrics", "fid", "--sampler", "dpmpp2m:loguniform,heun:karras-rho3",
            "--steps", "2", "--guidance", "1,2", "--num-samples", "20", "--batch", "10", "--allow-small",
            "--out", str(out)]
    assert run_cli(run_main, argv) == 0
    rows = {(r["model"], r["sampler"], r["guidance"]): r for r in read_rows(out)}
    assert set(rows) == {(ckpt, s, w) for s in ("dpmpp2m:loguniform", "heun:karras-rho3") for w in (1.0, 2.0)} | \
        {(str(student), "euler", 1.0)}
    pd_row = rows[(str(student), "euler", 1.0)]
    assert (pd_row["method"], pd_row["nfe"], pd_row["steps"], pd_row["extra"]["grid"]) == ("pd", 2.0, 2, "given")
    dpm = rows[(ckpt, "dpmpp2m:loguniform", 2.0)]
    assert (dpm["method"], dpm["nfe"], dpm["extra"]["grid"], dpm["extra"]["cfg_calls"]) == \
        ("dpmpp2m", 4.0, "loguniform", "batched")
    heun = rows[(ckpt, "heun:karras-rho3", 1.0)]
    assert (heun["nfe"], heun["extra"]["grid"]) == (3.0, "karras rho=3") and "cfg_calls" not in heun["extra"]


def test_run_guidance_on_a_model_without_cfg(ckpt, ref, weights_dir, tmp_path, capsys):
    # A teacher trained without label dropout has no CFG: --guidance 2 alone is refused (no silent w = 1 row);
    # in a list with 1 it is measured at 1 only, with a note.
    cfg = PRESETS["smoke"].teacher
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, label_dropout=0.0),
                  sample=replace(cfg.sample, sampler="euler", steps=1))
    state, _ = load_model(ckpt)
    plain = str(tmp_path / "no-cfg.safetensors")
    save_model(plain, state, model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    out = tmp_path / "rows.jsonl"
    argv = _base(plain, ref, weights_dir, out, 20) + ["--allow-small", "--batch", "10"]
    assert run_cli(run_main, argv + ["--guidance", "2,3"]) == 2
    _one_error_line(capsys, "--guidance 2,3", plain, "add 1")
    assert not out.exists()
    assert run_cli(run_main, argv + ["--guidance", "1,2"]) == 0
    assert "measured at guidance 1 only" in capsys.readouterr().err
    assert [r["guidance"] for r in read_rows(out)] == [1.0]


def test_run_names_the_refs_extractor_when_the_default_does_not_fit(ckpt, ref, tmp_path, capsys):
    # The domain ref with the default --extractor inception: refused before any weights are asked for.
    out = tmp_path / "rows.jsonl"
    argv = ["--ckpt", ckpt, "--ref", ref, "--weights-dir", str(tmp_path / "empty"), "--out", str(out)]
    assert run_cli(run_main, argv) == 2
    _one_error_line(capsys, "inception", "--extractor domain")
    assert not out.exists()
    assert run_cli(fid_main, argv) == 2  # eval.fid: the same check
    _one_error_line(capsys, "inception", "--extractor domain")


def test_ref_resolution_on_a_folder_or_npz_is_the_adm_centre_crop(weights_dir, tmp_path, capsys):
    """eval.ref --resolution on a folder or an npz brings the images to it by ADM's centre crop (the pixels
    pagoda's training data set makes of the same files) and records it; without it the reference keeps the
    images' own size; --split on a folder is refused in one line."""
    from eval.sources import NpzSource, Resized
    from pagoda.data import build_dataset, save_npz

    folder, rng = tmp_path / "imgs", np.random.default_rng(0)
    folder.mkdir()
    images = rng.integers(0, 256, (6, 40, 30, 3), dtype=np.uint8)  # not square, not a multiple of 8
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    resized = Resized(FolderSource(folder), 8)
    got, _ = resized.load(torch.arange(6))
    train = build_dataset(str(folder), 8)
    assert got.shape == (6, 3, 8, 8)
    assert torch.equal(got, torch.stack([train[i][0] for i in range(6)]))  # pagoda.data's ADM crop, bit-equal
    save_npz(tmp_path / "imgs.npz", images)
    assert torch.equal(Resized(NpzSource(tmp_path / "imgs.npz"), 8).load(torch.arange(6))[0], got)
    common = ["--extractor", "domain", "--weights-dir", str(weights_dir), "--allow-small"]
    assert run_cli(ref_main, [str(folder), "-o", str(tmp_path / "r8.npz"), "--resolution", "8", *common]) == 0
    prov = load_reference(tmp_path / "r8.npz").provenance
    assert prov["resolution"] == 8 and prov["image_resize"] == "adm-center-crop"
    square = tmp_path / "sq"
    square.mkdir()
    for i, im in enumerate(images[:, :24, :24]):
        Image.fromarray(np.ascontiguousarray(im)).save(square / f"{i}.png")
    assert run_cli(ref_main, [str(square), "-o", str(tmp_path / "r24.npz"), *common]) == 0
    prov = load_reference(tmp_path / "r24.npz").provenance
    assert prov["resolution"] == 24 and "image_resize" not in prov  # control: as stored
    capsys.readouterr()
    assert run_cli(ref_main, [str(folder), "-o", str(tmp_path / "rs.npz"), "--split", "heldout", *common]) == 2
    _one_error_line(capsys, "--split heldout exists only for the bundled photos")
    assert not (tmp_path / "rs.npz").exists()
