"""EDM diffusion (Karras et al. 2022): preconditioning, the sigma grid and the Stage-1 loss.

Variance exploding: x_sigma = x + sigma * eps, data in [-1, 1] (METHOD §1). The network F
never sees sigma directly; `EDMPrecond` turns it into the denoiser
D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y) (EDM eq. (7), Table 1).
"""

import math

import torch
from torch import nn

from pagoda.config import SCHEDULES
from pagoda.errors import UserError


# EDM Table 1: the four preconditioning functions of sigma (any shape, broadcast by the caller).
def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


# Broadcast sigma (python float, 0-d, [N] or [N,1,1,1] tensor) to a [N] tensor of the given dtype.
def _sigma_vector(sigma, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.numel() not in (1, n):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected a scalar or [{n}]")
    return sigma.reshape(-1).expand(n)


class EDMPrecond(nn.Module):
    """Wraps a network F(x, c_noise, labels, guidance) into the EDM denoiser D(x, sigma, labels)."""

    def __init__(self, net: nn.Module, *, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.num_classes = int(getattr(net, "num_classes", 0))

    def forward(self, x, sigma, labels=None, guidance=None):
        # The scalings and the skip path run in float32 (float64 stays float64), whatever autocast
        # does to the network; only F's output is cast back (as in EDM2's Precond).
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        sigma = _sigma_vector(sigma, x.shape[0], dtype, x.device)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        F_x = self.net(c_in * x, c_noise.flatten(), labels, guidance)
        D_x = c_skip * x + c_out * F_x.to(dtype)
        return D_x


# PaGoDA's one-step generator G (METHOD §2, Stage 2b): the teacher's network F queried at sigma_max with the
# raw network output as the image, x = F(c_in(sigma_max) z; c_noise(sigma_max), y) with z = sigma_max * eps
# (no c_skip / c_out). `net` is a UNet (or its DDP wrapper); returns float [N, C, H, W] in the net's dtype.
def one_step(net, z: torch.Tensor, labels=None, *, sigma_max: float, sigma_data: float = 0.5, guidance=None):
    sigma = torch.full((z.shape[0],), float(sigma_max), dtype=torch.float32, device=z.device)
    _, _, c_in, c_noise = edm_scalings(sigma, sigma_data)
    return net(c_in.reshape(-1, 1, 1, 1) * z.float(), c_noise, labels, guidance)


def _check_grid(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if num_steps < 1:
        raise UserError(f"steps={num_steps} is not a number of sampling steps: use an integer >= 1")
    if not 0 < sigma_min <= sigma_max:
        raise UserError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min <= sigma_max")


# Karras et al. eq. (5): rho-spaced grid from sigma_max down to sigma_min, then a final 0.
# Returns float64 [num_steps + 1]; num_steps is the number of nonzero sigmas (Euler NFE).
def karras_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    _check_grid(num_steps, sigma_min, sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = i / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + t * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# Uniform in ln(sigma) from sigma_max down to sigma_min (DPM-Solver's "logSNR" spacing, k-diffusion's
# get_sigmas_exponential), then a final 0. Returns float64 [num_steps + 1].
def loguniform_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0):
    _check_grid(num_steps, sigma_min, sigma_max)
    t = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    sigmas = torch.exp(math.log(sigma_max) + t * (math.log(sigma_min) - math.log(sigma_max)))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# A sampling grid by name: "karras" (rho-spaced, EDM eq. (5)) or "loguniform" (uniform in ln sigma; rho unused).
def sigma_grid(schedule: str, num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0):
    if schedule == "karras":
        return karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    if schedule == "loguniform":
        return loguniform_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max)
    raise UserError(f"sigma schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")


# Label dropout for CFG training: each label becomes the null class with probability p.
def drop_labels(labels, p: float, null_class: int, generator: torch.Generator | None = None):
    if labels is None or p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


# EDM loss (eq. (2) with Table 1): ln sigma ~ N(P_mean, P_std^2), weight (s^2+sd^2)/(s sd)^2.
# Returns the unreduced weighted squared error [N, C, H, W]. The generator, when given, must
# live on x.device; it drives sigma, the noise and the label dropout in that order.
def edm_loss(D, x, labels=None, *, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
             label_dropout: float = 0.0, num_classes: int = 0, generator: torch.Generator | None = None):
    if label_dropout > 0 and labels is not None and num_classes < 1:
        raise UserError(f"label_dropout={label_dropout} needs a class-conditional model (num_classes >= 1, "
                        f"got {num_classes}): set diffusion.label_dropout=0 or network.num_classes")
    rnd_normal = torch.randn([x.shape[0], 1, 1, 1], generator=generator, device=x.device, dtype=x.dtype)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma
    labels = drop_labels(labels, label_dropout, num_classes, generator)
    D_yn = D(x + n, sigma.flatten(), labels)
    return weight * (D_yn - x) ** 2

