"""Stage 2b: the one-step generator G at the base resolution (METHOD §2, "Stage 2b").

G is an exact copy of the teacher's network F, always queried at sigma_max with the raw network output
as the image: x = F(c_in(sigma_max) z; c_noise(sigma_max), y) (pagoda.diffusion.one_step). Its loss is

    L = L_rec + w_adv * lambda * L_adv_G,    L_rec = d(G(z_x, y), x)       (kind "rec", the paper's)
                                           or L_dstl = d(G(z, y), ODE_teacher(z, y))  (kind "dstl", Fig. 5)

with d the feature distance of pagoda.losses on a frozen backbone, L_adv_G the hinge generator loss of a
projected discriminator on G(sigma_max eps, y) (the labels of the reconstruction batch), and lambda the
adaptive weight at G's last output conv, per micro-batch like every loss (so that two processes equal one
process accumulating the same micro-batches; D's spectral norms advance once per step). G and D steps
alternate 1:1 (pagoda.train runs `step`, then `d_step` on a second, independently shuffled stream whose
real images are paired with fakes of their labels, one DiffAugment draw shared by fake_i and real_i).
RAdam for both; EMA of G after G steps only. The deliverable G.safetensors loads as a OneStepGenerator.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pagoda import dist
from pagoda.checkpoint import diffusion_config, load_network
from pagoda.config import DiffusionConfig, DistillConfig, to_dict
from pagoda.data import to_model
from pagoda.diffusion import EDMPrecond, karras_sigmas, one_step
from pagoda.errors import UserError
from pagoda.losses import adaptive_weight, adaptive_weight_layer, d, hinge_d_loss, hinge_g_loss
from pagoda.networks.discriminator import ProjectedDiscriminator, apply_augment, augment_params
from pagoda.networks.features import build_backbone
from pagoda.samplers import heun
from pagoda.train import train
from pagoda.weights import sha256_file


class DistillStage:
    """G (a copy of the teacher network), the frozen teacher, the distance's backbone and the discriminator."""

    name = "G"
    kind = "pagoda"

    def __init__(self, cfg: DistillConfig, teacher_net: nn.Module, diffusion: DiffusionConfig, *,
                 weights_dir=None):
        self.cfg, self.diffusion = cfg, diffusion
        self.sigma_max, self.sigma_data = diffusion.sigma_max, diffusion.sigma_data
        self.net = copy.deepcopy(teacher_net).train().requires_grad_(True)  # G_0 = F exactly
        self.teacher = EDMPrecond(teacher_net.eval().requires_grad_(False), sigma_data=self.sigma_data)
        self.num_classes, self.resolution = teacher_net.num_classes, teacher_net.resolution
        self.backbone = build_backbone(cfg.loss.backbone, weights_dir=weights_dir, seed=1)
        self.disc = None
        if cfg.loss.w_adv > 0:
            self.disc = ProjectedDiscriminator(build_backbone(cfg.disc.backbone, weights_dir=weights_dir, seed=2),
                                               num_classes=self.num_classes, resolution=self.resolution,
                                               cond_dim=cfg.disc.cond_dim)

    def to(self, device) -> DistillStage:
        """Move the frozen parts (teacher, backbones) to `device`; the loop moves G and D."""
        self.teacher.to(device)
        self.backbone.to(device)
        return self

    def optimizer(self, params: list, which: str) -> torch.optim.Optimizer:
        """RAdam (no weight decay, no schedule; METHOD §2): lr_G = train.lr, lr_D = disc.lr."""
        lr = self.cfg.train.lr if which == "net" else self.cfg.disc.lr
        return torch.optim.RAdam(params, lr=lr, betas=tuple(self.cfg.train.adam_betas))

    def G(self, net, z: torch.Tensor, labels) -> torch.Tensor:
        """G(z, y) in float32: the raw network output at sigma_max (the image, unclamped in training)."""
        return one_step(net, z, labels, sigma_max=self.sigma_max, sigma_data=self.sigma_data).float()

    def _labels(self, y: torch.Tensor):
        return y if self.num_classes > 0 else None

    @torch.no_grad()
    def ode_target(self, z: torch.Tensor, labels) -> torch.Tensor:
        """L_dstl's target: the teacher's Heun PF-ODE solution from z (loss.dstl_steps steps, Karras grid)."""
        d_ = self.diffusion
        sigmas = karras_sigmas(self.cfg.loss.dstl_steps, sigma_min=d_.sigma_min, sigma_max=d_.sigma_max,
                               rho=d_.rho).to(z.device)
        return heun(self.teacher, z, sigmas, labels=labels).clamp(-1, 1)

    def step(self, net, batch: list[torch.Tensor], generator: torch.Generator):
        """One G micro-batch: L_rec (or L_dstl) + w_adv * lambda * L_adv_G; logs l_rec, l_adv, lambda."""
        x, y, z = batch
        labels, n, loss_cfg = self._labels(y), len(x), self.cfg.loss
        eps = torch.randn(x.shape, generator=generator, device=x.device)  # the adversarial fake's noise
        if loss_cfg.kind == "dstl":  # noise -> data pairs from the teacher instead of the inversion pairs
            z = self.sigma_max * torch.randn(x.shape, generator=generator, device=x.device)
            target = self.ode_target(z, labels)
        else:
            target = to_model(x)
        adv = self.disc is not None
        inputs = torch.cat([z, self.sigma_max * eps]) if adv else z
        out = self.G(net, inputs, None if labels is None else torch.cat([labels, labels]) if adv else labels)
        draw = augment_params(n, generator) if loss_cfg.augment else None
        l_rec = d(out[:n], target, [self.backbone], draw=draw).mean()
        if not adv:
            return l_rec, {"l_rec": l_rec.detach()}
        self.disc.requires_grad_(False)  # D is fixed in the G step: gradients reach G only
        fake = apply_augment(out[n:], augment_params(n, generator)) if loss_cfg.augment else out[n:]
        l_adv = hinge_g_loss(self.disc(fake, labels)).mean()
        self.disc.requires_grad_(True)
        lam = torch.ones((), device=x.device)
        if loss_cfg.adaptive:
            lam = adaptive_weight(l_rec, l_adv, adaptive_weight_layer(net))
        loss = l_rec + loss_cfg.w_adv * lam * l_adv
        return loss, {"l_rec": l_rec.detach(), "l_adv": l_adv.detach(), "lambda": lam}

    def after_step(self, step: int) -> None:
        """Once per optimizer step, on every rank alike: advance the discriminator's spectral norms."""
        if self.disc is not None:
            self.disc.power_iteration()

    def d_step(self, disc, net, batch: list[torch.Tensor], generator: torch.Generator):
        """One D micro-batch: hinge loss of real images against G's fakes of their labels, one shared draw."""
        x, y = batch[0], batch[1]
        labels, real = self._labels(y), to_model(x)
        with torch.no_grad():
            fake = self.G(net, self.sigma_max * torch.randn(real.shape, generator=generator, device=x.device), labels)
        if self.cfg.loss.augment:
            draw = augment_params(len(x), generator)
            real, fake = apply_augment(real, draw), apply_augment(fake, draw)
        logits_real, logits_fake = disc(real, labels), disc(fake, labels)
        loss = hinge_d_loss(logits_real, logits_fake).mean()
        return loss, {"real": logits_real.mean().detach(), "fake": logits_fake.mean().detach()}


def load_teacher(path: str | os.PathLike) -> tuple[nn.Module, DiffusionConfig, dict]:
    """(network, diffusion constants, meta) of a Stage-1 teacher file; UserError for any other kind."""
    if not str(path):
        raise UserError("no teacher given: pass --teacher T.safetensors (the Stage-1 checkpoint the pairs were "
                        "made with)")
    net, meta = load_network(path, kind="teacher")
    return net, diffusion_config(path, meta), meta


def run(cfg: DistillConfig, *, out_dir: str | os.PathLike, weights_dir=None) -> Path:
    """Train (or resume, or find finished) G in out_dir; returns the path of G.safetensors."""
    from pagoda.pairs import load_pairs

    if not cfg.pairs:
        raise UserError("no pairs given: pass --pairs DIR (made by `python -m pagoda pairs --teacher T ...`)")
    with dist.session():
        teacher_net, diffusion, meta = load_teacher(cfg.teacher)
        pairs = load_pairs(cfg.pairs, teacher_sha256=sha256_file(cfg.teacher), resolution=teacher_net.resolution)
        torch.manual_seed(cfg.train.seed)  # the same discriminator init on every rank and every rerun
        stage = DistillStage(cfg, teacher_net, diffusion, weights_dir=weights_dir).to(dist.device())
        extra = dict(network=meta["network"], diffusion=meta.get("diffusion", {}), resolution=teacher_net.resolution,
                     num_classes=teacher_net.num_classes, teacher=str(cfg.teacher),
                     teacher_sha256=pairs.teacher_sha256, pairs=str(cfg.pairs), method="pagoda")
        return train(stage=stage, cfg=cfg.train, out_dir=out_dir, config_dict=to_dict(cfg), dataset=pairs,
                     meta_extra=extra)
