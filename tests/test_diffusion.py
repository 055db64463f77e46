"""EDM preconditioning, the Karras grid and the Stage-1 loss: hand-computed constants and Gaussian optima."""

import math

import pytest
import torch
from torch import nn

from pagoda.diffusion import EDMPrecond, drop_labels, edm_loss, edm_scalings, karras_sigmas
from pagoda.errors import UserError


class Recorder(nn.Module):
    """Stand-in for UNet.forward(x, c_noise, labels, guidance): records its inputs, returns a constant."""

    def __init__(self, value=0.0, num_classes=0):
        super().__init__()
        self.value, self.num_classes, self.seen = value, num_classes, {}

    def forward(self, x, c_noise, labels=None, guidance=None):
        self.seen = dict(x=x, c_noise=c_noise, labels=labels, guidance=guidance)
        return torch.full_like(x, self.value)


class ZeroConv(nn.Module):
    """A conv with zero weights: F = 0, so the precondition alone decides D."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, c_noise, labels=None, guidance=None):
        return self.conv(x)


# (sigma, c_skip, c_out, c_in, c_noise) for sigma_data = 0.5, worked out by hand from EDM Table 1.
HAND = [
    (0.5, 0.5, 0.25 / math.sqrt(0.5), math.sqrt(2.0), math.log(0.5) / 4),
    (80.0, 0.25 / 6400.25, 40.0 / math.sqrt(6400.25), 1 / math.sqrt(6400.25), math.log(80.0) / 4),
    (0.002, 0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004), math.log(0.002) / 4),
]


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in, c_noise", HAND)
def test_preconditioning_constants(sigma, c_skip, c_out, c_in, c_noise):
    got = edm_scalings(torch.tensor(sigma, dtype=torch.float64))
    assert [v.item() for v in got] == pytest.approx([c_skip, c_out, c_in, c_noise], rel=1e-12)

    # Inside EDMPrecond: F sees c_in x and c_noise; D = c_skip x + c_out F.
    net = Recorder(value=2.0)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    D_x = EDMPrecond(net)(x, torch.full((3,), sigma, dtype=torch.float64))
    torch.testing.assert_close(net.seen["x"], c_in * x)
    torch.testing.assert_close(net.seen["c_noise"], torch.full((3,), c_noise, dtype=torch.float64))
    torch.testing.assert_close(D_x, c_skip * x + c_out * 2.0)


def test_zero_network_gives_c_skip_x_and_scalar_sigma_broadcasts():
    precond = EDMPrecond(ZeroConv())
    x = torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(precond(x, sigma), c_skip.reshape(-1, 1, 1, 1) * x)
    for scalar in (2.5, torch.tensor(2.5)):
        torch.testing.assert_close(precond(x, scalar), precond(x, torch.full((4,), 2.5)))


def test_precond_is_float32_under_autocast_and_passes_labels_guidance():
    precond = EDMPrecond(ZeroConv())
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D_x = precond(x, torch.tensor([0.3, 7.0]))
    assert D_x.dtype == torch.float32
    # F = 0 exactly, so any bfloat16 rounding of the skip path would show here.
    c_skip = 0.25 / (torch.tensor([0.3, 7.0]) ** 2 + 0.25)
    torch.testing.assert_close(D_x, c_skip.reshape(-1, 1, 1, 1) * x, rtol=1e-6, atol=0)

    net = Recorder(num_classes=10)
    precond = EDMPrecond(net, sigma_data=0.25)
    labels, w = torch.tensor([3, 10]), torch.tensor([1.0, 2.0])
    precond(x, 1.0, labels, w)
    assert net.seen["labels"] is labels and net.seen["guidance"] is w
    assert precond.num_classes == 10 and precond.sigma_data == 0.25
    assert EDMPrecond(ZeroConv()).num_classes == 0


def test_karras_grid():
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (19,) and sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-12)
    assert sigmas[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert sigmas[-1].item() == 0 and (sigmas[1:] < sigmas[:-1]).all()
    # rho = 1 is the uniform grid; rho = 7 is uniform in sigma^(1/7) (Karras eq. (5)).
    torch.testing.assert_close(karras_sigmas(5, sigma_min=1, sigma_max=5, rho=1)[:-1],
                               torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    roots = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(17))
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(UserError, match="steps=0"):
        karras_sigmas(0)


# Gaussian data x ~ N(mu, s0^2 I) has the exact denoiser D(x, s) = mu + s0^2/(s0^2+s^2)(x - mu).
def gaussian_denoiser(mu, s0):
    def D(x, sigma, labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        return mu + s0**2 / (s0**2 + s**2) * (x - mu)

    return D


def test_edm_loss_is_one_at_the_optimum_and_larger_elsewhere():
    # With s0 = sigma_data the weighted error of the exact denoiser has expectation
    # weight * Var(x | x + n) = (s^2+sd^2)/(s sd)^2 * s^2 sd^2/(s^2+sd^2) = 1 at every sigma.
    g = torch.Generator().manual_seed(0)
    mu = torch.linspace(-0.6, 0.6, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)
    x = mu + 0.5 * torch.randn(4096, 3, 4, 4, generator=g, dtype=torch.float64)
    exact = edm_loss(gaussian_denoiser(mu, 0.5), x, generator=torch.Generator().manual_seed(1))
    assert exact.shape == x.shape
    # Per element the loss is chi^2_1 (variance 2): the mean of 196k has std ~0.003.
    assert exact.mean().item() == pytest.approx(1.0, abs=0.02)

    # F = 0 is the optimum for N(0, sd^2) only; the mean mu != 0 costs extra. D = x + n is worse still.
    zero = edm_loss(EDMPrecond(ZeroConv().double()), x, generator=torch.Generator().manual_seed(1))
    identity = edm_loss(lambda xn, sigma, labels: xn, x, generator=torch.Generator().manual_seed(1))
    assert zero.mean() > exact.mean() + 0.05
    assert identity.mean() > zero.mean()


def test_edm_loss_is_deterministic_with_a_generator_and_pure():
    x = torch.randn(8, 3, 4, 4)
    D = EDMPrecond(ZeroConv())
    a = edm_loss(D, x, generator=torch.Generator().manual_seed(5))
    b = edm_loss(D, x, generator=torch.Generator().manual_seed(5))
    c = edm_loss(D, x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sigma_distribution_is_lognormal():
    seen = []

    def D(xn, sigma, labels):
        seen.append(sigma)
        return xn

    edm_loss(D, torch.zeros(20000, 1, 1, 1), P_mean=-1.2, P_std=1.2, generator=torch.Generator().manual_seed(0))
    log_sigma = seen[0].log()
    assert log_sigma.shape == (20000,)
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.05)


def test_label_dropout_rate_and_determinism():
    labels = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.3, 10, generator=torch.Generator().manual_seed(1))
    null = dropped == 10
    # Binomial(1e5, 0.3): std of the rate ~0.0015.
    assert null.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(dropped, drop_labels(labels, 0.3, 10, generator=torch.Generator().manual_seed(1)))
    assert drop_labels(labels, 0.0, 10) is labels and drop_labels(None, 0.5, 10) is None


def test_edm_loss_drops_labels_to_the_null_class():
    seen = []

    def D(xn, sigma, labels):
        seen.append(labels)
        return xn

    labels = torch.randint(0, 5, (20000,), generator=torch.Generator().manual_seed(0))
    edm_loss(D, torch.zeros(20000, 1, 1, 1), labels, label_dropout=0.1, num_classes=5,
             generator=torch.Generator().manual_seed(0))
    assert (seen[0] == 5).float().mean().item() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(UserError, match="label_dropout"):
        edm_loss(D, torch.zeros(2, 1, 1, 1), labels[:2], label_dropout=0.1, num_classes=0)
