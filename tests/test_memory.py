"""FID's memory does not grow with the sample count: the streaming pass keeps only float64 sums.

Counted exactly, not timed: every tensor / array reachable from what `extract` returns is
summed in bytes, for 200 and for 6,400 samples. FID keeps the same bytes either way; a stored
feature set for KID / P-R is capped at its capacity, whatever the sample count.
"""

import numpy as np
import torch

from eval.pipeline import Want, extract
from eval.sources import Source


class NoiseSource(Source):
    """`num_samples` random 8 px images, made on demand (nothing held)."""

    name, resolution = "noise", 8

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def load(self, index):
        g = torch.Generator().manual_seed(int(index[0]))
        return torch.randint(0, 256, (len(index), 3, 8, 8), dtype=torch.uint8, generator=g), None


class PoolExtractor:
    """A fixed random projection of 4x4-pooled pixels: 48 inputs -> 32-d features (cheap, deterministic)."""

    name, feature_dim, num_logits, spatial_dim, resize = "pool", 32, 0, 0, "none"
    weights_sha256 = weights_trust = None  # no weights file: nothing to key a cache on or to trust
    device = "cpu"

    def __init__(self):
        self.w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))

    def __call__(self, x):
        pooled = torch.nn.functional.avg_pool2d(x.float() / 255, 2).flatten(1)
        return {"features": pooled @ self.w}


def held_bytes(obj, seen=None) -> int:
    """Bytes of every tensor / ndarray reachable from obj through attributes, dicts and sequences."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k != "extractor")
    return 0


def _held(n: int, want: Want | None = None) -> tuple[int, float]:
    out = extract(NoiseSource(n), {"pool": PoolExtractor()}, {"pool": want} if want else None, batch=100,
                  progress=False)["pool"]
    return held_bytes(out), out.stats.n


def test_fid_state_is_independent_of_sample_count():
    small, n_small = _held(200)
    large, n_large = _held(6400)
    assert (n_small, n_large) == (200, 6400)
    assert small == large
    assert small <= 8 * (32 * 32 + 32) + 1024  # the float64 sums (plus a count), nothing per sample


def test_feature_store_is_capped_at_its_capacity():
    capped_small, _ = _held(1000, Want(store=500))
    capped_large, _ = _held(6400, Want(store=500))
    fid_only, _ = _held(6400)
    assert capped_small == capped_large
    assert capped_large - fid_only <= 500 * (32 + 1) * 8 + 1024  # 500 rows of features (+ their indices)
