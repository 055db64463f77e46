"""Per-class metrics: labels in reference files, in the feature store, in eval.ref and eval.run --per-class.

Invariants: labels stay aligned with the stored feature rows (any batch size, two gloo processes ==
one); the overall FID / P-R rows do not change when --per-class is added; the fast per-class FID
equals the generic one; bad input is one `error:` line and exit 2.
"""

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from eval.extractors import get_extractor
from eval.metrics import fid_from_features, frechet_distance, gaussian_stats
from eval.pipeline import Want, extract
from eval.ref import main as ref_main
from eval.run import main as run_main
from eval.sources import DatasetSource, GeneratorSource
from eval.stats import Reference, load_reference, save_reference
from pagoda.checkpoint import model_meta, save_model
from pagoda.config import PRESETS
from pagoda.data import PHOTO_CLASSES
from pagoda.dist import shutdown
from pagoda.errors import UserError, run_cli
from pagoda.generator import load_generator
from pagoda.networks.domain import DomainNet, save_domain_net
from pagoda.networks.unet import UNet
from pagoda.rows import ROW_KEYS, read_rows

RES, C = 8, len(PHOTO_CLASSES)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A randomly initialised domain classifier where the `domain` extractor looks for it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    save_domain_net(DomainNet(C).eval(), folder / "domain-photos.safetensors", {})
    return folder


@pytest.fixture(scope="module")
def extractor(weights_dir):
    return get_extractor("domain", weights_dir=weights_dir)


def _save_teacher(path, num_classes=C):
    """The smoke teacher (class-conditional, 16 classes; num_classes=0: unconditional), one Euler step."""
    cfg = PRESETS["smoke"].teacher
    cfg = replace(cfg, network=replace(cfg.network, num_classes=num_classes),
                  sample=replace(cfg.sample, sampler="euler", steps=1))
    torch.manual_seed(1)
    net = UNet(**{k: getattr(cfg.network, k) for k in cfg.network.__dataclass_fields__})
    save_model(path, net.state_dict(), model_meta(kind="teacher", stage="teacher", config=cfg, step=0, ema_rate=0.999))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("ckpt") / "teacher.safetensors")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, weights_dir):
    """The held-out photos (64 per class) at 8 px with every feature and its label stored."""
    path = tmp_path_factory.mktemp("ref") / "heldout-8.npz"
    assert run_cli(ref_main, ["photos:heldout:8", "-o", str(path), "--extractor", "domain", "--weights-dir",
                              str(weights_dir), "--store-features", "1024", "--batch", "256"]) == 0
    return str(path)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err[0]


# ----------------------------------------------------------------------------
# Reference files.


def _reference(n=12, d=5, labels=True):
    x = np.random.default_rng(0).normal(size=(n, d))
    return Reference(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=n, features=x.astype(np.float32),
                     provenance=dict(extractor="domain", feature_dim=d),
                     labels=np.arange(n) % 3 if labels else None)


def test_labels_round_trip(tmp_path):
    ref = _reference()
    save_reference(tmp_path / "r.npz", ref)
    back = load_reference(tmp_path / "r.npz")
    assert back.labels.dtype == np.int64 and np.array_equal(back.labels, ref.labels)
    np.testing.assert_array_equal(back.features, ref.features)


def test_file_without_labels_loads(tmp_path):
    ref = _reference(labels=False)
    save_reference(tmp_path / "old.npz", ref)
    with np.load(tmp_path / "old.npz") as z:
        assert "labels" not in z.files and "features" in z.files
    assert load_reference(tmp_path / "old.npz").labels is None


@pytest.mark.parametrize("labels", ["float", "short", "2d", "negative", "no_features"])
def test_malformed_labels_refused(labels, tmp_path):
    ref = _reference()
    arrays = dict(mu=ref.mu, sigma=ref.sigma, features=ref.features, provenance=json.dumps(ref.provenance),
                  labels={"float": ref.labels.astype(np.float32), "short": ref.labels[:-1],
                          "2d": ref.labels[:, None], "negative": ref.labels - 1, "no_features": ref.labels}[labels])
    if labels == "no_features":
        del arrays["features"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as e:
        load_reference(tmp_path / "bad.npz")
    msg = str(e.value)
    assert "\n" not in msg and "bad.npz" in msg and "labels" in msg and "eval.ref" in msg


# ----------------------------------------------------------------------------
# The label store of the pipeline.


def test_stored_labels_follow_the_rows(ckpt, extractor):
    source = GeneratorSource(load_generator(ckpt), 16, seed=3, labels="seed")
    want = {"d": Want(store=11, labels=True)}
    a = extract(source, {"d": extractor}, want, batch=4)["d"]
    b = extract(source, {"d": extractor}, want, batch=8)["d"]
    expected = source.labels_of(torch.arange(11)).numpy()
    assert len(set(expected)) > 1  # labels drawn per seed, not all one class
    for out in (a, b):
        assert out.stored_labels().dtype == np.int64 and np.array_equal(out.stored_labels(), expected)
        assert len(out.store.features()) == 11
    np.testing.assert_allclose(a.store.features(), b.store.features(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="store"):
        extract(source, {"d": extractor}, {"d": Want(labels=True)})


def _shard_labels(rank, world, init, ckpt, weights_dir, n, result):
    """One process of a gloo group: extract its shard with labels; rank 0 saves the gathered store."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ex = get_extractor("domain", weights_dir=weights_dir)
        source = GeneratorSource(load_generator(ckpt), n, seed=3, labels="seed")
        out = extract(source, {"d": ex}, {"d": Want(store=n - 3, labels=True)}, batch=4)["d"]
        if rank == 0:
            np.savez(result, features=out.store.features(), labels=out.stored_labels())
    finally:
        shutdown()


def test_two_processes_store_the_labels_of_one(ckpt, weights_dir, extractor, tmp_path):
    n = 15
    source = GeneratorSource(load_generator(ckpt), n, seed=3, labels="seed")
    one = extract(source, {"d": extractor}, {"d": Want(store=n - 3, labels=True)}, batch=5)["d"]
    result = str(tmp_path / "two.npz")
    mp.start_processes(_shard_labels, args=(2, f"file://{tmp_path}/pg", ckpt, str(weights_dir), n, result),
                       nprocs=2, join=True, start_method="spawn")
    with np.load(result) as two:
        assert np.array_equal(two["labels"], one.stored_labels())
        np.testing.assert_allclose(two["features"], one.store.features(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# eval.ref stores the labels of labelled sources.


def test_ref_stores_photo_labels(ref):
    r = load_reference(ref)
    expected = DatasetSource("photos", RES, "heldout").load(torch.arange(1024))[1].numpy()
    assert r.labels.dtype == np.int64 and np.array_equal(r.labels, expected)
    assert np.array_equal(np.bincount(r.labels), np.full(C, 64))
    assert r.provenance["class_names"] == list(PHOTO_CLASSES) and r.provenance["num_classes"] == C


def _png(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("kind", ["folder", "adm_npz"])
def test_ref_stores_labels_of_folder_and_npz(kind, weights_dir, tmp_path):
    rng = np.random.default_rng(0)
    if kind == "folder":  # ImageNet layout: class = index of the sorted subfolder
        for name, count in (("n02", 3), ("n01", 2), ("n03", 4)):
            for i in range(count):
                _png(tmp_path / "data" / name / f"{i}.png", rng)
        spec, labels, names = str(tmp_path / "data"), [0, 0, 1, 1, 1, 2, 2, 2, 2], ["n01", "n02", "n03"]
    else:
        labels, names = [2, 0, 1, 1, 0, 2, 2], None
        np.savez(tmp_path / "data.npz", arr_0=rng.integers(0, 256, (7, RES, RES, 3), dtype=np.uint8),
                 arr_1=np.array(labels))
        spec = str(tmp_path / "data.npz")
    out = tmp_path / "ref.npz"
    assert run_cli(ref_main, [spec, "-o", str(out), "--extractor", "domain", "--weights-dir", str(weights_dir),
                              "--allow-small", "--store-features", "100"]) == 0
    r = load_reference(out)
    assert sorted(r.labels.tolist()) == sorted(labels) and len(r.features) == len(labels)
    assert r.provenance["class_names"] == names and r.provenance["num_classes"] == 3


def test_ref_keeps_a_random_subset_of_a_class_sorted_folder(weights_dir, tmp_path, capsys):
    """4 classes x 6 images listed class by class; 8 stored features must not be just classes 0 and 1.
    The statistics do not depend on the order; a different --store-features is a stale reference."""
    rng = np.random.default_rng(1)
    for c in range(4):
        for i in range(6):
            _png(tmp_path / "data" / f"class{c}" / f"{i}.png", rng)
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    _png(tmp_path / "data" / ".ipynb_checkpoints" / "x.png", rng)
    common = [str(tmp_path / "data"), "--extractor", "domain", "--weights-dir", str(weights_dir), "--allow-small"]
    sub, full = tmp_path / "sub.npz", tmp_path / "full.npz"
    assert run_cli(ref_main, common + ["-o", str(sub), "--store-features", "8"]) == 0
    assert run_cli(ref_main, common + ["-o", str(full), "--store-features", "24"]) == 0
    a, b = load_reference(sub), load_reference(full)
    assert a.provenance["order"] == "random(seed=0)" and a.provenance["stored_features"] == 8
    # a class folder is always read in a fixed random order (never class-sorted runs)
    assert b.provenance["order"] == "random(seed=0)"
    assert sorted(b.labels.tolist()) == [c for c in range(4) for _ in range(6)]
    assert len(a.labels) == 8 and len(set(a.labels.tolist())) >= 3 and a.provenance["num_classes"] == 4
    for i, c in enumerate(a.labels):  # each stored row is the feature of an image of its own class
        assert np.any(np.all(np.isclose(b.features[b.labels == c], a.features[i], rtol=1e-5, atol=1e-6), axis=1))
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-9, atol=1e-12)
    capsys.readouterr()
    assert run_cli(ref_main, common + ["-o", str(sub), "--store-features", "12"]) == 2
    _one_error_line(capsys, "stored_features", "--force")
    assert run_cli(ref_main, common + ["-o", str(sub), "--store-features", "12", "--force"]) == 0
    assert len(load_reference(sub).features) == 12


def test_flat_folder_has_no_labels(weights_dir, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.png", rng)
    out = tmp_path / "ref.npz"
    assert run_cli(ref_main, [str(tmp_path / "flat"), "-o", str(out), "--extractor", "domain", "--weights-dir",
                              str(weights_dir), "--allow-small"]) == 0
    r = load_reference(out)
    assert r.labels is None and len(r.features) == 4 and "class_names" not in r.provenance


# ----------------------------------------------------------------------------
# eval.run --per-class.


@pytest.mark.parametrize("n", [3, 40])
def test_fid_from_features_small_sets_equal_eigen_route(n):
    """n = 3 < D takes the nuclear-norm route, n = 40 >= D the eigenvalue one; both give the FD of the fits."""
    rng = np.random.default_rng(n)
    real, fake = rng.normal(size=(n + 2, 16)), rng.normal(0.3, 1.5, size=(n, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = fid_from_features(real, fake)
        eigen = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    assert eigen > 0 and abs(fast - eigen) < 1e-9 * max(1.0, eigen)
    assert any("feature dimension" in str(w.message) for w in caught) == (n < 16)


def _run(ckpt, ref, weights_dir, out, n, *more):
    return run_cli(run_main, ["--ckpt", ckpt, "--ref", ref, "--extractor", "domain", "--weights-dir", str(weights_dir),
                              "--metrics", "fid,pr", "--num-samples", str(n), "--batch", "8", "--allow-small",
                              "--out", str(out), *more])


def test_run_per_class_rows(ckpt, ref, weights_dir, tmp_path, capsys):
    n = 56  # balanced labels: label_i = perm[i] mod 16, so classes 0-7 get 4 samples, 8-15 get 3 (too few for P/R)
    assert _run(ckpt, ref, weights_dir, tmp_path / "plain.jsonl", n, "--labels", "balanced") == 0
    capsys.readouterr()
    assert _run(ckpt, ref, weights_dir, tmp_path / "pc.jsonl", n, "--per-class", "--labels", "balanced") == 0
    captured = capsys.readouterr()
    plain = {r["metric"]: r for r in read_rows(tmp_path / "plain.jsonl")}
    rows = read_rows(tmp_path / "pc.jsonl")
    overall = {r["metric"]: r for r in rows if not r["metric"].endswith("_class")}
    assert overall.keys() == plain.keys() == {"fid", "precision", "recall"}
    for m in plain:
        assert overall[m]["value"] == plain[m]["value"]
    by_metric = {m: [r for r in rows if r["metric"] == m] for m in ("fid_class", "precision_class", "recall_class")}
    assert [r["extra"]["class"] for r in by_metric["fid_class"]] == list(range(C))
    assert [r["extra"]["class"] for r in by_metric["precision_class"]] == list(range(8))
    assert [r["extra"]["class"] for r in by_metric["recall_class"]] == list(range(8))
    for r in sum(by_metric.values(), []):
        c = r["extra"]["class"]
        assert set(ROW_KEYS) <= set(r) and math.isfinite(r["value"]) and r["reference"] == "photos:heldout:8"
        assert r["extra"]["class_name"] == PHOTO_CLASSES[c] and r["extra"]["num_real"] == 64
        assert r["extra"]["num_fake"] == (4 if c < 8 else 3) and r["extra"]["labels"] == "balanced"
    assert all(r["value"] > 0 for r in by_metric["fid_class"])
    assert all(0 <= r["value"] <= 1 for r in by_metric["precision_class"] + by_metric["recall_class"])
    assert "warning" in captured.err and "8 of 16 classes" in captured.err
    table = captured.out.splitlines()
    assert sum("fid_class" in line for line in table) == 5 and sum("recall_class" in line for line in table) == 5


def test_per_class_with_adm_reference_batch(ckpt, ref, weights_dir, tmp_path):
    """An ADM reference batch (images in arr_0, classes in arr_1, no features) gives the per-class rows of
    our reference built from the same images; without arr_1 it is refused."""
    ours = load_reference(ref)
    src = DatasetSource("photos", RES, "heldout")
    images, labels = src.load(torch.arange(src.num_samples))
    assert np.array_equal(labels.numpy(), ours.labels)
    adm = tmp_path / "VIRTUAL_photos8_labeled.npz"
    np.savez(adm, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy(), mu=ours.mu, sigma=ours.sigma)
    values = {}
    for name, path in (("ours", ref), ("adm", str(adm))):
        assert _run(ckpt, path, weights_dir, tmp_path / f"{name}.jsonl", 64, "--per-class") == 0
        values[name] = {(r["metric"], r["extra"].get("class")): r["value"] for r in read_rows(tmp_path / f"{name}.jsonl")}
    assert values["adm"].keys() == values["ours"].keys() and len(values["ours"]) > 3 + C
    for key, value in values["ours"].items():
        assert values["adm"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    unlabelled = tmp_path / "VIRTUAL_photos8.npz"
    np.savez(unlabelled, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=ours.mu, sigma=ours.sigma)
    assert _run(ckpt, str(unlabelled), weights_dir, tmp_path / "u.jsonl", 64, "--per-class") == 2


def test_per_class_refused(ckpt, ref, weights_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    fewer = _save_teacher(tmp_path / "eight.safetensors", num_classes=8)  # the reference has 16 classes
    assert _run(fewer, ref, weights_dir, out, 128, "--per-class") == 2
    _one_error_line(capsys, "16 classes", "eight.safetensors", "8")
    other_res = tmp_path / "VIRTUAL_16px.npz"  # an ADM batch's images say its resolution
    r16 = load_reference(ref)
    np.savez(other_res, arr_0=np.zeros((4, 16, 16, 3), np.uint8), arr_1=np.arange(4), mu=r16.mu, sigma=r16.sigma)
    assert _run(ckpt, str(other_res), weights_dir, out, 128, "--per-class") == 2
    _one_error_line(capsys, "resolution 8")
    uncond = _save_teacher(tmp_path / "uncond.safetensors", num_classes=0)
    assert _run(uncond, ref, weights_dir, out, 128, "--per-class") == 2
    _one_error_line(capsys, "uncond.safetensors", "unconditional", "--per-class")
    unlabelled = tmp_path / "unlabelled.npz"
    r = load_reference(ref)
    save_reference(unlabelled, replace(r, labels=None))
    assert _run(ckpt, str(unlabelled), weights_dir, out, 128, "--per-class") == 2
    _one_error_line(capsys, "unlabelled.npz", "python -m eval.ref")
    assert not out.exists()
    assert run_cli(run_main, ["--ckpt", ckpt, "--ref", ref, "--metrics", "kid", "--per-class"]) == 2  # argparse
    _one_error_line(capsys, "--per-class")
