"""Learning-rate and EMA schedules, the EMA state of the trainable parameters, and how far training moved the
weights in learning-rate units (pagoda.train's loop uses them; so do the tests and the report's budget column)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from pagoda.config import TrainConfig
from pagoda.errors import UserError


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from lr / lr_warmup to lr over the first lr_warmup steps, then constant
    (lr_decay "none") or decaying linearly to 0 at step cfg.steps ("linear", Salimans & Ho's per-round schedule)."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
    if cfg.lr_decay == "linear" and step >= cfg.lr_warmup:
        lr *= 1 - (step - cfg.lr_warmup) / max(cfg.steps - cfg.lr_warmup, 1)
    return lr


def ema_beta(ema_rate: float, step: int) -> float:
    """EMA decay at `step`: ema_rate, warmed up as (1 + k) / (10 + k) so early weights fade (DESIGN)."""
    return min(ema_rate, (1 + step) / (10 + step))


def ema_init(net: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA state: a copy of each trainable parameter, by name. Frozen parameters (Stage 3's trunk) get none."""
    return {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], net: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, for the trainable parameters `ema` holds."""
    for name, p in net.named_parameters():
        if name in ema:
            ema[name].lerp_(p.detach(), 1 - beta)


def peak_learning_rates(net: nn.Module, opt: torch.optim.Optimizer, lr: float) -> dict[str, float]:
    """name -> the peak learning rate of each trainable parameter: `lr` times its optimizer group's "lr_mult"."""
    mult = {id(p): group.get("lr_mult", 1.0) for group in opt.param_groups for p in group["params"]}
    return {name: lr * mult[id(p)] for name, p in net.named_parameters() if id(p) in mult}


@torch.no_grad()
def displacement_lr(weights: dict[str, torch.Tensor], init: dict[str, torch.Tensor], lr: dict[str, float]) -> float:
    """How far training moved the trainable weights, in learning-rate units: the RMS over every trainable element
    of (theta - theta_0) / lr_p, lr_p its group's peak learning rate (DESIGN).

    Adam-type optimisers move each weight by about lr per step at most, so this is the number of full steps
    the run amounts to: RAdam with beta2 = 0.999 has made ~0.6 of them after 16 steps and ~56 after 250 (its
    rectification), and a stage that scores a few has not trained, whatever its step count."""
    total, count = 0.0, 0
    for name, theta0 in init.items():
        delta = (weights[name].detach().float() - theta0.to(weights[name].device).float()) / lr[name]
        total += delta.square().sum().item()
        count += delta.numel()
    return math.sqrt(total / count) if count else 0.0


def ema_weights(ema: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """The deliverable's state dict: the net's (frozen parameters and buffers as they are) with the EMA of the
    trainable parameters in place of their raw values."""
    return {k: ema.get(k, v).detach().cpu().contiguous() for k, v in net.state_dict().items()}


def load_ema(ema: dict[str, torch.Tensor], saved: dict, path: Path) -> None:
    """Fill `ema` from a training state's entry (which may hold more: a full state dict of older runs)."""
    missing = sorted(set(ema) - set(saved))
    if missing:
        raise UserError(f"training state {path} has no EMA of {missing[:3]} (it was written with another set of "
                        f"trainable parameters): delete it to restart the run, or pass --out elsewhere")
    for k, t in ema.items():
        t.copy_(saved[k])
