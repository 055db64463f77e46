"""The feature cache (eval.cache): a warm run extracts nothing, a run killed with SIGKILL resumes to the same
statistics as an uninterrupted one, and the key changes with everything the features depend on."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval.cache import FeatureCache
from eval.pipeline import Want, extract
from eval.sources import RandomOrder, Resized, open_source

N = 48
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_images, write_pngs):
    return write_pngs(tmp_path_factory.mktemp("store"), real_images[:N])


@pytest.fixture(scope="module")
def inception(inception_weights):
    from eval.extractors import get_extractor
    return get_extractor("inception", weights_dir=inception_weights.parent)


def run(source, ex, cache, store=N):
    out = extract(source, {"inception": ex}, {"inception": Want(store=store, logits=True)}, batch=5, cache=cache)
    return out["inception"]


def same(a, b) -> bool:
    return (np.array_equal(a.stats.mean(), b.stats.mean()) and np.array_equal(a.stats.cov(), b.stats.cov())
            and np.array_equal(a.store.features(), b.store.features())
            and np.array_equal(a.logits.features(), b.logits.features()))


def test_warm_run_extracts_nothing(folder, inception, tmp_path):
    cache = FeatureCache(tmp_path / "features", shard=16)
    cold = run(open_source(str(folder)), inception, cache)
    assert cold.extra == {"extracted": N, "from_cache": 0}
    warm = run(open_source(str(folder)), inception, cache)
    assert warm.extra == {"extracted": 0, "from_cache": N} and same(cold, warm)
    uncached = run(open_source(str(folder)), inception, None)  # the features are the network's, batch for batch
    assert np.array_equal(uncached.store.features(), cold.store.features())
    assert np.allclose(uncached.stats.cov(), cold.stats.cov(), rtol=1e-12, atol=1e-12)  # float64 sums, other order
    first = run(open_source(str(folder), num_samples=20), inception, cache, store=20)  # full shards are shared
    assert first.extra == {"extracted": 4, "from_cache": 16}
    (key,) = os.listdir(tmp_path / "features")
    shard = tmp_path / "features" / key / "000000016-000000032.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # damaged: computed again, not trusted
    again = run(open_source(str(folder)), inception, cache)
    assert again.extra == {"extracted": 16, "from_cache": 32} and same(cold, again)


def test_key_follows_content_order_resize_and_weights(folder, inception, tmp_path):
    cache = FeatureCache(tmp_path)
    plain = open_source(str(folder))
    keys = {cache.key(plain, inception), cache.key(RandomOrder(open_source(str(folder)), seed=0), inception),
            cache.key(Resized(open_source(str(folder)), 32), inception)}
    assert len(keys) == 3
    other = type("Other", (), dict(name="inception", weights_sha256="0" * 64, resize=inception.resize))()
    assert cache.key(plain, other) not in keys
    assert cache.key(plain, type("NoHash", (), dict(name="x", weights_sha256=None))()) is None
    from eval.sources import TensorSource
    assert cache.key(TensorSource(plain.load(np.arange(2))[0]), inception) is None  # no content to key


SCRIPT = """
import sys, pathlib, numpy as np
from eval.cache import FeatureCache
from eval.extractors import get_extractor
from eval.pipeline import Want, extract
from eval.sources import open_source
weights, folder, root, out = sys.argv[1:]
ex = get_extractor("inception", weights_dir=weights)
o = extract(open_source(folder), {"inception": ex}, {"inception": Want(store=48, logits=True)}, batch=2,
            cache=FeatureCache(pathlib.Path(root), shard=4))["inception"]
np.savez(out, mu=o.stats.mean(), sigma=o.stats.cov(), features=o.store.features(), logits=o.logits.features(),
         counts=[o.extra["extracted"], o.extra["from_cache"]])
"""


def test_sigkill_then_rerun_equals_an_uninterrupted_run(folder, inception_weights, tmp_path):
    """Same process settings for all three runs (a subprocess each, batch 2, one thread): oneDNN's kernels, hence
    the last bits of a feature, may differ with batch size and thread count, never with the interruption."""
    root = tmp_path / "features"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def start(root, out):
        return subprocess.Popen([sys.executable, "-c", SCRIPT, str(inception_weights.parent), str(folder), str(root),
                                 str(out)], env=env, cwd=ROOT)

    proc = start(root, tmp_path / "killed.npz")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(root.glob("*/[0-9]*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(root.glob("*/[0-9]*.npz")))
    assert 2 <= done < N // 4 and not (tmp_path / "killed.npz").exists(), "the run was to be killed part-way"
    assert start(root, tmp_path / "resumed.npz").wait() == 0
    assert start(tmp_path / "fresh", tmp_path / "whole.npz").wait() == 0
    resumed, whole = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "whole.npz")
    assert resumed["counts"].tolist() == [N - 4 * done, 4 * done] and whole["counts"].tolist() == [N, 0]
    for k in ("mu", "sigma", "features", "logits"):
        assert np.array_equal(resumed[k], whole[k]), k
    for shard in root.glob("*/[0-9]*.npz"):  # whatever the kill cut short kept a temporary (hidden) name
        assert FeatureCache(root, shard=4).load(shard.parent.name, *map(int, shard.stem.split("-"))) is not None
