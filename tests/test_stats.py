"""eval.stats: streaming statistics (chunked == full, two gloo ranks == one process) and reference files."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eval.stats import FeatureStats, FeatureStore, Reference, check_fresh, load_reference, save_reference
from pagoda.dist import shutdown
from pagoda.errors import UserError


def features(n=257, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return 3.0 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))


# ---------------------------------------------------------------- FeatureStats

def test_chunked_updates_equal_one_full_update():
    x = features()
    full, chunked = FeatureStats(12), FeatureStats(12)
    full.update(x)
    for part in np.array_split(x, [5, 6, 100, 101, 200]):
        chunked.update(torch.from_numpy(part))
    assert chunked.n == full.n == len(x)
    np.testing.assert_allclose(chunked.mean(), full.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunked.cov(), full.cov(), rtol=0, atol=1e-12)


def test_mean_and_cov_equal_numpy():
    x = features()
    s = FeatureStats(12)
    s.update(x)
    np.testing.assert_allclose(s.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_merge_equals_one_stream():
    x = features()
    a, b, full = FeatureStats(12), FeatureStats(12), FeatureStats(12)
    a.update(x[:100])
    b.update(x[100:])
    full.update(x)
    a.merge(b)
    assert a.n == full.n
    np.testing.assert_allclose(a.cov(), full.cov(), rtol=0, atol=1e-12)


def test_stats_reject_wrong_width():
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        FeatureStats(12).update(np.zeros((3, 11)))


# ---------------------------------------------------------------- FeatureStore

def test_store_is_batch_size_independent_and_bounded():
    x = features(100, 6).astype(np.float32)
    results = []
    for batch in (1, 7, 100):
        store = FeatureStore(6, capacity=40)
        for start in range(0, 100, batch):
            store.update(x[start:start + batch])
        assert len(store) == 40
        results.append(store.features())
    for r in results:
        np.testing.assert_array_equal(r, x[:40])


def test_store_orders_rows_by_sample_index():
    x = features(30, 4).astype(np.float32)
    store = FeatureStore(4, capacity=20)
    order = np.random.default_rng(0).permutation(30)  # arrival order != sample order
    for chunk in np.array_split(order, 4):
        store.update(x[chunk], torch.from_numpy(chunk))
    store.gather()  # one process: just consolidates
    np.testing.assert_array_equal(store.indices(), np.arange(20))
    np.testing.assert_array_equal(store.features(), x[:20])


# ---------------------------------------------------------------- two gloo ranks == one process

def _rank_worker(rank, world, init_file, x, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats, store = FeatureStats(x.shape[1]), FeatureStore(x.shape[1], capacity=50)
        index = torch.arange(rank, len(x), world)  # the sources' layout: sample i on rank i % world
        for chunk in index.split(9 + rank):  # different batch sizes on the two ranks
            stats.update(x[chunk])
            store.update(x[chunk], chunk)
        stats.all_reduce()
        store.gather()
        torch.save(dict(n=stats.n, mean=stats.mean(), cov=stats.cov(), feats=store.features(),
                        index=store.indices()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown()


def test_two_gloo_processes_equal_one_process(tmp_path):
    x = torch.from_numpy(features(121, 8))
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), x, str(tmp_path)), nprocs=2, join=True)
    one = FeatureStats(8)
    one.update(x)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["n"] == 121
        np.testing.assert_allclose(r["mean"], one.mean(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(r["cov"], one.cov(), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(r["index"], np.arange(50))
        np.testing.assert_array_equal(r["feats"], x[:50].float().numpy())


# ---------------------------------------------------------------- reference files

def reference(d=5, with_features=True):
    x = features(40, d)
    return Reference(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=40,
                     features=x.astype(np.float32) if with_features else None,
                     provenance=dict(extractor="domain", feature_dim=d, resize="bilinear", num_samples=40,
                                     source="photos:train", fingerprint="abc123"))


def test_reference_round_trip_is_atomic(tmp_path):
    ref = reference()
    path = tmp_path / "sub" / "ref.npz"
    save_reference(path, ref)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    back = load_reference(path, expect_extractor="domain", expect_dim=5)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.features, ref.features)
    assert back.n == 40 and back.provenance == ref.provenance and back.format == "pagoda"


def test_reads_adm_npz_with_reference_images(tmp_path):
    ref, images = reference(with_features=False), np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu, sigma_s=ref.sigma)
    back = load_reference(tmp_path / "adm.npz", expect_extractor="inception", expect_dim=5)
    assert back.format == "adm" and back.provenance == {} and back.features is None
    assert back.n == 3 and back.images is None  # the images are read only when asked for
    np.testing.assert_array_equal(back.mu, ref.mu)
    back = load_reference(tmp_path / "adm.npz", load_images=True)
    np.testing.assert_array_equal(back.images, images)


def test_adm_npz_without_statistics_points_to_eval_ref(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="eval.ref"):
        load_reference(tmp_path / "samples.npz")


def test_reads_cleanfid_npz(tmp_path):
    ref = reference()
    np.savez(tmp_path / "cf.npz", mu=ref.mu.astype(np.float32), sigma=ref.sigma)
    back = load_reference(tmp_path / "cf.npz", expect_dim=5)
    assert back.format == "npz" and back.mu.dtype == np.float64
    np.testing.assert_allclose(back.mu, ref.mu, rtol=1e-6)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_edm2_pkl(tmp_path, protocol):
    fid, dino = reference(8, False), reference(6, False)
    stats = dict(num_images=40, fid=dict(mu=fid.mu, sigma=fid.sigma), fd_dinov2=dict(mu=dino.mu, sigma=dino.sigma))
    with open(tmp_path / "ref.pkl", "wb") as f:
        pickle.dump(stats, f, protocol=protocol)
    back = load_reference(tmp_path / "ref.pkl", expect_extractor="inception", expect_dim=8)
    np.testing.assert_array_equal(back.sigma, fid.sigma)
    assert back.n == 40 and back.format == "edm2:fid"
    back = load_reference(tmp_path / "ref.pkl", expect_extractor="dinov2", expect_dim=6)
    np.testing.assert_array_equal(back.mu, dino.mu)
    assert load_reference(tmp_path / "ref.pkl", metric="fd_dinov2").format == "edm2:fd_dinov2"
    with pytest.raises(UserError, match="another network"):
        load_reference(tmp_path / "ref.pkl", expect_extractor="dinov2", metric="fid")


def test_reads_numpy1_era_pkl(tmp_path):
    """Pickles written under numpy 1.x name numpy.core.multiarray, not numpy._core."""
    mu = np.arange(3.0)
    blob = pickle.dumps(dict(fid=dict(mu=mu, sigma=np.eye(3))), protocol=2)
    assert b"numpy._core.multiarray" in blob
    (tmp_path / "old.pkl").write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 warns about the numpy.core alias
        np.testing.assert_array_equal(load_reference(tmp_path / "old.pkl").mu, mu)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pkl_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(dict(fid=dict(mu=_Exploit(marker), sigma=np.eye(2))), f)
    with pytest.raises(UserError, match=r"refusing to unpickle \w+\.system from .*evil\.pkl"):
        load_reference(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_reference(tmp_path / "nope.npz")
    (tmp_path / "ref.txt").write_text("mu sigma")
    with pytest.raises(UserError, match="neither an npz nor a pkl"):
        load_reference(tmp_path / "ref.txt")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not an npz archive"):
        load_reference(tmp_path / "bad.npz")


@pytest.mark.parametrize("arrays, message", [
    (dict(sigma=np.eye(3)), "no 'mu' / 'sigma'"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), "sigma has shape"),
    (dict(mu=np.array([0.0, np.nan, 0.0]), sigma=np.eye(3)), "NaN or inf"),
    (dict(mu=np.zeros(3), sigma=np.diag([np.inf, 1.0, 1.0])), "NaN or inf"),
])
def test_broken_statistics_are_refused(tmp_path, arrays, message):
    np.savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(UserError, match=message):
        load_reference(tmp_path / "ref.npz")


def test_wrong_extractor_or_dimension_is_refused(tmp_path):
    save_reference(tmp_path / "ref.npz", reference())
    with pytest.raises(UserError, match="made with extractor 'domain', not 'inception'"):
        load_reference(tmp_path / "ref.npz", expect_extractor="inception")
    with pytest.raises(UserError, match="holds 5-d statistics .* 2048-d"):
        load_reference(tmp_path / "ref.npz", expect_dim=2048)
    np.savez(tmp_path / "cf.npz", mu=np.zeros(5), sigma=np.eye(5))  # no provenance: only the dimension is checked
    assert load_reference(tmp_path / "cf.npz", expect_extractor="inception", expect_dim=5).provenance == {}


def test_stale_provenance_is_detected(tmp_path):
    save_reference(tmp_path / "ref.npz", reference())
    ref = load_reference(tmp_path / "ref.npz")
    check_fresh(ref, extractor="domain", num_samples=40, fingerprint="abc123")
    with pytest.raises(UserError, match="'fingerprint' was 'abc123', now 'def456'.*--force"):
        check_fresh(ref, extractor="domain", fingerprint="def456")
    with pytest.raises(UserError, match="'weights_sha256' was '<missing>'"):
        check_fresh(ref, weights_sha256="00ff")
    assert json.loads(json.dumps(ref.provenance)) == ref.provenance
