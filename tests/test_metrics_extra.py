"""eval.metrics: density / coverage against `prdc`, CMMD against a brute-force reference and a closed form,
and the Frechet distance never below 0."""

import warnings

import numpy as np
import pytest
from prdc import compute_prdc

from eval.metrics import (
    cmmd,
    dc_bootstrap,
    density_coverage,
    fid_bootstrap,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    precision_recall,
)
from pagoda.errors import UserError


def gaussian(n, d, seed, dtype=np.float64, shift=0.0, scale=1.0):
    return (shift + scale * np.random.default_rng(seed).normal(size=(n, d))).astype(dtype)


def lattice(n, d, seed, high):
    """Integer points: many duplicates, and distances that are exact in every implementation (true ties)."""
    return np.random.default_rng(seed).integers(0, high, size=(n, d)).astype(np.float64)


def prdc_dc(real, fake, k=5):
    out = compute_prdc(real, fake, nearest_k=k)
    return float(out["density"]), float(out["coverage"])


# ---------------------------------------------------------------- density / coverage

@pytest.mark.parametrize("n, m, d, dtype", [(200, 150, 16, np.float64), (300, 300, 8, np.float32),
                                            (64, 500, 3, np.float64), (500, 40, 32, np.float32)])
def test_dc_matches_prdc(n, m, d, dtype):
    real, fake = gaussian(n, d, 0, dtype), gaussian(m, d, 1, dtype, shift=0.2, scale=1.2)
    ours = density_coverage(real, fake)
    assert ours == pytest.approx(prdc_dc(real, fake), abs=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dc_matches_prdc_with_duplicates_and_ties(dtype):
    # 27 lattice sites for 80 real rows: sites with > k copies get radius 0, and many distances tie with radii.
    real = lattice(80, 3, 0, 3).astype(dtype)
    fake = np.concatenate([lattice(60, 3, 1, 4), real[:10]]).astype(dtype)
    ours = density_coverage(real, fake)
    assert ours == pytest.approx(prdc_dc(real, fake), abs=1e-6)
    # control: the ties are real, so `<=` membership would give another density
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    radii = np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, 5]
    assert (d_rf <= radii[:, None]).sum(0).mean() / 5 != pytest.approx(ours[0], abs=1e-3)


def test_dc_independent_of_batch():
    real, fake = gaussian(300, 12, 2, np.float32), gaussian(250, 12, 3, np.float32, scale=0.8)
    ref = density_coverage(real, fake, per_sample=True)
    for batch in (7, 64, 299):
        counts, covered = density_coverage(real, fake, batch=batch, per_sample=True)
        assert np.array_equal(counts, ref[0]) and np.array_equal(covered, ref[1])


def test_dc_per_sample_shapes_and_means():
    real, fake = gaussian(120, 4, 4), gaussian(90, 4, 5)
    counts, covered = density_coverage(real, fake, per_sample=True)
    assert counts.shape == (90,) and counts.dtype == np.int64 and covered.shape == (120,) and covered.dtype == bool
    assert (counts.mean() / 5, covered.mean()) == pytest.approx(density_coverage(real, fake))


def test_density_can_exceed_one():
    # 12 real points evenly on the unit circle: the 5th neighbour is 90 degrees away, at sqrt(2) > 1, so
    # every real ball holds the centre and a fake set at the centre has density 12 / 5.
    angles = 2 * np.pi * np.arange(12) / 12
    real = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    fake = gaussian(10, 2, 6, scale=0.01)
    density, coverage = density_coverage(real, fake)
    assert density == pytest.approx(2.4) and coverage == 1.0
    assert (density, coverage) == pytest.approx(prdc_dc(real, fake), abs=1e-6)


def test_collapsed_fake_set_has_low_coverage():
    real = gaussian(500, 8, 7)
    collapsed = real[0] + gaussian(200, 8, 8, scale=1e-3)
    _, coverage = density_coverage(real, collapsed)
    assert coverage < 0.05
    assert precision_recall(real, collapsed)[0] == 1.0  # precision does not see the collapse; coverage does
    assert density_coverage(real, gaussian(500, 8, 9))[1] > 0.8  # same distribution: most balls covered


def test_dc_refuses_too_few_real_samples():
    with pytest.raises(UserError, match="k = 5"):
        density_coverage(gaussian(5, 3, 0), gaussian(20, 3, 1))
    density_coverage(gaussian(6, 3, 0), gaussian(20, 3, 1))  # k + 1 is enough
    with pytest.raises(ValueError, match="shapes"):
        density_coverage(gaussian(20, 3, 0), gaussian(20, 4, 1))


def test_dc_bootstrap_brackets_estimate_and_is_seeded():
    real, fake = gaussian(300, 6, 10), gaussian(200, 6, 11, shift=0.3)
    (d, d_lo, d_hi), (c, c_lo, c_hi) = dc_bootstrap(real, fake, rounds=200, seed=1)
    assert (d, c) == pytest.approx(density_coverage(real, fake))
    assert d_lo <= d <= d_hi and c_lo <= c <= c_hi
    assert d_lo < d_hi and c_lo < c_hi
    assert dc_bootstrap(real, fake, rounds=200, seed=1) == ((d, d_lo, d_hi), (c, c_lo, c_hi))
    assert dc_bootstrap(real, fake, rounds=200, seed=2) != ((d, d_lo, d_hi), (c, c_lo, c_hi))


# ---------------------------------------------------------------- CMMD

def cmmd_brute(x, y, sigma=10.0, scale=1000.0):
    """Full kernel matrices, diagonals included (the reference's biased estimator)."""
    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
    return scale * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_cmmd_of_a_set_with_itself_is_zero():
    x = gaussian(300, 16, 0, scale=3.0)
    assert cmmd(x, x) == 0.0
    assert cmmd(x, x.copy(), batch=64) == 0.0
    assert cmmd(x.astype(np.float32), x.astype(np.float32)) == 0.0


def test_cmmd_symmetric_and_matches_brute_force():
    x, y = gaussian(150, 8, 1, scale=4.0), gaussian(110, 8, 2, shift=1.0, scale=5.0)
    ref = cmmd_brute(x, y)
    assert ref > 1
    for batch in (17, 64, 2048):
        assert cmmd(x, y, batch=batch) == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert cmmd(y, x) == pytest.approx(cmmd(x, y), rel=1e-12)
    assert cmmd(x, y, sigma=3.0, scale=1.0) == pytest.approx(cmmd_brute(x, y, 3.0, 1.0), rel=1e-10)


def test_cmmd_closed_form_for_gaussians():
    # x ~ N(0, s1^2 I), y ~ N(0, s2^2 I): E k(a, b) = (sigma^2 / (sigma^2 + v))^(D/2) with v the summed
    # variances, and the biased estimator's diagonals add (1 - E k_xx) / N + (1 - E k_yy) / M.
    d, n, s1, s2, sigma = 64, 2000, 1.0, 1.5, 10.0

    def ek(v):
        return (sigma**2 / (sigma**2 + v)) ** (d / 2)
    expected = 1000 * (ek(2 * s1**2) + (1 - ek(2 * s1**2)) / n + ek(2 * s2**2) + (1 - ek(2 * s2**2)) / n
                       - 2 * ek(s1**2 + s2**2))
    value = cmmd(gaussian(n, d, 3, scale=s1), gaussian(n, d, 4, scale=s2))
    # Over 20 seeds the estimate had std 0.78 around expected = 57.05; 4 std as tolerance.
    tol = 4 * 0.78
    assert value == pytest.approx(expected, abs=tol)
    # control: the wrong bandwidth moves the value far beyond the tolerance (sigma = 1: ~1.0)
    assert abs(cmmd(gaussian(n, d, 3, scale=s1), gaussian(n, d, 4, scale=s2), sigma=1.0) - value) > 10 * tol


def test_cmmd_refuses_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        cmmd(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(UserError, match="sigma"):
        cmmd(np.zeros((3, 4)), np.zeros((3, 4)), sigma=0.0)


# ---------------------------------------------------------------- Frechet distance is never negative

def correlated(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d)) + rng.normal(size=d)


@pytest.mark.parametrize("n, d", [(200, 16), (50, 128)])  # D <= N (eigen path) and N < D (nuclear-norm path)
def test_fd_against_own_statistics_is_zero_not_negative(n, d):
    # Unclamped, these come out as rounding noise of either sign (~1e-13); a negative one must read 0.0.
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N < D warning
        for seed in range(6):
            x = correlated(n, d, seed)
            mu, sigma = gaussian_stats(x)
            values += [frechet_distance(mu, sigma, mu, sigma), fid_from_features(x, x),
                       fid_bootstrap(x, mu, sigma, rounds=2)[0]]
    assert all(0.0 <= v < 1e-9 for v in values)
    assert 0.0 in values  # the noise below 0 became exactly 0.0
