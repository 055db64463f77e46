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

Guidance (METHOD §2, "Guidance"; DESIGN): on guided pairs (`python -m pagoda pairs --guidance LO:HI`) G is the
teacher's network with its w-embedding switched on (zero-initialised, so G_0 still equals the teacher at every w)
and so is D; every reconstruction, fake and real is paired with the w_j of its item, so one G serves the range,
which its checkpoint records (`guidance_range`) and its sampler enforces. Two things make G follow w (without them
its FD / precision do not move with w): a CFG distillation term (the paper adds one for its text-to-image G)

    + w_cfg * d(G(z, y, w), ODE_w(z, y)),   z = sigma_max * eps fresh per step, (y, w) of the batch's items,

ODE_w the w-guided teacher solved by loss.cfg_sampler in loss.cfg_steps steps (the pairs hold the real image at every
w, so only this term shows G what w does), and the fresh w-embedding trained at guidance_lr_mult x lr_G (G is
fine-tuned from the teacher at a small lr; the embedding starts from zero, and RAdam's rectification damps the
first hundreds of steps further). D's real images are photos at every w, so for w != 1 L_adv and the CFG term have
no shared minimiser; with loss.adv_real = teacher D's reals are the w-guided teacher's samples instead (Thm 3.1's
condition: then L_rec on guided inversions, the CFG term and L_adv all are minimised by G = ODE_w).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pagoda import dist
from pagoda.checkpoint import diffusion_config, load_network, rebuild_network
from pagoda.config import DiffusionConfig, DistillConfig, to_dict
from pagoda.data import to_model
from pagoda.diffusion import EDMPrecond, karras_sigmas, one_step
from pagoda.errors import UserError
from pagoda.losses import adaptive_weight, adaptive_weight_layer, d, hinge_d_loss, hinge_g_loss
from pagoda.networks.discriminator import ProjectedDiscriminator, apply_augment, augment_params
from pagoda.networks.features import build_backbone
from pagoda.samplers import get_sampler
from pagoda.train import train
from pagoda.weights import sha256_file


class DiscPair(nn.Module):
    """Stage 3 at 8x (METHOD §2): the discriminator on samples (`main`) and a second one on reconstructions (`rec`)."""

    def __init__(self, main: ProjectedDiscriminator, rec: ProjectedDiscriminator):
        super().__init__()
        self.main, self.rec = main, rec

    def requires_grad_(self, requires_grad: bool = True) -> DiscPair:
        self.main.requires_grad_(requires_grad)  # each keeps its backbone frozen
        self.rec.requires_grad_(requires_grad)
        return self

    def power_iteration(self, n: int = 1) -> None:
        self.main.power_iteration(n)
        self.rec.power_iteration(n)


def generator_network(net: nn.Module, network: dict, *, guided: bool) -> tuple[nn.Module, dict]:
    """(G's network: a copy of `net` (the teacher's, or a one-step G's) with dropout 0 and, when guided, the
    w-embedding switched on; its network config). The official G is built with dropout 0 (sony/pagoda
    `cm/script_util.py`), whatever the teacher trained with (EDM ImageNet-64: 0.1): dropout inside G would act on
    L_rec, L_adv, the D step's fakes and lambda. A network that already has both is copied as it is."""
    changes = {"dropout": 0.0, **({"guidance_embed": True} if guided and net.guidance_emb is None else {})}
    if all(network.get(k) == v for k, v in changes.items()):
        return copy.deepcopy(net), dict(network)
    return rebuild_network(net, network, new_prefixes=("guidance_emb.",), **changes)


class OneStepStage:
    """What Stage 2b and Stage 3 share: G's reconstruction + adversarial step, the discriminator step, RAdam.

    A subclass sets: cfg (with .loss, .disc, .train), net (G), sigma_max, sigma_data, num_classes, guided (G and D
    take w), backbone (of d), disc (a ProjectedDiscriminator, a DiscPair, or None), phases (None = one joint
    update; ("rec", "adv") = two updates per step, lambda = 1), and `target(batch, labels, generator)` ->
    (z [N, 3, base, base], x float [-1, 1] at G's output size).
    """

    name = "G"
    kind = "pagoda"
    phases = None
    w_cfg = 0.0  # the CFG distillation term's weight (DistillStage on guided pairs); needs `cfg_target`
    fresh_params: tuple = ()  # G's parameters that start from zero (the w-embedding): trained at a higher lr

    def optimizer(self, params: list, which: str) -> torch.optim.Optimizer:
        """RAdam (no weight decay, no schedule; METHOD §2): lr_G = train.lr, lr_D = disc.lr; G's `fresh_params`
        (a second group, when there are any) at guidance_lr_mult * lr_G."""
        lr = self.cfg.train.lr if which == "net" else self.cfg.disc.lr
        fresh = {id(p) for p in self.fresh_params} if which == "net" else set()
        groups = [dict(params=[p for p in params if id(p) not in fresh])]
        if fresh:
            groups.append(dict(params=[p for p in params if id(p) in fresh], lr_mult=self.cfg.guidance_lr_mult,
                               lr=lr * self.cfg.guidance_lr_mult))
        return torch.optim.RAdam(groups, lr=lr, betas=tuple(self.cfg.train.adam_betas))

    def G(self, net, z: torch.Tensor, labels, w=None) -> torch.Tensor:
        """G(z, y[, w]) in float32: the raw network output at sigma_max (the image, unclamped in training)."""
        return one_step(net, z, labels, sigma_max=self.sigma_max, sigma_data=self.sigma_data, guidance=w).float()

    def _labels(self, y: torch.Tensor):
        return y if self.num_classes > 0 else None

    def _discs(self, disc):
        """(the samples' discriminator, the reconstructions' one or None)."""
        return (disc.main, disc.rec) if isinstance(disc, DiscPair) else (disc, None)

    def step(self, net, batch: list[torch.Tensor], generator: torch.Generator, phase: str | None = None):
        """One G micro-batch. phase None: L_rec + w_adv * lambda * L_adv (adaptive lambda if loss.adaptive);
        "rec": L_rec, plus rec_disc_weight * lambda_rec * L_adv_rec when there is a reconstructions' discriminator
        (L_adv_rec its hinge loss on G(z_x), lambda_rec adaptive against L_rec; sony/pagoda `train_util.py`
        adds it to the reconstruction update); "adv": w_adv * L_adv with lambda = 1. L_rec carries loss.w_rec where
        the config has one (Stage 3; 0 drops it, and lambda is then 1). With w_cfg > 0 (guided Stage 2b) the CFG
        distillation term w_cfg * d(G(z', y, w), cfg_target(z', y, w)) on fresh noise z' joins L_rec (lambda still
        weighs L_adv against L_rec alone). One G call serves every part. Logs l_rec, l_adv, lambda, l_cfg,
        l_adv_rec, lambda_rec."""
        x, y, _, w = batch
        labels, n, loss_cfg = self._labels(y), len(x), self.cfg.loss
        w = w.float() if self.guided else None
        z, target = self.target(batch, labels, generator)
        disc, disc_rec = self._discs(self.disc)
        eps = torch.randn(z.shape, generator=generator, device=z.device)  # the adversarial fake's noise
        w_rec = getattr(loss_cfg, "w_rec", 1.0)  # Stage 3's weight of L_rec (Stage 2b: 1)
        use_rec = phase in (None, "rec") and w_rec > 0
        use_adv = disc is not None and phase in (None, "adv")
        use_cfg = self.w_cfg > 0 and phase in (None, "rec")
        if use_cfg:  # the CFG distillation term's fresh noise and its w-guided teacher target
            z_cfg = self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device)
            target_cfg = self.cfg_target(z_cfg, labels, w)
        parts = ([z] if use_rec else []) + ([self.sigma_max * eps] if use_adv else []) + ([z_cfg] if use_cfg else [])
        reps = len(parts)
        out = self.G(net, torch.cat(parts), None if labels is None else labels.repeat(reps),
                     None if w is None else w.repeat(reps)).split(n)
        rec, fake = (out[0] if use_rec else None), (out[int(use_rec)] if use_adv else None)
        stats, loss, l_rec = {}, 0, 0
        if use_rec:
            draw = augment_params(n, generator) if loss_cfg.augment else None
            l_rec = w_rec * d(rec, target, [self.backbone], draw=draw).mean()
            stats["l_rec"], loss = l_rec.detach(), l_rec
        if use_cfg:
            draw = augment_params(n, generator) if loss_cfg.augment else None
            l_cfg = d(out[-1], target_cfg, [self.backbone], draw=draw).mean()
            stats["l_cfg"], loss = l_cfg.detach(), loss + self.w_cfg * l_cfg
        if use_rec and disc_rec is not None:  # + rec_disc_weight * lambda_rec * L_adv_rec, in the same update
            l_adv_rec = self._g_adv(disc_rec, rec, labels, w, generator)
            lam_rec = adaptive_weight(l_rec, l_adv_rec, adaptive_weight_layer(net))
            stats.update(l_adv_rec=l_adv_rec.detach(), lambda_rec=lam_rec)
            loss = loss + loss_cfg.rec_disc_weight * lam_rec * l_adv_rec
        if not use_adv:
            return loss, stats
        l_adv = self._g_adv(disc, fake, labels, w, generator)
        lam = torch.ones((), device=z.device)
        if phase is None and loss_cfg.adaptive:
            lam = adaptive_weight(l_rec, l_adv, adaptive_weight_layer(net))
        stats.update(l_adv=l_adv.detach(), **({"lambda": lam} if phase is None else {}))
        return loss + loss_cfg.w_adv * lam * l_adv, stats

    def _g_adv(self, disc, images, labels, w, generator) -> torch.Tensor:
        """The generator's hinge loss L_adv = -mean D(aug(images), y[, w]) with D held fixed (gradients reach G
        only); a fresh DiffAugment draw when loss.augment."""
        images = apply_augment(images, augment_params(len(images), generator)) if self.cfg.loss.augment else images
        disc.requires_grad_(False)
        try:
            return hinge_g_loss(disc(images, labels, w)).mean()
        finally:
            disc.requires_grad_(True)

    def after_step(self, step: int) -> None:
        """Once per optimizer step, on every rank alike: advance the discriminators' spectral norms."""
        if self.disc is not None:
            self.disc.power_iteration()

    def d_step(self, disc, net, batch: list[torch.Tensor], generator: torch.Generator):
        """One D micro-batch: hinge loss of real images against G's fakes of their labels (and w), one shared
        draw; with a reconstructions' discriminator also its hinge loss of x against G(z_x), one shared draw. The
        real images are the batch's photos, or with loss.adv_real = teacher (Stage 2b) the teacher's samples
        (`cfg_target`: guided at the items' w on guided pairs) from fresh noise with the items' labels."""
        x, y, z, w = batch
        labels, real = self._labels(y), to_model(x)
        w = w.float() if self.guided else None
        disc, disc_rec = self._discs(disc)
        with torch.no_grad():
            fake = self.G(net, self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device), labels, w)
            rec = self.G(net, z, labels, w) if disc_rec is not None else None
            if getattr(self.cfg.loss, "adv_real", "data") == "teacher":  # the (w-guided) teacher's samples as real
                real = self.cfg_target(self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device),
                                       labels, w)

        def hinge(d_net, real_x, fake_x):  # one DiffAugment draw shared by real_i and fake_i
            if self.cfg.loss.augment:
                draw = augment_params(len(x), generator)
                real_x, fake_x = apply_augment(real_x, draw), apply_augment(fake_x, draw)
            logits_real, logits_fake = d_net(real_x, labels, w), d_net(fake_x, labels, w)
            return hinge_d_loss(logits_real, logits_fake).mean(), logits_real.mean().detach(), logits_fake.mean().detach()

        loss, real_mean, fake_mean = hinge(disc, real, fake)
        stats = {"real": real_mean, "fake": fake_mean}
        if disc_rec is not None:
            loss_rec, _, stats["rec"] = hinge(disc_rec, real, rec)
            loss = loss + loss_rec
        return loss, stats


class DistillStage(OneStepStage):
    """G (a copy of the teacher network), the frozen teacher, the distance's backbone and the discriminator."""

    def __init__(self, cfg: DistillConfig, teacher_net: nn.Module, diffusion: DiffusionConfig, *, network: dict,
                 weights_dir=None, guided: bool = False, init: nn.Module | None = None):
        self.cfg, self.diffusion, self.guided = cfg, diffusion, guided
        self.sigma_max, self.sigma_data = diffusion.sigma_max, diffusion.sigma_data
        # G_0 = F exactly, or the given one-step G of the same teacher (`init`, e.g. the plain G for the guided G),
        # with dropout 0 and on guided pairs a zero w-embedding (G_0(w) = G_0)
        self.net, self.network = generator_network(teacher_net if init is None else init, network, guided=guided)
        self.net.train().requires_grad_(True)
        self.teacher = EDMPrecond(teacher_net.eval().requires_grad_(False), sigma_data=self.sigma_data)
        self.num_classes, self.resolution = teacher_net.num_classes, teacher_net.resolution
        self.backbone = build_backbone(cfg.loss.backbone, weights_dir=weights_dir, seed=1)
        self.w_cfg = cfg.loss.w_cfg if guided else 0.0
        self.fresh_params = tuple(self.net.guidance_emb.parameters()) if guided else ()
        self.disc = None
        if cfg.loss.w_adv > 0:
            self.disc = ProjectedDiscriminator(build_backbone(cfg.disc.backbone, weights_dir=weights_dir, seed=2),
                                               num_classes=self.num_classes, resolution=self.resolution,
                                               cond_dim=cfg.disc.cond_dim, guidance_embedding=guided)

    def to(self, device) -> DistillStage:
        """Move the frozen parts (teacher, backbones) to `device`; the loop moves G and D."""
        self.teacher.to(device)
        self.backbone.to(device)
        return self

    def _solve(self, sampler: str, steps: int, z: torch.Tensor, labels, w) -> torch.Tensor:
        """The teacher's PF-ODE solution from z: `sampler` (pagoda.samplers) in `steps` steps on the Karras grid of
        the teacher's sigma range, guided at w (scalar or per item [N]; None = unguided), clamped to [-1, 1]."""
        d_ = self.diffusion
        sigmas = karras_sigmas(steps, sigma_min=d_.sigma_min, sigma_max=d_.sigma_max, rho=d_.rho).to(z.device)
        return get_sampler(sampler)(self.teacher, z, sigmas, labels=labels, guidance=w).clamp(-1, 1)

    @torch.no_grad()
    def ode_target(self, z: torch.Tensor, labels, w=None) -> torch.Tensor:
        """L_dstl's target: the teacher's Heun PF-ODE solution from z (loss.dstl_steps steps, Karras grid), guided
        at w when given."""
        return self._solve("heun", self.cfg.loss.dstl_steps, z, labels, w)

    @torch.no_grad()
    def cfg_target(self, z: torch.Tensor, labels, w: torch.Tensor) -> torch.Tensor:
        """The CFG distillation term's target (DESIGN): the teacher's PF-ODE solution from z [N, 3, base, base]
        under classifier-free guidance at the per-item scales w [N] (METHOD §1: D_w = D_u + w (D_c - D_u); None:
        unguided), loss.cfg_sampler in loss.cfg_steps steps on the Karras grid, clamped to [-1, 1]; float32 [N, 3, base, base].
        The pairs carry the real image at every w, so only this term shows G what w does to the teacher."""
        return self._solve(self.cfg.loss.cfg_sampler, self.cfg.loss.cfg_steps, z, labels, w).float()

    def target(self, batch, labels, generator):
        """(z, x): the pair's latent and image (L_rec), or for L_dstl a fresh sigma_max * eps and the teacher's
        ODE solution from it (noise -> data pairs instead of the inversion pairs)."""
        x, _, z, w = batch
        if self.cfg.loss.kind == "dstl":
            z = self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device)
            return z, self.ode_target(z, labels, w.float() if self.guided else None)
        return z, to_model(x)


def load_teacher(path: str | os.PathLike) -> tuple[nn.Module, DiffusionConfig, dict]:
    """(network, diffusion constants, meta) of a Stage-1 teacher file; UserError for any other kind."""
    if not str(path):
        raise UserError("no teacher given: pass --teacher T.safetensors (the Stage-1 checkpoint the pairs were "
                        "made with)")
    net, meta = load_network(path, kind="teacher")
    return net, diffusion_config(path, meta), meta


def load_init(path: str, teacher_net: nn.Module, pairs, guided: bool, network: dict):
    """(net, its network config) of `--init`, a base-resolution one-step G distilled from the pairs' teacher, or
    (None, the teacher's network config) without one; UserError for a G of another teacher, a grown G, or a
    guided G for unguided pairs."""
    if not path:
        return None, network
    try:
        net, meta = load_network(path, kind="pagoda")
    except UserError as e:
        raise UserError(f"--init: {e}") from None
    if meta.get("teacher_sha256") != pairs.teacher_sha256:
        raise UserError(f"--init {path} was distilled from another teacher than the one of --pairs: pass a G "
                        "trained on this teacher's pairs")
    if meta.get("resolution") != teacher_net.resolution:
        raise UserError(f"--init {path} makes {meta.get('resolution')} px images, not the base "
                        f"{teacher_net.resolution} px: pass a Stage-2b G, not a grown one")
    if meta.get("guidance_range") is not None and not guided:
        raise UserError(f"--init {path} is a guidance-conditioned G but --pairs are unguided: pass a plain G, or "
                        "guided pairs (pagoda pairs --guidance)")
    return net, meta["network"]


def run_inputs(cfg: DistillConfig, pairs) -> dict:
    """What a run is made from, by content (its config.json's `inputs`): the pairs' teacher (the pairs were loaded
    against cfg.teacher's SHA-256), the pairs' index, and --init when there is one."""
    from pagoda.pairs import pairs_sha256

    return dict(teacher_sha256=pairs.teacher_sha256, pairs_sha256=pairs_sha256(cfg.pairs),
                **({"init_sha256": sha256_file(cfg.init)} if cfg.init else {}))


def run(cfg: DistillConfig, *, out_dir: str | os.PathLike, weights_dir=None) -> Path:
    """Train (or resume, or find finished) G in out_dir; returns the path of G.safetensors."""
    from pagoda.pairs import load_pairs

    if not cfg.pairs:
        raise UserError("no pairs given: pass --pairs DIR (made by `python -m pagoda pairs --teacher T ...`)")
    with dist.session():
        teacher_net, diffusion, meta = load_teacher(cfg.teacher)
        pairs = load_pairs(cfg.pairs, teacher_sha256=sha256_file(cfg.teacher), resolution=teacher_net.resolution)
        torch.manual_seed(cfg.train.seed)  # the same discriminator init on every rank and every rerun
        guided = pairs.guidance_range is not None
        init, network = load_init(cfg.init, teacher_net, pairs, guided, meta["network"])
        stage = DistillStage(cfg, teacher_net, diffusion, weights_dir=weights_dir, network=network,
                             guided=guided, init=init).to(dist.device())
        # a run is its inputs' content, not their paths: a teacher retrained at the same path, pairs remade or a
        # changed --init is another run (refused on resume or when finished, never taken as this one)
        inputs = run_inputs(cfg, pairs)
        extra = dict(network=stage.network, diffusion=meta.get("diffusion", {}), resolution=teacher_net.resolution,
                     num_classes=teacher_net.num_classes, teacher=str(cfg.teacher),
                     teacher_sha256=pairs.teacher_sha256, pairs=str(cfg.pairs), method="pagoda",
                     guidance_range=list(pairs.guidance_range) if guided else None,
                     pairs_data_fingerprint=pairs.index["data"]["fingerprint"],
                     **(dict(init=str(cfg.init), init_sha256=inputs["init_sha256"]) if cfg.init else {}))
        return train(stage=stage, cfg=cfg.train, out_dir=out_dir, config_dict={**to_dict(cfg), "inputs": inputs},
                     dataset=pairs, meta_extra=extra)
