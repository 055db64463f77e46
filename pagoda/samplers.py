"""Stateless samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. (3)).

One signature for all (k-diffusion style): `sampler(denoiser, noise, sigmas, *, labels=None,
guidance=None) -> x`, where `denoiser(x, sigma[N], labels) -> D_x`, `noise` is the starting
state already scaled to sigmas[0] (the caller passes sigma_max * eps) and `sigmas` is a 1-D grid,
descending to 0 for sampling (`pagoda.diffusion.karras_sigmas`). `guidance=w` applies
classifier-free guidance through `guided`. NFE is never assumed here: wrap the denoiser in
`NFECounter` to count it.
"""

import math

import torch

from pagoda.diffusion import karras_sigmas
from pagoda.errors import UserError

# The largest CFG scale accepted anywhere (guided pairs, sampling, eval): far beyond it D_u + w (D_c - D_u) overflows.
MAX_GUIDANCE = 100.0


class NFECounter:
    """Wraps a denoiser; `nfe` = network rows evaluated / samples in the sampling call.

    Pass it to the sampler as the denoiser: guidance is then applied around it, and `guided`
    tells it the real batch N of its 2N-row calls. Call reset() between sampling calls.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.reset()

    def reset(self):
        self.rows, self.calls, self.batch = 0, 0, None

    def expect_batch(self, n: int):
        # Called by `guided`, which evaluates 2N rows for N samples: the batch is N, not 2N.
        if self.batch is None:
            self.batch = n

    def __call__(self, x, sigma, labels=None):
        self.expect_batch(x.shape[0])
        self.rows += x.shape[0]
        self.calls += 1
        return self.denoiser(x, sigma, labels)

    @property
    def nfe(self) -> float:
        return self.rows / self.batch if self.batch else 0.0

    def __getattr__(self, name):
        # Attributes of the wrapped denoiser (num_classes, sigma_data, ...) stay visible.
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


# Classifier-free guidance (METHOD §1): D_w = D_uncond + w (D_cond - D_uncond). Conditional and
# unconditional rows go through ONE network call on a batch of 2N, which NFECounter counts as
# 2 NFE per sample. w = 1 returns the denoiser itself; labels=None (all null) needs one call.
# w may also be a tensor [N] of per-sample scales (Stage 2a's guided pairs); it is then always applied.
def guided(denoiser, w, *, null_class: int | None = None):
    if not torch.is_tensor(w) and w == 1:
        return denoiser
    null_class = getattr(denoiser, "num_classes", 0) if null_class is None else null_class
    if null_class < 1:
        raise UserError(f"guidance={w} needs a class-conditional model (num_classes >= 1, got {null_class}): "
                        "leave guidance unset or use guidance=1")

    def D_w(x, sigma, labels=None):
        if labels is None:
            return denoiser(x, sigma, None)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        if isinstance(denoiser, NFECounter):
            denoiser.expect_batch(n)
        null = torch.full_like(labels, null_class)
        D_cond, D_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null])).chunk(2)
        scale = w.to(x.device, D_cond.dtype).reshape(-1, 1, 1, 1) if torch.is_tensor(w) else w
        return D_uncond + scale * (D_cond - D_uncond)

    D_w.num_classes = null_class
    return D_w


# The grid as python floats, checked: >= 2 points, strictly monotone, no negative sigma.
def _grid(sigmas) -> list[float]:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of >= 2 points, got shape {tuple(sigmas.shape)}")
    steps = sigmas[1:] - sigmas[:-1]
    if sigmas.min() < 0 or not ((steps < 0).all() or (steps > 0).all()):
        raise ValueError(f"sigmas must be >= 0 and strictly monotone, got {sigmas.tolist()}")
    return sigmas.tolist()


# D(x, t) at a python-float sigma t, with labels and guidance bound (and the clamp of inversion).
def _bind(denoiser, labels, guidance, clamp: bool = False):
    D = denoiser if guidance is None else guided(denoiser, guidance)

    def D_t(x, t: float):
        sigma = torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        D_x = D(x, sigma, labels)
        return D_x.clamp(-1, 1) if clamp else D_x

    return D_t


# One Heun step of EDM Alg. 1 (S_churn = 0) from t_cur to t_next; a step to sigma = 0 stays Euler.
# The Euler predictor is written in its DDIM form D + (t_next/t_cur)(x - D), exact at t_next = 0.
def _heun_step(D, x, t_cur: float, t_next: float):
    D_cur = D(x, t_cur)
    x_next = D_cur + (t_next / t_cur) * (x - D_cur)
    if t_next == 0:
        return x_next
    d_cur = (x - D_cur) / t_cur
    d_next = (x_next - D(x_next, t_next)) / t_next
    return x + (t_next - t_cur) * (d_cur + d_next) / 2


# Euler on the PF-ODE == deterministic DDIM (eta 0): x_next = D + (s_next/s)(x - D).
# NFE = len(sigmas) - 1 (= num_steps on karras_sigmas(num_steps)); doubled under guidance.
def euler(denoiser, noise, sigmas, *, labels=None, guidance=None):
    D, grid = _bind(denoiser, labels, guidance), _grid(sigmas)
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        D_x = D(x, t_cur)
        x = D_x + (t_next / t_cur) * (x - D_x)
    return x


# EDM deterministic Heun (Alg. 1, S_churn = 0): second order except on the last step to 0.
# NFE = 2 (len(sigmas) - 1) - 1 = 2N - 1 on karras_sigmas(N) (N nonzero sigmas); doubled under guidance.
def heun(denoiser, noise, sigmas, *, labels=None, guidance=None):
    D, grid = _bind(denoiser, labels, guidance), _grid(sigmas)
    x = noise
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = _heun_step(D, x, t_cur, t_next)
    return x


# The ascending inversion grid of Stage 2a: the nonzero Karras sigmas from sigma_min up to
# sigma_max. 40 points -> 39 Heun steps -> 78 NFE per image.
def inversion_sigmas(num_points: int = 40, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     rho: float = 7.0):
    return karras_sigmas(num_points, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[:-1].flip(0)


# DDIM inversion (METHOD §2, Stage 2a): the clean image x is the state at sigmas[0] (= sigma_min);
# Heun integrates the PF-ODE upward along the ascending grid to sigmas[-1] (= sigma_max), with
# D clamped to [-1, 1] when clamp=True. NFE = 2 (len(sigmas) - 1); doubled under guidance.
def ddim_invert(denoiser, x, sigmas, *, labels=None, guidance=None, clamp=True):
    grid = _grid(sigmas)
    if grid[0] <= 0 or grid[-1] < grid[0]:
        raise ValueError(f"ddim_invert needs an ascending grid of positive sigmas, got {grid[0]} .. {grid[-1]}")
    D = _bind(denoiser, labels, guidance, clamp=clamp)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = _heun_step(D, x, t_cur, t_next)
    return x


# DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; k-diffusion's sample_dpmpp_2m): multistep, data prediction,
# second order in lambda = -ln(sigma). With h = ln(s / s_next):
#   x_next = (s_next / s) x - expm1(-h) D',  D' = D_i                                  (first step, and to 0)
#                                             D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}   (r = h_{i-1} / h)
# The first-order step is DDIM. NFE = len(sigmas) - 1 (= N on a grid of N nonzero sigmas); doubled under CFG.
def dpmpp_2m(denoiser, noise, sigmas, *, labels=None, guidance=None):
    D, grid = _bind(denoiser, labels, guidance), _grid(sigmas)
    if grid[-1] > grid[0]:
        raise ValueError("dpmpp_2m samples along a descending grid")
    x, D_prev, h_prev = noise, None, None
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        D_x = D(x, t_cur)
        if t_next == 0:
            x = D_x
            break
        h = math.log(t_cur / t_next)
        D_mix = D_x
        if D_prev is not None:
            r = h_prev / h
            D_mix = (1 + 1 / (2 * r)) * D_x - (1 / (2 * r)) * D_prev
        x = (t_next / t_cur) * x - math.expm1(-h) * D_mix
        D_prev, h_prev = D_x, h
    return x


SAMPLERS = {"euler": euler, "ddim": euler, "heun": heun, "dpmpp2m": dpmpp_2m}
# Network evaluations per sample of each sampler on a grid of n nonzero sigmas (w = 1).
SAMPLER_NFE = {"euler": lambda n: n, "ddim": lambda n: n, "heun": lambda n: 2 * n - 1, "dpmpp2m": lambda n: n}


# A sampler by name; unknown names are a user error that lists the known ones.
def get_sampler(name: str):
    if name not in SAMPLERS:
        raise UserError(f"sampler {name!r} is unknown: use one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
