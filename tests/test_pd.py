"""Progressive distillation: the target formula on the closed-form Gaussian teacher, one trained round, the
grids, the loss weights against the paper's VP-space losses, checkpoints as Generators, the CLI's bad input.

Gaussian data x ~ N(mu, s0^2 I) has the exact denoiser D(x, s) = mu + s0^2 / (s0^2 + s^2) (x - mu); every DDIM
step of it is affine in x, so the PD target of an exact teacher is exactly representable and composes.
"""

import json
import math

import pytest
import torch
from torch import nn

from pagoda.__main__ import main
from pagoda.baselines.progressive_distillation import (
    PDRound,
    ddim_step,
    loss_weight,
    pd_target,
    rounds,
    student_sigmas,
)
from pagoda.config import DiffusionConfig, PDConfig, TrainConfig
from pagoda.diffusion import edm_scalings
from pagoda.errors import run_cli
from pagoda.generator import load_generator
from pagoda.samplers import NFECounter, euler

S0, MU = 0.5, 0.3
SHAPE = (64, 3, 4, 4)
FORMULATIONS = ("edm", "vp-cosine")


def gaussian_D(x, sigma, labels=None):
    s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
    return MU + S0**2 / (S0**2 + s**2) * (x - MU)


def noise(seed=0, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ideal_student(teacher, teacher_grid: torch.Tensor):
    """The denoiser that equals the PD target x~ of `teacher` at every point of the student grid teacher_grid[::2]
    (what a perfectly trained student of one round computes there)."""
    points = teacher_grid.tolist()

    def D(x, sigma, labels=None):
        k = points.index(float(sigma.reshape(-1)[0]))  # a student point is an even teacher point
        s, s_mid, s_next = (torch.full((x.shape[0],), points[k + j], dtype=x.dtype) for j in range(3))
        x_next = ddim_step(teacher, ddim_step(teacher, x, s, s_mid), s_mid, s_next)
        return pd_target(x, x_next, s, s_next)

    return D


def pd_sample(D, steps, formulation, x_T=None):
    grid = student_sigmas(steps, formulation)
    x = grid[0] * (noise() if x_T is None else x_T)
    return euler(D, x, grid)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("n", [1, 2, 8])
def test_one_student_step_on_the_target_lands_on_two_teacher_steps(formulation, n):
    tg = student_sigmas(2 * n, formulation)
    for i in range(n):  # every interval, the last (to sigma_min, or to 0 where x~ = the teacher's x-pred) included
        x_t = MU + tg[2 * i] * noise(i)
        s, s_mid, s_next = (torch.full((SHAPE[0],), tg[2 * i + j].item(), dtype=torch.float64) for j in range(3))
        x_next = ddim_step(gaussian_D, ddim_step(gaussian_D, x_t, s, s_mid), s_mid, s_next)
        target = pd_target(x_t, x_next, s, s_next)
        student = target + (s_next / s).reshape(-1, 1, 1, 1) * (x_t - target)  # one DDIM step with D = x~
        assert (student - x_next).abs().max() < 1e-5 * (1 + x_next.abs().max())
        if s_next[0] == 0:
            assert torch.allclose(target, gaussian_D(ddim_step(gaussian_D, x_t, s, s_mid), s_mid), atol=1e-12)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_two_to_the_k_step_student_of_an_exact_teacher_stays_exact(formulation):
    K = 3  # the teacher samples with 8 Euler steps; students of 4, 2 and 1 steps
    reference = pd_sample(gaussian_D, 2**K, formulation)
    D, steps = gaussian_D, 2**K
    for _ in range(K):
        D = ideal_student(D, student_sigmas(steps, formulation))
        steps //= 2
        x = pd_sample(D, steps, formulation)
        assert (x - reference).abs().max() < 1e-5, (steps, (x - reference).abs().max())
    # Control: a 1-step "student" that is just the teacher (no distillation) is far from the 8-step output.
    naive = pd_sample(gaussian_D, 1, formulation)
    assert (naive - reference).abs().max() > 1e-2


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_the_rounds_target_is_the_ideal_students_output(formulation):
    # PDRound.target (grid indexing 2i, 2i + 1, 2i + 2; float64 combination) against the closed form, every interval.
    n = 4
    stage = PDRound(PDConfig(formulation=formulation), GaussianF(), DiffusionConfig(), n)
    ideal = ideal_student(gaussian_D, stage.teacher_grid)
    for i in range(n):
        sigma = stage.grid[i].item()
        x_t = (MU + sigma * noise(i)).float()
        got = stage.target(x_t, torch.full((SHAPE[0],), i), None)
        want = ideal(x_t.double(), torch.full((SHAPE[0],), sigma, dtype=torch.float64))
        assert (got.double() - want).abs().max() < 1e-5 * (1 + want.abs().max()), (i, (got.double() - want).abs().max())


def test_learning_rate_decays_linearly_within_a_round():
    from pagoda.schedule import learning_rate
    cfg = TrainConfig(lr=1e-4, lr_warmup=0, lr_decay="linear", steps=100)
    assert [learning_rate(cfg, k) for k in (0, 50, 99)] == pytest.approx([1e-4, 5e-5, 1e-6])
    warm = TrainConfig(lr=1e-4, lr_warmup=10, lr_decay="linear", steps=110)
    assert learning_rate(warm, 4) == pytest.approx(5e-5) and learning_rate(warm, 60) == pytest.approx(5e-5)
    assert learning_rate(TrainConfig(lr=1e-4, lr_warmup=0, steps=100), 99) == 1e-4  # lr_decay none


def test_grids_nest_and_end_where_their_formulation_ends():
    for f in FORMULATIONS:
        for n in (1, 2, 4, 16):
            assert torch.equal(student_sigmas(2 * n, f)[::2], student_sigmas(n, f))
            g = student_sigmas(n, f)
            assert len(g) == n + 1 and (g[1:] < g[:-1]).all() and math.isclose(g[0].item(), 80.0, rel_tol=1e-12)
    assert math.isclose(student_sigmas(4, "edm")[-1].item(), 0.002, rel_tol=1e-9)  # Euler ends at sigma_min
    assert student_sigmas(4, "vp-cosine")[-1].item() == 0.0 and student_sigmas(4, "vp-cosine")[-2] > 0.002
    assert rounds(PDConfig(from_steps=16, to_steps=1)) == [8, 4, 2, 1]
    assert rounds(PDConfig(from_steps=64, to_steps=8)) == [32, 16, 8]


def test_loss_weights_are_the_papers_vp_losses():
    # In VP coordinates z = alpha x_sigma (alpha = 1/sqrt(1+sigma^2)), eps-hat = (z - alpha x-hat) / sigma_VP and
    # v-hat = alpha eps-hat - sigma_VP x-hat (Salimans & Ho §4): their squared errors against the target's are the
    # x-error times SNR and 1 + SNR, and truncated-SNR is max(x-MSE, eps-MSE).
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    x_sigma = noise(1, (5, 8))
    x_hat, x_tgt = noise(2, (5, 8)), noise(3, (5, 8))
    alpha = 1 / (1 + sigma**2).sqrt()
    s_vp = sigma * alpha
    z = alpha[:, None] * x_sigma

    def eps(x):
        return (z - alpha[:, None] * x) / s_vp[:, None]

    def v(x):
        return alpha[:, None] * eps(x) - s_vp[:, None] * x

    x_mse = (x_hat - x_tgt).square().mean(1)
    eps_mse = (eps(x_hat) - eps(x_tgt)).square().mean(1)
    v_mse = (v(x_hat) - v(x_tgt)).square().mean(1)
    assert torch.allclose(loss_weight(sigma, "x") * x_mse, x_mse)
    assert torch.allclose(loss_weight(sigma, "eps") * x_mse, eps_mse, rtol=1e-10)
    assert torch.allclose(loss_weight(sigma, "v") * x_mse, v_mse, rtol=1e-10)
    assert torch.allclose(loss_weight(sigma, "truncated-snr") * x_mse, torch.maximum(x_mse, eps_mse), rtol=1e-10)


class GaussianF(nn.Module):
    """A network F whose EDM-preconditioned denoiser is the exact Gaussian one with its gain multiplied by a
    learnable exp(g(ln sigma)), g = 0 at initialisation: the analytic teacher, trainable as a student."""

    num_classes, resolution = 0, SHAPE[-1]

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x_in, c_noise, labels=None, guidance=None):
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm_scalings(sigma)
        x = x_in.double() / c_in
        log_gain = self.mlp(sigma.reshape(-1, 1).log().float()).double().reshape(-1, 1, 1, 1)
        gain = S0**2 / (S0**2 + sigma**2) * log_gain.exp()
        D = MU + gain * (x - MU)
        return ((D - c_skip * x) / c_out).to(x_in.dtype)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_one_round_on_the_gaussian_teacher_lowers_the_students_error(formulation):
    torch.manual_seed(0)
    n = 2
    cfg = PDConfig(formulation=formulation, train=TrainConfig(lr=1e-2))
    stage = PDRound(cfg, GaussianF(), DiffusionConfig(), n)

    def error():
        with torch.no_grad():
            from pagoda.diffusion import EDMPrecond
            student = EDMPrecond(stage.net)
            x_T = noise(7, (256, 3, 4, 4))
            teacher_out = pd_sample(stage.teacher, 2 * n, formulation, x_T)
            return (pd_sample(student, n, formulation, x_T) - teacher_out).square().mean().sqrt().item()

    before = error()
    opt = stage.optimizer(list(stage.net.parameters()), cfg.train)
    g = torch.Generator().manual_seed(0)
    for k in range(500):
        for group in opt.param_groups:  # the rounds' linear decay (pagoda.schedule.learning_rate)
            group["lr"] = cfg.train.lr * (1 - k / 500)
        x = MU + S0 * torch.randn(SHAPE, generator=g)
        loss, stats = stage.step(stage.net, [x, torch.zeros(SHAPE[0], dtype=torch.int64)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    assert after < 0.02 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# The command: rounds, resume, checkpoints as Generators, bad input.

@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert run_cli(main, ["teacher", "--preset", "smoke", "--out", str(out)]) == 0
    return out / "teacher.safetensors"


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_pd_rounds_make_generators_and_resume(smoke_teacher, formulation, tmp_path, capsys):
    argv = ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--from-steps", "4", "--to-steps", "1",
            "--out", str(tmp_path), "--set", f"formulation={formulation}"]
    assert run_cli(main, argv) == 0
    for n in (2, 1):
        path = tmp_path / f"pd-{n}" / f"pd-{n}.safetensors"
        gen = load_generator(path)
        assert (gen.nfe, gen.method, gen.sweepable, gen.sampler) == (n, "pd", False, "euler")
        gen.denoiser = NFECounter(gen.denoiser)
        x = gen.sample([0, 1, 2])
        assert x.dtype == torch.uint8 and x.shape == (3, 3, 8, 8) and gen.denoiser.nfe == n
        assert json.loads((tmp_path / f"pd-{n}" / "config.json").read_text())["round"]["student_steps"] == n
    before = (tmp_path / "pd-1" / "pd-1.safetensors").read_bytes()
    capsys.readouterr()
    assert run_cli(main, argv) == 0  # finished rounds are skipped
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "pd-1" / "pd-1.safetensors").read_bytes() == before


def test_round_one_student_starts_as_its_teacher_without_dropout(smoke_teacher):
    from pagoda.checkpoint import load_teacher
    from pagoda.diffusion import EDMPrecond
    teacher = load_teacher(smoke_teacher)
    net, diffusion = teacher.net, teacher.diffusion
    for m in net.modules():  # a teacher trained with dropout (the imagenet64 preset and the EDM import have 0.1)
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    stage = PDRound(PDConfig(), net, diffusion, 2)
    x, s = noise(0, (2, 3, 8, 8)).float(), torch.full((2,), 3.0)
    assert stage.net.training and torch.equal(EDMPrecond(stage.net)(x, s), stage.teacher(x, s))


def test_pd_with_explicit_data_and_an_extended_schedule_reuses_finished_rounds(smoke_teacher, tmp_path, capsys):
    argv = ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--data", "photos", "--out", str(tmp_path),
            "--from-steps", "4", "--to-steps", "2"]
    assert run_cli(main, argv) == 0 and not (tmp_path / "pd-1").exists()
    first = (tmp_path / "pd-2" / "pd-2.safetensors").read_bytes()
    capsys.readouterr()
    assert run_cli(main, argv[:-1] + ["1"]) == 0  # to_steps 2 -> 1: round pd-2 is reused, pd-1 trained
    assert "pd-2: finished" in capsys.readouterr().out
    assert (tmp_path / "pd-2" / "pd-2.safetensors").read_bytes() == first and (tmp_path / "pd-1").is_dir()


@pytest.mark.parametrize("args, needle", [
    (["--from-steps", "8", "--to-steps", "3"], "to_steps=3"),
    (["--from-steps", "6"], "from_steps=6"),
    (["--from-steps", "4", "--to-steps", "4"], "to_steps=4"),
    (["--set", "formulation=vp"], "formulation='vp'"),
    (["--set", "loss=l2"], "loss='l2'"),
])
def test_pd_bad_options(smoke_teacher, args, needle, tmp_path, capsys):
    assert run_cli(main, ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o"),
                          *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_pd_refuses_a_non_teacher_and_pd_refuses_samplers(smoke_teacher, tmp_path, capsys):
    assert run_cli(main, ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "p"),
                          "--from-steps", "2"]) == 0
    student = tmp_path / "p" / "pd-1" / "pd-1.safetensors"
    capsys.readouterr()
    assert run_cli(main, ["pd", "--preset", "smoke", "--teacher", str(student), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a diffusion teacher" in err[0] and not (tmp_path / "q").exists()
    assert run_cli(main, ["sample", "--ckpt", str(student), "--steps", "4", "-o", str(tmp_path / "x.png")]) == 2
    assert "own grid" in capsys.readouterr().err


def test_a_changed_schedule_is_refused_before_any_training(smoke_teacher, tmp_path, capsys):
    base = ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o")]
    assert run_cli(main, base + ["--from-steps", "4"]) == 0
    capsys.readouterr()
    assert run_cli(main, base + ["--from-steps", "8"]) == 2  # round pd-4 would be new, pd-2 already differs
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "from_steps = 4 there, 8 now" in err[0], err
    assert not (tmp_path / "o" / "pd-4").exists()
    (tmp_path / "file").write_text("x")
    assert run_cli(main, base[:-1] + [str(tmp_path / "file" / "out")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_pd_refuses_a_folder_of_other_files(smoke_teacher, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run_cli(main, ["pd", "--preset", "smoke", "--teacher", str(smoke_teacher), "--out", str(tmp_path),
                          "--from-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0] and "not a pagoda PD run" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
