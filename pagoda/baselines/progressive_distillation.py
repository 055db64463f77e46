"""Progressive distillation (Salimans & Ho, ICLR 2022; METHOD §3), from our EDM teacher, through the one loop.

A round takes a teacher sampled by Euler (= DDIM) on a grid of 2N steps and trains a student, initialised as a
copy of the teacher, to match two teacher steps with one step on the grid of N steps (every other teacher point).
For x_t = x + sigma eps at a student point sigma = s_i (i uniform in [0, N)), the teacher makes two DDIM steps
s_i -> s_mid -> s_next and the student's denoiser is regressed on the x-target whose one DDIM step lands there:

    x_next = DDIM_teacher(DDIM_teacher(x_t; s_i -> s_mid); s_mid -> s_next),   r = s_next / s_i
    x~ = (x_next - r x_t) / (1 - r)            (Salimans & Ho eq. (8)/Alg. 2 in sigma = sigma_VP / alpha_VP;
                                                at s_next = 0 it is the teacher's x-prediction at s_mid)

The same formula in VP coordinates (z = alpha x_sigma) is the paper's x~ = (z'' - (s''/s) z) / (a'' - (s''/s) a);
DDIM is coordinate-free, so the two formulations below differ only in their grids, their samplers and where they end:

- `edm` (default): the consistency-models reimplementation behind the published ImageNet-64 numbers
  (`progdist_losses`, `sample_progdist`): Karras rho grid of N + 1 points from sigma_max to sigma_min, Euler
  half-steps, sampled by Euler on those N + 1 points (the state at sigma_min is the image; NFE = N).
- `vp-cosine`: the original cosine schedule, t = i / N, sigma(t) = tan(pi/2 (t_min + t (t_max - t_min))),
  restricted to the teacher's trained range [sigma_min, sigma_max] (the paper clips log-SNR to [-20, 20] for its
  own model; ours was never trained beyond sigma_max), and t = 0 is sigma = 0. The last interval's target is the
  teacher's x-prediction (the paper's `where(i == 0, x_pred, x_target)`); sampled by DDIM with x clipped to
  [-1, 1] at each step (clip_x), ending on the denoised x at sigma = 0.

Losses (per sample, on the student's x-prediction D; SNR = 1 / sigma^2): `x` = |D - x~|^2, `eps` = SNR |D - x~|^2,
`v` = (1 + SNR) |D - x~|^2 (the v-MSE), `truncated-snr` = max(SNR, 1) |D - x~|^2 (default; the paper's
max(x-MSE, eps-MSE)). The student keeps the teacher's EDM preconditioning, so it starts as an exact copy of its
teacher; the paper's x- / v- / eps-parametrisations differ, for a network of the same function, only in which of
these errors it regresses. Adam, lr decaying linearly to 0 within each round, gradient clip 1, no EMA (`pd`
presets). Each round is one run of `pagoda.train` in OUT/pd-<N>/ (resumable; a finished round is skipped); its
student pd-<N>.safetensors (kind "pd") loads as a Generator with nfe = N and method = "pd".
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from torch import nn

from pagoda import dist
from pagoda.checkpoint import load_teacher
from pagoda.config import DiffusionConfig, PDConfig, to_dict
from pagoda.data import build_dataset, to_model
from pagoda.diffusion import EDMPrecond, karras_sigmas
from pagoda.errors import UserError
from pagoda.rundir import check_run_config, refuse_foreign_files
from pagoda.train import Stage, train
from pagoda.weights import sha256_file

# ---------------------------------------------------------------------------------------------
# Grids, the target and the loss weights (pure functions).

def vp_cosine_sigma(t: torch.Tensor, *, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """EDM sigma = sigma_VP / alpha_VP = tan(pi t' / 2) of the cosine schedule (Nichol & Dhariwal 2021, as in
    Salimans & Ho), with t' = t_min + t (t_max - t_min) so that t in [0, 1] spans [sigma_min, sigma_max]."""
    lo, hi = 2 / math.pi * math.atan(sigma_min), 2 / math.pi * math.atan(sigma_max)
    return torch.tan(math.pi / 2 * (lo + t.to(torch.float64) * (hi - lo)))


def student_sigmas(steps: int, formulation: str = "edm", *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0) -> torch.Tensor:
    """The descending float64 grid [steps + 1] a `steps`-step student is trained on and sampled with.

    edm: the Karras rho grid of steps + 1 points sigma_max .. sigma_min (ends at sigma_min, no 0).
    vp-cosine: vp_cosine_sigma(1 - i / steps), i = 0 .. steps - 1, then 0.
    The grid of 2N steps holds the grid of N steps at its even points, exactly (same float expressions).
    """
    if steps < 1:
        raise UserError(f"steps={steps} must be >= 1")
    if formulation == "edm":
        return karras_sigmas(steps + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[:-1]
    if formulation == "vp-cosine":
        t = 1 - torch.arange(steps, dtype=torch.float64) / steps
        return torch.cat([vp_cosine_sigma(t, sigma_min=sigma_min, sigma_max=sigma_max), torch.zeros(1, dtype=torch.float64)])
    raise UserError(f"formulation {formulation!r} is unknown: use edm or vp-cosine")


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step(denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, labels=None) -> torch.Tensor:
    """One Euler (= DDIM) step of the PF-ODE, per sample: D + (sigma_next / sigma)(x - D); sigma [N] > 0."""
    D_x = denoiser(x, sigma, labels)
    return D_x + _col(sigma_next / sigma, x) * (x - D_x)


def pd_target(x_t: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The x-target x~ = (x_next - r x_t) / (1 - r), r = sigma_next / sigma (Salimans & Ho, Alg. 2): the
    denoiser output whose one DDIM step from (x_t, sigma) lands on x_next at sigma_next. At sigma_next = 0 it is
    x_next itself (the teacher's x-prediction at the half step). Shapes [N, ...], sigmas [N]."""
    r = _col(sigma_next / sigma, x_t)
    return (x_next - r * x_t) / (1 - r)


def loss_weight(sigma: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample weight of |D - x~|^2 (SNR = 1 / sigma^2 in EDM sigma): x 1, eps SNR, v 1 + SNR,
    truncated-snr max(SNR, 1) (Salimans & Ho §4)."""
    snr = sigma.to(torch.float64).pow(-2)
    weights = {"x": torch.ones_like(snr), "eps": snr, "v": 1 + snr, "truncated-snr": snr.clamp(min=1)}
    if loss not in weights:
        raise UserError(f"PD loss {loss!r} is unknown: use one of {', '.join(weights)}")
    return weights[loss]


# ---------------------------------------------------------------------------------------------
# One round as a stage of the training loop.

class PDRound(Stage):
    """Student (a copy of the round's teacher network) trained to match the teacher's two DDIM half-steps; the
    loop's default Adam (no weight decay in the presets) with the per-round linear decay of the learning rate."""

    kind = "pd"

    def __init__(self, cfg: PDConfig, teacher_net: nn.Module, diffusion: DiffusionConfig, steps: int):
        self.cfg, self.steps, self.name = cfg, int(steps), f"pd-{steps}"
        self.sigma_data = diffusion.sigma_data
        grid = dict(sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, rho=diffusion.rho)
        self.teacher_grid = student_sigmas(2 * steps, cfg.formulation, **grid)  # the teacher's 2N steps
        self.grid = self.teacher_grid[::2].clone()  # the student's N steps: every other point
        self.net = copy.deepcopy(teacher_net).train().requires_grad_(True)  # student_0 = teacher
        for m in self.net.modules():  # no dropout in distillation (Salimans & Ho's ImageNet config sets 0)
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        self.teacher = EDMPrecond(teacher_net.eval().requires_grad_(False), sigma_data=self.sigma_data)
        self.num_classes = int(getattr(teacher_net, "num_classes", 0))

    def to(self, device) -> PDRound:
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def target(self, x_t: torch.Tensor, i: torch.Tensor, labels) -> torch.Tensor:
        """x~ of the student's interval i [N] from x_t: two teacher DDIM steps on the 2N grid, then pd_target.
        The network runs in float32; the steps and the target are combined in float64, because x~ divides by
        1 - r (about 5e-3 near sigma_max in a 1024-step round) and float32 rounding would be amplified by it."""
        tg = self.teacher_grid.to(x_t.device)
        s, s_mid, s_next = tg[2 * i], tg[2 * i + 1], tg[2 * i + 2]

        def teacher(x, sigma, y):
            return self.teacher(x.float(), sigma.float(), y).double()

        x_t = x_t.double()
        x_mid = ddim_step(teacher, x_t, s, s_mid, labels)
        x_next = ddim_step(teacher, x_mid, s_mid, s_next, labels)
        return pd_target(x_t, x_next, s, s_next).float()

    def step(self, net: nn.Module, batch: list[torch.Tensor], generator: torch.Generator, phase=None):
        """Mean weighted squared error of the student's D(x_t, s_i) against x~; i ~ U{0..N-1} per sample."""
        x, y = batch
        x = to_model(x) if x.dtype == torch.uint8 else x.float()  # images, or float data in [-1, 1] (tests)
        labels = y if self.num_classes > 0 else None
        i = torch.randint(0, self.steps, (x.shape[0],), generator=generator, device=x.device)
        sigma = self.teacher_grid.to(x.device)[2 * i]
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        x_t = x + _col(sigma, x).float() * eps
        x_target = self.target(x_t, i, labels)
        D_x = EDMPrecond(net, sigma_data=self.sigma_data)(x_t, sigma.float(), labels)
        err = (D_x.float() - x_target).square().flatten(1).mean(1)
        w = loss_weight(sigma, self.cfg.loss).float()
        return (w * err).mean(), {"x_mse": err.mean()}


# ---------------------------------------------------------------------------------------------
# The rounds.

def data_source(cfg: PDConfig, meta: dict) -> tuple[str, bool]:
    """(source, xflip) of the training images: cfg.data, else the teacher's own training data; mirrored as the
    teacher's were."""
    data = (meta.get("config") or {}).get("data")
    data = data if isinstance(data, dict) else {}
    source = cfg.data or data.get("source")
    if not source:
        raise UserError(f"teacher {cfg.teacher} does not record its training data: pass --data (photos, an "
                        "image folder or an .npz)")
    return source, bool(data.get("xflip", False))


def rounds(cfg: PDConfig) -> list[int]:
    """Student step counts of the rounds, e.g. 16 -> 1: [8, 4, 2, 1]."""
    out, n = [], cfg.from_steps // 2
    while n >= cfg.to_steps:
        out.append(n)
        n //= 2
    return out


def check_rounds(out_dir: Path, cfg: PDConfig, round_cfg: dict) -> None:
    """Before any training: every round already in out_dir must hold this run's config (its teacher's SHA-256,
    known only once the previous round is trained, is checked by the loop when the round starts). A folder that
    holds anything but pd-<N> rounds is not a PD run of ours: refused, nothing written into it."""
    refuse_foreign_files(out_dir, ours=lambda p: p.is_dir() and p.name.startswith("pd-"), what="a pagoda PD run")
    for n in rounds(cfg):
        check_run_config(out_dir / f"pd-{n}", {**round_cfg, "round": {"teacher_steps": 2 * n, "student_steps": n}},
                         ignore=("round.teacher_sha256",))


def run(cfg: PDConfig, *, out_dir: str | os.PathLike) -> Path:
    """Every round from from_steps down to to_steps in out_dir/pd-<N>/ (resuming, skipping finished ones);
    returns the path of the last student."""
    if not cfg.teacher:
        raise UserError("no teacher given: pass --teacher T.safetensors (the Stage-1 teacher)")
    with dist.session():
        teacher = load_teacher(cfg.teacher)
        teacher_net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
        source, xflip = data_source(cfg, meta)
        dataset = build_dataset(source, teacher_net.resolution, xflip=xflip)
        if dataset.num_classes != teacher_net.num_classes:
            raise UserError(f"data {source!r} has {dataset.num_classes} classes but the teacher {cfg.teacher} has "
                            f"{teacher_net.num_classes}: pass the teacher's training data with --data")
        teacher_sha = sha256_file(cfg.teacher)
        round_cfg = {k: v for k, v in to_dict(cfg).items() if k != "to_steps"}  # a round does not depend on it
        round_cfg["inputs"] = {"data_fingerprint": dataset.fingerprint()}  # the images' content, not their path
        check_rounds(Path(out_dir), cfg, round_cfg)
        path, teacher_path, round_sha = None, Path(cfg.teacher), teacher_sha
        for n in rounds(cfg):
            if teacher_path != Path(cfg.teacher):
                teacher_net = load_teacher(teacher_path, kind="pd").net
                round_sha = sha256_file(teacher_path)
            stage = PDRound(cfg, teacher_net, diffusion, n).to(dist.device())
            extra = dict(network=meta["network"], diffusion=meta.get("diffusion", {}),
                         resolution=teacher_net.resolution, num_classes=teacher_net.num_classes,
                         teacher=str(cfg.teacher), teacher_sha256=teacher_sha, round_teacher=str(teacher_path),
                         method="pd", pd=dict(steps=n, formulation=cfg.formulation, loss=cfg.loss,
                                              sigmas=stage.grid.tolist()))
            path = train(stage=stage, cfg=cfg.train, out_dir=Path(out_dir) / stage.name,
                         config_dict={**round_cfg, "round": {"teacher_steps": 2 * n, "student_steps": n,
                                                             "teacher_sha256": round_sha}},
                         dataset=dataset, meta_extra=extra)
            teacher_path = path
        return path

