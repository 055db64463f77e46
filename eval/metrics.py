"""Metrics as pure functions: features (or their statistics) in, numbers out. No I/O, no state.

Conventions follow METHOD.md §5 and match torch-fidelity 0.4.0 / clean-fid given the same features:
FD from the eigenvalues of S1 S2 (in symmetric form); KID with the cubic polynomial kernel and unbiased MMD^2 over seeded
subsets; IS from bias-free logits in ADM (contiguous) or torch-fidelity (shuffled) splits; precision /
recall of Kynkaenniemi et al. with k-NN radii excluding self and `<=` membership; density / coverage of
Naeem et al. (k = 5, radii from the real set, strict `<` membership, as the `prdc` package); CMMD of
Jayasumana et al. (Gaussian RBF, sigma = 10, biased MMD^2 x 1000, as google-research `cmmd`); CLIP score;
percentile bootstrap intervals; per-class wrappers. Frechet distances and CMMD are never below 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from pagoda.errors import UserError


def _f64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------
# Frechet distance (FID, FD-DINOv2).


def _warn_singular(n: int, d: int) -> None:
    warnings.warn(f"{n} samples < feature dimension {d}: the covariance is singular and the Frechet "
                  "distance is biased upwards; not comparable with published numbers", stacklevel=3)


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof = 1) of [N, D] features; warns when N < D (singular covariance)."""
    x = _f64(feats)
    n, d = x.shape
    if n < d:
        _warn_singular(n, d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_eigvals(m: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix; those below rounding level (D eps max|w|) set to exactly 0."""
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return np.where(w > len(m) * np.finfo(np.float64).eps * np.abs(w).max(initial=0.0), w, 0.0)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root R of a PSD matrix (R R = sigma) from eigh, rounding-level eigenvalues -> 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    w = np.where(w > len(w) * np.finfo(np.float64).eps * np.abs(w).max(initial=0.0), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def _fd_sum(diff_sq, tr1, tr2, tr_covmean) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), never below 0.

    A squared distance: identical statistics give rounding noise of either sign (~1e-13), and a
    negative FD would read as "better than the reference itself", so the noise below 0 is cut off.
    """
    return max(float(diff_sq + tr1 + tr2 - 2 * tr_covmean), 0.0)


def _fd(mu1, sigma1, mu2, sigma2, root2) -> float:
    """Eq. FD with tr sqrt(S1 S2) = sum sqrt(eig(R2 S1 R2)), R2 = S2^1/2 given."""
    diff = mu1 - mu2
    tr_covmean = np.sqrt(_psd_eigvals(root2 @ sigma1 @ root2)).sum()
    return _fd_sum(diff @ diff, np.trace(sigma1), np.trace(sigma2), tr_covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) between N(mu1, S1) and N(mu2, S2).

    The eigenvalues of S1 S2 equal those of the symmetric PSD matrix S2^1/2 S1 S2^1/2, so they are taken
    from that with eigvalsh instead of from the general eigvals of S1 S2 (torch-fidelity) or sqrtm
    (clean-fid): the same number to ~1e-12 on full-rank covariances (tested), several times faster, and
    with rounding-level eigenvalues dropped it stays exact when N < D makes the covariances singular
    (FD(x, x) = 0 instead of a sum of ~D square roots of rounding noise). Never below 0: rounding noise
    under 0 is reported as 0.0. Raises ValueError when the shapes disagree.
    """
    mu1, mu2, sigma1, sigma2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape}, {mu2.shape}; "
                         f"sigma {sigma1.shape}, {sigma2.shape}")
    return _fd(mu1, sigma1, mu2, sigma2, _sqrt_psd(sigma2))


def fid_from_features(f_real, f_fake) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (unbiased covariances).

    When a set has fewer rows than dimensions (one class of a class-conditional model, say), the D x D
    eigendecompositions are replaced by an n1 x n2 SVD: with X_i = centred rows / sqrt(n_i - 1), S_i =
    X_i^T X_i, the eigenvalues of S1 S2 are the squared singular values of X1 X2^T, so tr sqrt(S1 S2) is
    its nuclear norm. Same number (to rounding), ~1000x faster for 50 rows at D = 2048. Never below 0.
    Raises ValueError when the widths differ or a set has fewer than 2 rows.
    """
    x1, x2 = _f64(f_real), _f64(f_fake)
    d = x1.shape[1]
    if min(len(x1), len(x2)) >= d:
        return frechet_distance(*gaussian_stats(x1), *gaussian_stats(x2))
    if x2.shape[1] != d or min(len(x1), len(x2)) < 2:
        raise ValueError(f"fid_from_features: need >= 2 rows of equal width, got {x1.shape} and {x2.shape}")
    _warn_singular(min(len(x1), len(x2)), d)
    mu1, mu2 = x1.mean(0), x2.mean(0)
    c1, c2 = (x1 - mu1) / np.sqrt(len(x1) - 1), (x2 - mu2) / np.sqrt(len(x2) - 1)
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum()
    return _fd_sum((mu1 - mu2) @ (mu1 - mu2), (c1 * c1).sum(), (c2 * c2).sum(), tr_covmean)


# ----------------------------------------------------------------------------
# Kernel inception distance.


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2: off-diagonal means of K_xx and K_yy minus twice the mean of K_xy."""
    m = k_xx.shape[0]
    off = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(off / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(f_real, f_fake, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0, seed: int = 2020) -> tuple[float, float]:
    """KID: mean and std (ddof 0) of the unbiased MMD^2 with kernel (gamma x.y + coef0)^degree over subsets.

    gamma defaults to 1/D. Subsets are drawn like torch-fidelity's `kid_features_to_metric(fake, real)`:
    one `np.random.RandomState(seed)`, per subset first `subset_size` fake rows then `subset_size` real
    rows, without replacement. A subset larger than either set is refused (as torch-fidelity does;
    clean-fid would silently shrink it, which changes the estimator).
    """
    x, y = _f64(f_fake), _f64(f_real)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature shapes disagree: real {y.shape}, fake {x.shape}")
    if subset_size > min(len(x), len(y)) or subset_size < 2:
        raise UserError(f"KID subset size {subset_size} does not fit {len(y)} real / {len(x)} generated samples: "
                        "pass a subset size between 2 and the smaller sample count, or use more samples")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def kernel(p, q):
        return (gamma * (p @ q.T) + coef0) ** degree

    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(kernel(a, a), kernel(a, b), kernel(b, b))
    return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------
# Inception score.


def inception_score(logits, *, splits: int = 10, style: str = "adm", seed: int = 2020) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) || p(y)) per split; mean and std (ddof 0) over splits.

    `logits` are the bias-free Inception logits [N, C]. style 'adm': contiguous splits in sample order
    (the ADM evaluator); 'torch-fidelity': rows first permuted by `RandomState(seed).permutation(N)`.
    Split i holds rows [i N // splits, (i + 1) N // splits).
    """
    if style not in ("adm", "torch-fidelity"):
        raise UserError(f"inception score style '{style}' is unknown; use 'adm' or 'torch-fidelity'")
    z = _f64(logits)
    n = len(z)
    if n < splits:
        raise UserError(f"inception score: {n} samples cannot fill {splits} splits; use more samples or fewer "
                        "splits (eval.run: --estimator is_splits=N)")
    if style == "torch-fidelity":
        z = z[np.random.RandomState(seed).permutation(n)]
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(axis=0, keepdims=True))
        kl = (p[lo:hi] * (log_p[lo:hi] - log_q)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------
# Precision and recall (Kynkaenniemi et al. 2019).


def _as_torch(x, device) -> torch.Tensor:
    """float64 stays float64; anything else becomes float32 (the reference tools' precision)."""
    t = torch.as_tensor(x).detach()
    return t.to(device, torch.float64 if t.dtype == torch.float64 else torch.float32)


def knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row; memory O(batch^2)."""
    if len(x) <= k:
        raise UserError(f"precision / recall: {len(x)} samples are too few for k = {k} neighbours; use more samples")
    radii = []
    for rows in x.split(batch):
        best = None  # the k + 1 smallest distances so far (the row itself is one of them, at 0)
        for cols in x.split(batch):
            d = torch.cdist(rows, cols)
            best = d if best is None else torch.cat([best, d], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def manifold_membership(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """For each query row: does it fall in some ball B(ref_j, radii_j) (distance <= radius)? Bool [len(query)]."""
    inside = []
    for rows in query.split(batch):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, r in zip(ref.split(batch), radii.split(batch)):
            hit |= (torch.cdist(rows, cols) <= r).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)


def precision_recall(real, fake, *, k: int = 3, batch: int = 10000, device=None,
                     per_sample: bool = False):
    """Precision = share of fake inside the real manifold; recall = share of real inside the fake manifold.

    Each manifold is the union of balls around its points with radius the distance to the k-th nearest
    neighbour excluding the point itself; membership uses `<=`. Equals torch-fidelity 0.4.0's
    `prc_features_to_metric(fake, real)` on the same features. With per_sample=True returns the two
    boolean membership vectors (fake-in-real, real-in-fake) instead of their means.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    r, f = _as_torch(real, device), _as_torch(fake, device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall: feature shapes disagree: real {tuple(r.shape)}, fake {tuple(f.shape)}")
    dtype = torch.promote_types(r.dtype, f.dtype)
    r, f = r.to(dtype), f.to(dtype)
    fake_in_real = manifold_membership(f, r, knn_radii(r, k, batch), batch).cpu().numpy()
    real_in_fake = manifold_membership(r, f, knn_radii(f, k, batch), batch).cpu().numpy()
    if per_sample:
        return fake_in_real, real_in_fake
    return float(fake_in_real.mean()), float(real_in_fake.mean())


# ----------------------------------------------------------------------------
# Density and coverage (Naeem et al. 2020).


def _ball_hits(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor,
               batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict membership (distance < radius, as prdc): per query row the number of balls B(ref_i, radii_i)
    holding it (int64 [len(query)]); per ball whether it holds any query row (bool [len(ref)]). Memory
    O(batch^2)."""
    counts, held = [], torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for rows in query.split(batch):
        count = torch.zeros(len(rows), dtype=torch.int64, device=rows.device)
        for i, (cols, r) in enumerate(zip(ref.split(batch), radii.split(batch))):
            inside = torch.cdist(rows, cols) < r
            count += inside.sum(dim=1)
            held[i * batch:i * batch + len(cols)] |= inside.any(dim=0)
        counts.append(count)
    return torch.cat(counts), held


def density_coverage(real, fake, *, k: int = 5, batch: int = 10000, device=None, per_sample: bool = False):
    """Density and coverage of Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative
    Models" (ICML 2020), Eqs. 3 and 4; equal to `prdc.compute_prdc(real, fake, nearest_k=k)` (prdc 0.2).

    real [N, D], fake [M, D]: features as numpy arrays or tensors; float64 stays float64, anything else is
    computed in float32 (as precision_recall). Only the real set is a manifold: r_i = distance from real_i
    to its k-th nearest other real row, and membership is strict (`<`, prdc's choice; precision uses `<=`):

        density  = 1 / (k M) sum_j sum_i [|fake_j - real_i| < r_i]     (can exceed 1)
        coverage = 1 / N sum_i [min_j |fake_j - real_i| < r_i]

    Returns (density, coverage) as floats; with per_sample=True instead (counts, covered): int64 [M], the
    number of real balls holding each fake row, and bool [N], whether each real ball holds a fake row.
    Raises UserError when N <= k or M == 0, ValueError when the shapes disagree.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    r, f = _as_torch(real, device), _as_torch(fake, device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"density_coverage: feature shapes disagree: real {tuple(r.shape)}, fake {tuple(f.shape)}")
    if len(r) <= k or len(f) == 0:
        raise UserError(f"density / coverage: {len(r)} real and {len(f)} generated samples are too few for "
                        f"k = {k} neighbours; use more than k real samples and at least one generated sample")
    dtype = torch.promote_types(r.dtype, f.dtype)
    r, f = r.to(dtype), f.to(dtype)
    counts, covered = (t.cpu().numpy() for t in _ball_hits(f, r, knn_radii(r, k, batch), batch))
    if per_sample:
        return counts, covered
    return float(counts.mean() / k), float(covered.mean())


def dc_bootstrap(real, fake, *, k: int = 5, batch: int = 10000, rounds: int = 1000, alpha: float = 0.05,
                 seed: int = 0, device=None) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((density, low, high), (coverage, low, high)): density_coverage() with percentile bootstrap intervals.

    As pr_bootstrap: the per-sample counts (fake) and covered flags (real) are resampled with the real
    manifold held fixed. Deterministic given the seed. Raises what density_coverage and bootstrap_ci raise.
    """
    counts, covered = density_coverage(real, fake, k=k, batch=batch, device=device, per_sample=True)
    counts = counts.astype(np.float64)
    dens = (float(counts.mean() / k), *bootstrap_ci(lambda c: c.mean() / k, counts, n_boot=rounds,
                                                    alpha=alpha, seed=seed))
    cov = (float(covered.mean()), *bootstrap_ci(np.mean, covered.astype(np.float64), n_boot=rounds,
                                                alpha=alpha, seed=seed))
    return dens, cov


# ----------------------------------------------------------------------------
# CMMD (Jayasumana et al. 2024).


def _rbf_mean(a: torch.Tensor, b: torch.Tensor, gamma: float, batch: int) -> torch.Tensor:
    """Mean of exp(-gamma |a_i - b_j|^2) over all N x M pairs, summed block by block (memory O(batch^2))."""
    a_sq, b_sq = (a * a).sum(dim=1), (b * b).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for rows, rows_sq in zip(a.split(batch), a_sq.split(batch)):
        for cols, cols_sq in zip(b.split(batch), b_sq.split(batch)):
            d2 = (rows_sq[:, None] + cols_sq[None, :] - 2 * rows @ cols.T).clamp_min(0)
            total += torch.exp(-gamma * d2).sum()
    return total / (len(a) * len(b))


def cmmd(x, y, *, sigma: float = 10.0, scale: float = 1000.0, batch: int = 2048, device=None) -> float:
    """CMMD of Jayasumana et al., "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"
    (CVPR 2024): scale x the biased (V-statistic) MMD^2 with a Gaussian RBF kernel, as the reference
    google-research/google-research `cmmd/distance.py` (`mmd`, Gretton et al. 2012 Eq. 5) computes it:

        k(a, b) = exp(-|a - b|^2 / (2 sigma^2)),  |a - b|^2 = |a|^2 + |b|^2 - 2 a.b
        CMMD    = scale (mean K_xx + mean K_yy - 2 mean K_xy)

    with the means over the full N x N, M x M and N x M kernel matrices, diagonals included (so a set
    against itself gives exactly 0, and each diagonal adds (1 - E k_xx) / N to the expectation).
    x [N, D], y [M, D]: any features (numpy or tensors), computed in float64. For CMMD proper they are the
    L2-normalised CLIP ViT-L/14-336 image embeddings; the caller normalises (this function does not).
    Kernel sums run over batch x batch blocks, so N x M never materialises; the result depends on batch
    only through float64 summation order. Symmetric in x, y; never below 0 (a squared RKHS norm; squared
    distances under 0 from rounding are cut to 0). Raises ValueError when the shapes disagree, UserError
    when a set is empty or sigma <= 0.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    a = torch.as_tensor(x).detach().to(device, torch.float64)
    b = torch.as_tensor(y).detach().to(device, torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cmmd: feature shapes disagree: x {tuple(a.shape)}, y {tuple(b.shape)}")
    if len(a) == 0 or len(b) == 0 or not sigma > 0:
        raise UserError(f"cmmd: got {len(a)} and {len(b)} samples with sigma = {sigma}; "
                        "pass non-empty feature sets and sigma > 0")
    gamma = 1.0 / (2 * sigma**2)
    mmd2 = _rbf_mean(a, a, gamma, batch) + _rbf_mean(b, b, gamma, batch) - 2 * _rbf_mean(a, b, gamma, batch)
    return max(float(scale * mmd2), 0.0)


# ----------------------------------------------------------------------------
# CLIP score.


def clip_score(cosines) -> float:
    """100 * mean(max(cos, 0)) of per-sample image-text cosine similarities."""
    c = _f64(cosines).reshape(-1)
    return float(100 * np.maximum(c, 0).mean())


# ----------------------------------------------------------------------------
# Bootstrap confidence intervals.


def bootstrap_ci(fn: Callable[..., float], *arrays, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 paired: bool = False) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of fn(*arrays) over rows resampled with replacement.

    paired=True draws one set of row indices shared by all arrays (they must have equal length, e.g. a
    sample's features and its label); otherwise each array is resampled independently.
    """
    if not 0 < alpha < 1 or n_boot < 1:
        raise UserError(f"bootstrap: need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    arrays = [np.asarray(a) for a in arrays]
    if paired and len({len(a) for a in arrays}) > 1:
        raise ValueError(f"bootstrap_ci(paired=True): arrays have different lengths {[len(a) for a in arrays]}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        if paired:
            idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
            values[b] = fn(*(a[idx] for a in arrays))
        else:
            values[b] = fn(*(a[rng.integers(0, len(a), len(a))] for a in arrays))
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def fid_bootstrap(f_fake, mu_ref, sigma_ref, *, rounds: int = 100, alpha: float = 0.05,
                  seed: int = 0) -> tuple[float, float, float]:
    """FID / FD of generated features against fixed reference statistics, with a bootstrap interval.

    Only the generated features are resampled: the reference is a fixed target. Returns (fd, low, high);
    fd is frechet_distance() on all features. Resampling repeats rows, which lowers the effective
    sample count, so bootstrap FDs sit above fd and the interval need not contain it.
    """
    x, mu_ref, sigma_ref = _f64(f_fake), _f64(mu_ref), _f64(sigma_ref)
    fd = frechet_distance(*gaussian_stats(x), mu_ref, sigma_ref)
    root = _sqrt_psd(sigma_ref)  # once: every round reuses the reference's square root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gaussian_stats already warned once about N < D
        low, high = bootstrap_ci(lambda f: _fd(*gaussian_stats(f), mu_ref, sigma_ref, root), x,
                                 n_boot=rounds, alpha=alpha, seed=seed)
    return fd, low, high


def pr_bootstrap(real, fake, *, k: int = 3, batch: int = 10000, rounds: int = 1000, alpha: float = 0.05,
                 seed: int = 0, device=None) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """((precision, low, high), (recall, low, high)).

    Resamples the per-sample membership indicators with the manifolds held fixed: resampling the points
    themselves would duplicate them and shrink their k-NN radii to zero, biasing both numbers.
    """
    fake_in_real, real_in_fake = precision_recall(real, fake, k=k, batch=batch, device=device, per_sample=True)
    out = []
    for member in (fake_in_real, real_in_fake):
        low, high = bootstrap_ci(np.mean, member.astype(np.float64), n_boot=rounds, alpha=alpha, seed=seed)
        out.append((float(member.mean()), low, high))
    return out[0], out[1]


# ----------------------------------------------------------------------------
# Per-class metrics for class-conditional models.


def per_class(fn: Callable[..., float], feats, labels, ref_feats, ref_labels, *, min_count: int = 2) -> dict:
    """{class: fn(ref_feats of the class, feats of the class)} for classes with >= min_count rows in both sets.

    e.g. per_class(fid_from_features, fake, y_fake, real, y_real) or
    per_class(precision_recall, fake, y_fake, real, y_real, min_count=4).
    """
    feats, labels = np.asarray(feats), np.asarray(labels).reshape(-1)
    ref_feats, ref_labels = np.asarray(ref_feats), np.asarray(ref_labels).reshape(-1)
    if len(feats) != len(labels) or len(ref_feats) != len(ref_labels):
        raise ValueError("per_class: every feature row needs one label")
    out = {}
    for c in np.intersect1d(labels, ref_labels):
        mine, ref = feats[labels == c], ref_feats[ref_labels == c]
        if min(len(mine), len(ref)) >= min_count:
            out[int(c)] = fn(ref, mine)
    return out
