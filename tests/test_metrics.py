"""eval.metrics: closed forms, invariants, and parity with torch-fidelity 0.4.0 and clean-fid on the same features."""

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from eval.metrics import (
    bootstrap_ci,
    clip_score,
    fid_bootstrap,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    per_class,
    pr_bootstrap,
    precision_recall,
)
from pagoda.errors import UserError


def correlated(n, d, seed, shift=0.0, scale=1.0):
    """n samples of a d-dim Gaussian with a random (non-diagonal) covariance."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ a + rng.normal(size=d) * 0.1


@pytest.fixture(scope="module")
def feats():
    return correlated(400, 64, 0), correlated(300, 64, 1, shift=0.3, scale=1.3)


# ---------------------------------------------------------------- Frechet distance

def test_fd_of_identical_statistics_is_zero(feats):
    mu, sigma = gaussian_stats(feats[0])
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fd_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_symmetric_and_nonnegative(feats):
    s1, s2 = gaussian_stats(feats[0]), gaussian_stats(feats[1])
    d12, d21 = frechet_distance(*s1, *s2), frechet_distance(*s2, *s1)
    assert d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-9)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fd_matches_torch_fidelity_and_cleanfid(feats):
    (mu1, s1), (mu2, s2) = gaussian_stats(feats[0]), gaussian_stats(feats[1])
    ours = frechet_distance(mu1, s1, mu2, s2)
    tf = fid_statistics_to_metric(dict(mu=mu1, sigma=s1), dict(mu=mu2, sigma=s2), verbose=False)
    cf = cleanfid_fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-3)
    assert ours == pytest.approx(cf, rel=1e-3)


def test_fd_warns_when_fewer_samples_than_dims():
    with pytest.warns(UserWarning, match="feature dimension"):
        gaussian_stats(np.random.default_rng(0).normal(size=(10, 20)))


def test_fd_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- KID

def test_kid_matches_torch_fidelity_exactly(feats):
    real, fake = feats
    ours = kid(real, fake, subsets=20, subset_size=100, seed=7)
    tf = kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), kid_subsets=20,
                                kid_subset_size=100, rng_seed=7, verbose=False)
    assert ours[0] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-9)
    assert ours[0] > 0


def test_kid_matches_cleanfid(feats):
    real, fake = feats
    state = np.random.get_state()
    try:
        np.random.seed(11)  # clean-fid draws from the global generator, fake (feats2) first
        cf = cleanfid_fid.kernel_distance(real, fake, num_subsets=20, max_subset_size=100)
    finally:
        np.random.set_state(state)
    assert kid(real, fake, subsets=20, subset_size=100, seed=11)[0] == pytest.approx(cf, rel=1e-9)


def test_kid_near_zero_for_same_distribution():
    a, b = correlated(300, 16, 5), correlated(300, 16, 5)[::-1].copy()
    same = kid(a, b + 0.0, subsets=10, subset_size=100)[0]
    shifted = kid(a, b + 1.0, subsets=10, subset_size=100)[0]
    assert abs(same) < 0.1 * shifted


def test_kid_subset_larger_than_set_is_refused(feats):
    with pytest.raises(UserError, match="subset size 1000"):
        kid(*feats, subset_size=1000)


# ---------------------------------------------------------------- Inception score

@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(4)
    return rng.normal(size=(500, 40)) * 3


def test_is_matches_torch_fidelity_both_styles(logits):
    t = torch.from_numpy(logits)
    tf_shuf = isc_features_to_metric(t, splits=10, shuffle=True, rng_seed=2020)
    tf_flat = isc_features_to_metric(t, splits=10, shuffle=False)
    ours_shuf = inception_score(logits, style="torch-fidelity")
    ours_flat = inception_score(logits, style="adm")
    assert ours_shuf[0] == pytest.approx(tf_shuf["inception_score_mean"], rel=1e-9)
    assert ours_shuf[1] == pytest.approx(tf_shuf["inception_score_std"], rel=1e-9)
    assert ours_flat[0] == pytest.approx(tf_flat["inception_score_mean"], rel=1e-9)
    assert ours_flat[1] == pytest.approx(tf_flat["inception_score_std"], rel=1e-9)
    assert ours_flat[1] != pytest.approx(ours_shuf[1], rel=1e-6)  # the two styles really split differently


def test_is_closed_forms():
    c = 8
    uniform = np.zeros((80, c))
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.eye(c)[np.arange(80) % c] * 60.0  # every class equally often, each image certain
    mean, std = inception_score(confident, splits=5)  # 16 rows per split: 2 of each class
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6


def test_is_rejects_unknown_style(logits):
    with pytest.raises(UserError, match="style"):
        inception_score(logits, style="tf")


# ---------------------------------------------------------------- precision / recall

@pytest.fixture(scope="module")
def pr_feats():
    """Overlapping but different sets: precision ~0.3, recall ~0.97."""
    rng = np.random.default_rng(12)
    return rng.normal(size=(400, 16)), 0.3 + 1.3 * rng.normal(size=(300, 16))


def test_pr_matches_torch_fidelity(pr_feats):
    real, fake = pr_feats
    tf = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    p, r = precision_recall(real, fake)
    # torch-fidelity averages in float32, hence 1e-6
    assert (p, r) == (pytest.approx(tf["precision"], abs=1e-6), pytest.approx(tf["recall"], abs=1e-6))
    assert 0.1 < p < 0.9 and 0.1 < r < 0.999


def test_pr_float32_matches_torch_fidelity(pr_feats):
    real, fake = (torch.from_numpy(f).float() for f in pr_feats)
    tf = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                verbose=False)
    assert precision_recall(real, fake) == (pytest.approx(tf["precision"], abs=1e-6),
                                            pytest.approx(tf["recall"], abs=1e-6))


def test_pr_independent_of_batch(pr_feats):
    real, fake = pr_feats
    assert precision_recall(real, fake, batch=37) == precision_recall(real, fake, batch=10000)


def test_pr_collapsed_generator_has_high_precision_low_recall():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(500, 16))
    modes = real[:5]  # the generator reproduces a few real points, tightly
    fake = modes[rng.integers(0, 5, 500)] + 0.01 * rng.normal(size=(500, 16))
    p, r = precision_recall(real, fake)
    assert p > 0.8 and r < 0.3


def test_pr_identical_sets_are_perfect(feats):
    assert precision_recall(feats[0], feats[0]) == (1.0, 1.0)


# ---------------------------------------------------------------- CLIP score, bootstrap, per class

def test_clip_score_clips_negative_cosines():
    assert clip_score(np.array([0.3, -0.2, 0.1, 0.0])) == pytest.approx(100 * 0.4 / 4)


def test_bootstrap_ci_of_a_mean_matches_normal_theory():
    x = np.random.default_rng(2).normal(size=2000)
    low, high = bootstrap_ci(np.mean, x, n_boot=500, seed=1)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert low < x.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(np.mean, x, n_boot=500, seed=1) == (low, high)


def test_bootstrap_paired_keeps_rows_together():
    x = np.arange(100.0)
    low, high = bootstrap_ci(lambda a, b: float(np.max(np.abs(a - b))), x, x, n_boot=50, paired=True)
    assert low == high == 0.0
    with pytest.raises(ValueError, match="lengths"):
        bootstrap_ci(np.mean, x, x[:10], paired=True)


def test_fid_bootstrap_interval(feats):
    real, fake = feats
    mu, sigma = gaussian_stats(real)
    fd, low, high = fid_bootstrap(fake, mu, sigma, rounds=20, seed=0)
    assert fd == pytest.approx(fid_from_features(real, fake), rel=1e-12)
    assert fd == pytest.approx(frechet_distance(*gaussian_stats(fake), mu, sigma), rel=1e-12)
    assert 0 < low < high
    assert 0.5 * fd < low and high < 2 * fd
    assert fid_bootstrap(fake, mu, sigma, rounds=20, seed=0) == (fd, low, high)


def test_pr_bootstrap_brackets_the_estimate(pr_feats):
    (p, plo, phi), (r, rlo, rhi) = pr_bootstrap(*pr_feats, rounds=200)
    assert (p, r) == precision_recall(*pr_feats)
    assert plo <= p <= phi and rlo <= r <= rhi and plo < phi


def test_per_class_fid_finds_the_bad_class():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(400, 8))
    y_real = np.arange(400) % 2
    fake = rng.normal(size=(400, 8))
    y_fake = np.arange(400) % 2
    fake[y_fake == 1] += 2.0  # class 1 is off
    fid = per_class(fid_from_features, fake, y_fake, real, y_real)
    assert sorted(fid) == [0, 1]
    assert fid[1] > 10 * fid[0]
    assert fid[1] == pytest.approx(fid_from_features(real[y_real == 1], fake[y_fake == 1]))
    pr = per_class(precision_recall, fake, y_fake, real, y_real)
    assert pr[0][0] > pr[1][0]


def test_fd_exact_zero_with_singular_covariance():
    """N < D: the covariance has rank N - 1; FD(x, x) must not pick up sqrt(rounding noise) from the null space."""
    x = np.abs(np.random.default_rng(6).normal(size=(12, 512)))
    with pytest.warns(UserWarning):
        mu, sigma = gaussian_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_matches_general_eigvals_form(feats):
    """The symmetric eigvalsh form equals the eigvals(S1 S2) form of torch-fidelity to rounding."""
    (mu1, s1), (mu2, s2) = gaussian_stats(feats[0]), gaussian_stats(feats[1])
    general = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * general
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fd_parity_at_inception_like_scale():
    """1024-d rectified low-rank features (like pool3), a few thousand samples: within 1e-3 of clean-fid's sqrtm."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(128, 1024)) / 12

    def make(n, shift):
        return np.maximum(rng.normal(size=(n, 128)) @ a + shift + 0.05 * rng.normal(size=(n, 1024)), 0)

    s1, s2 = gaussian_stats(make(3000, 0.10)), gaussian_stats(make(3000, 0.12))
    ours = frechet_distance(*s1, *s2)
    assert ours == pytest.approx(cleanfid_fid.frechet_distance(*s1, *s2), rel=1e-3)
    tf = fid_statistics_to_metric(dict(mu=s1[0], sigma=s1[1]), dict(mu=s2[0], sigma=s2[1]), verbose=False)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
