"""Samplers against the closed-form PF-ODE of Gaussian data: orders, NFE, inversion round trip, golden sum.

For x ~ N(mu, s0^2 I) the exact denoiser is D(x, s) = mu + s0^2/(s0^2+s^2) (x - mu), and the
PF-ODE dx/ds = (x - D)/s has the solution x(s) = mu + sqrt((s0^2+s^2)/(s0^2+S^2)) (x_S - mu).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pagoda.diffusion import EDMPrecond, karras_sigmas
from pagoda.errors import UserError
from pagoda.samplers import (
    SAMPLERS,
    NFECounter,
    ddim_invert,
    dpmpp_2m,
    euler,
    get_sampler,
    guided,
    heun,
    inversion_sigmas,
)

S0 = 0.5
SHAPE = (4, 3, 4, 4)
MU = torch.linspace(-0.6, 0.6, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)


def gaussian_denoiser(mu=MU, s0=S0):
    def D(x, sigma, labels=None):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mu.to(x.dtype) + s0**2 / (s0**2 + s**2) * (x - mu.to(x.dtype))

    return D


def flow(x_from, s_from, s_to, mu=MU, s0=S0):
    """The exact PF-ODE flow map from sigma s_from to sigma s_to."""
    return mu + math.sqrt((s0**2 + s_to**2) / (s0**2 + s_from**2)) * (x_from - mu)


def noise(seed=0, shape=SHAPE, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def error_at_sigma_min(sampler, grid):
    x_T = MU + 80.0 * noise()
    x = sampler(gaussian_denoiser(), x_T, grid)
    return (x - flow(x_T, 80.0, grid[-1].item())).abs().max().item()


# The order is measured at sigma_min, the last nonzero point, on two grids that are smooth maps
# of a uniform parameter t = i/N (Karras rho = 7, and uniform in ln sigma): on such grids the global
# error is C N^-p, so doubling N divides it by 2^p. The final step to sigma = 0 is left out: the
# ODE's right-hand side is singular there and Heun deliberately takes an Euler step, so an error at 0
# would mix orders. N = 32 -> 64 is in the asymptotic range for s0 = 0.5 (16 -> 32 is not quite).
GRIDS = {
    "karras": lambda n: karras_sigmas(n)[:-1],
    "log": lambda n: torch.exp(torch.linspace(math.log(80.0), math.log(0.002), n, dtype=torch.float64)),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("sampler, order", [(euler, 1), (heun, 2), (dpmpp_2m, 2)])
def test_convergence_order(sampler, order, grid):
    coarse = error_at_sigma_min(sampler, GRIDS[grid](32))
    fine = error_at_sigma_min(sampler, GRIDS[grid](64))
    ratio = coarse / fine
    assert 0.9 * 2**order < ratio < 1.25 * 2**order, (coarse, fine, ratio)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("n", [4, 8, 16])
def test_dpmpp_2m_beats_euler_at_equal_nfe(grid, n):
    # Same NFE (n evaluations on a grid of n points; the error is taken at sigma_min, as above).
    assert error_at_sigma_min(dpmpp_2m, GRIDS[grid](n + 1)) < 0.6 * error_at_sigma_min(euler, GRIDS[grid](n + 1))


def test_dpmpp_2m_first_step_is_ddim_and_matches_the_reference_recursion():
    # Lu et al. 2022 Alg. 2 written out in lambda = -ln(sigma) with the data prediction, step by step.
    D, grid = gaussian_denoiser(), karras_sigmas(5)
    x_T = 80.0 * noise()
    x, prev = x_T, []
    lam = [-math.log(s) if s > 0 else math.inf for s in grid.tolist()]
    for i in range(len(grid) - 1):
        s, s_next = grid[i].item(), grid[i + 1].item()
        d = D(x, torch.full((SHAPE[0],), s, dtype=torch.float64))
        if s_next == 0:
            x = d
            break
        h = lam[i + 1] - lam[i]
        if prev:
            r = (lam[i] - lam[i - 1]) / h
            d_use = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev[-1]
        else:
            d_use = d
        x = (s_next / s) * x + (1 - math.exp(-h)) * d_use
        prev.append(d)
    assert torch.allclose(dpmpp_2m(D, x_T, grid), x, rtol=0, atol=1e-12)
    one_step = grid[:2].clone()
    assert torch.allclose(dpmpp_2m(D, x_T, one_step), euler(D, x_T, one_step), rtol=1e-13, atol=1e-12)


def test_step_to_zero_is_the_denoiser_output():
    x = noise()
    D = gaussian_denoiser()
    sigma = torch.full((SHAPE[0],), 3.0, dtype=torch.float64)
    for sampler in (euler, heun, dpmpp_2m):
        assert torch.equal(sampler(D, x, torch.tensor([3.0, 0.0])), D(x, sigma))


@pytest.mark.parametrize("n", [1, 2, 7])
def test_counted_nfe(n):
    net = EDMPrecond(TinyNet().double())
    x, labels = 80.0 * noise(), torch.tensor([0, 1, 2, 1])
    cases = [(euler, None, n), (heun, None, 2 * n - 1), (euler, 3.0, 2 * n), (heun, 3.0, 2 * (2 * n - 1)),
             (dpmpp_2m, None, n), (dpmpp_2m, 3.0, 2 * n)]
    for sampler, w, expected in cases:
        counter = NFECounter(net)
        sampler(counter, x, karras_sigmas(n), labels=labels, guidance=w)
        assert counter.nfe == expected, (sampler.__name__, w)
    counter = NFECounter(net)
    ddim_invert(counter, x.clamp(-1, 1), inversion_sigmas(40), labels=labels)
    assert counter.nfe == 78 and counter.num_classes == 3
    counter.reset()
    assert counter.nfe == 0 and counter.rows == 0


def test_inversion_round_trip():
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.9 - 0.95
    D = gaussian_denoiser()
    up = inversion_sigmas(40)
    assert up.shape == (40,) and up[0].item() == pytest.approx(0.002) and up[-1].item() == pytest.approx(80.0)
    z = ddim_invert(D, x0, up)
    back = heun(D, z, karras_sigmas(40))
    err = (back - x0).abs().max().item()

    # Tolerance: the round trip is two Heun integrations of the same linear flow, so its error is at
    # most the inversion's error carried down to the data by the exact flow (a factor
    # s0/sqrt(s0^2+80^2) ~ 1/160) plus the sampling error on the same grid, both measured here
    # against the closed form, plus the final jump sigma_min -> 0 (D shrinks x - mu by s0^2/(s0^2+smin^2)).
    z_exact = flow(x0, 0.002, 80.0)
    e_inv = (flow(z, 80.0, 0.002) - x0).abs().max().item()
    e_sample = (heun(D, z_exact, karras_sigmas(40)) - flow(z_exact, 80.0, 0.0)).abs().max().item()
    e_jump = (1 - S0**2 / (S0**2 + 0.002**2)) * 1.6
    assert err <= e_inv + e_sample + e_jump, (err, e_inv, e_sample)
    assert e_inv + e_sample < 0.05 and err < 5e-3  # observed: ~2e-3 at 40 points

    # A finer grid (80 points) shrinks the round-trip error at (at least) second order.
    back_fine = heun(D, ddim_invert(D, x0, inversion_sigmas(80)), karras_sigmas(80))
    assert (back_fine - x0).abs().max().item() < err / 3


def test_clamp_is_inactive_on_data_in_range_and_bites_outside():
    # Along the exact trajectory D = mu + factor (x0 - mu) with factor in (0, 1]: it stays in [-1, 1].
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(4)) * 1.9 - 0.95
    D = gaussian_denoiser()
    up = inversion_sigmas(40)
    assert torch.equal(ddim_invert(D, x0, up, clamp=True), ddim_invert(D, x0, up, clamp=False))

    # D = 3 leaves the range; clamped it is 1. With a constant D the flow is linear in sigma,
    # x(s) = c + (s/s_min)(x0 - c), which Heun integrates exactly.
    x0 = x0.double()

    def three(x, sigma, labels=None):
        return torch.full_like(x, 3.0)

    for clamp, c in [(True, 1.0), (False, 3.0)]:
        z = ddim_invert(three, x0, up, clamp=clamp)
        torch.testing.assert_close(z, c + (80.0 / up[0].item()) * (x0 - c), rtol=1e-9, atol=1e-6)


def dummy_denoiser(x, sigma, labels=None):
    """A fixed nonlinear stand-in for a trained network (no parameters)."""
    s = sigma.reshape(-1, 1, 1, 1)
    return 0.9 * torch.tanh(x / (s**2 + 0.25).sqrt()) + 0.05 * torch.sin(s)


def reference_heun(x, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Alg. 1 (S_churn = 0) written out elementwise in numpy, in the derivative form."""
    i = np.arange(num_steps)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = np.append(t, 0.0)

    def D(v, s):
        return 0.9 * np.tanh(v / np.sqrt(s * s + 0.25)) + 0.05 * np.sin(s)

    for k in range(num_steps):
        d = (x - D(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < num_steps - 1:
            d2 = (x_next - D(x_next, t[k + 1])) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_golden_heun_sum():
    z = 80.0 * noise(seed=123, shape=(2, 3, 8, 8))
    golden = reference_heun(z.numpy(), 18)
    got = heun(dummy_denoiser, z, karras_sigmas(18))
    assert got.sum().item() == pytest.approx(golden.sum(), rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(got.numpy(), golden, rtol=0, atol=1e-10)
    # The same loop in float32 tracks the float64 golden numbers.
    got32 = heun(dummy_denoiser, z.float(), karras_sigmas(18))
    np.testing.assert_allclose(got32.double().numpy(), golden, rtol=0, atol=1e-4)


class TinyNet(nn.Module):
    """Stand-in for UNet.forward(x, c_noise, labels, guidance): conv + noise and class embeddings."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, 3)
        self.noise = nn.Linear(1, 3)

    def forward(self, x, c_noise, labels=None, guidance=None):
        if labels is None:
            labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
        emb = self.emb(labels) + self.noise(c_noise.reshape(-1, 1).to(x.dtype))
        return torch.tanh(self.conv(x) + emb.reshape(-1, 3, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampler", [euler, heun])
def test_samples_do_not_depend_on_batch_composition(sampler, dtype):
    torch.manual_seed(0)
    net = EDMPrecond(TinyNet().to(dtype))
    z, labels = 80.0 * noise(shape=(3, 3, 8, 8), dtype=dtype), torch.tensor([0, 2, 1])
    for w in (None, 2.5):
        together = sampler(net, z, karras_sigmas(6), labels=labels, guidance=w)
        for i in range(3):
            alone = sampler(net, z[i:i + 1], karras_sigmas(6), labels=labels[i:i + 1], guidance=w)
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # bitwise here; kernels may block by batch elsewhere
            torch.testing.assert_close(alone[0], together[i], rtol=0, atol=tol)


def test_guided_denoiser():
    torch.manual_seed(0)
    net = EDMPrecond(TinyNet().double())
    x, labels = noise(shape=(3, 3, 8, 8)), torch.tensor([0, 2, 1])
    sigma = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    D_cond, D_uncond = net(x, sigma, labels), net(x, sigma, torch.full_like(labels, 3))
    torch.testing.assert_close(guided(net, 2.5)(x, sigma, labels), D_uncond + 2.5 * (D_cond - D_uncond))
    torch.testing.assert_close(guided(net, 0.0)(x, sigma, labels), D_uncond)
    torch.testing.assert_close(guided(net, 2.5)(x, sigma, None), net(x, sigma, None))
    assert guided(net, 1.0) is net
    with pytest.raises(UserError, match="guidance=2"):
        guided(gaussian_denoiser(), 2.0)


def test_sampler_registry():
    assert get_sampler("ddim") is euler and get_sampler("heun") is heun
    assert get_sampler("dpmpp2m") is dpmpp_2m
    assert set(SAMPLERS) == {"euler", "ddim", "heun", "dpmpp2m"}
    from pagoda.config import SAMPLER_NAMES  # the torch-free spec check knows the same names
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    with pytest.raises(UserError, match="'dpm'.*ddim, dpmpp2m, euler, heun"):
        get_sampler("dpm")
