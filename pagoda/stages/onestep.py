"""What Stage 2b and Stage 3 share (METHOD §2): the one-step G's update as named loss terms, and the discriminator
that a stage owns through an `Adversary` (its data stream, optimizer and update).

G's loss is a sum of terms, each weighted as the paper's code weighs it (sony/pagoda `train_util.py`):

    rec      w_rec * d(G(z_x, y[, w]), x)                                    L_rec (Stage 3: w_rec from its config)
    cfg      w_cfg * d(G(z', y, w), ODE_w(z', y))                             the CFG distillation term (guided 2b)
    adv_rec  rec_disc_weight * lambda_rec * L_adv_rec(G(z_x))                 Stage 3's reconstructions' D, 8x on
    adv      w_adv * lambda * L_adv(G(sigma_max eps))                         lambda adaptive in a joint update, else 1

`PHASE_TERMS` says which terms each update carries: one joint update (phase None), or Stage 3's split updates
("rec", then "adv"). A term whose weight or discriminator is absent drops out. One batched G call serves every term.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagoda.data import to_model
from pagoda.diffusion import one_step
from pagoda.losses import adaptive_weight, adaptive_weight_layer, d, hinge_d_loss, hinge_g_loss
from pagoda.networks.discriminator import DiscPair, apply_augment, augment_params
from pagoda.train import RunLayout, Stage, accumulate_stats, average_gradients, derive_seed

# The loss terms of each update, in the order they are added (None: one joint update per step).
PHASE_TERMS = {None: ("rec", "cfg", "adv_rec", "adv"), "rec": ("rec", "cfg", "adv_rec"), "adv": ("adv",)}
G_INPUTS = ("rec", "adv", "cfg")  # the order of the terms' inputs in G's one batched call


class Adversary:
    """A discriminator that a stage trains beside its network: moved to the run's device, its optimizer, its real
    images from a second, independently shuffled stream over the same data set (seed derive_seed(seed, 3)), and its
    update once per optimizer step after the network's, gradients averaged over ranks here (no DDP wrapper: D sees
    real and fake batches in two forwards). The noise of micro-batch m of step k comes from
    derive_seed(seed, 4, k, m). `d_step(disc, net, batch, generator) -> (loss, stats)` is the stage's."""

    def __init__(self, disc: nn.Module, d_step, optimizer, run: RunLayout):
        self.disc, self.d_step, self.run = disc.to(run.device).train(), d_step, run
        self.params = [p for p in disc.parameters() if p.requires_grad]
        self.opt = optimizer(self.params)
        self.batches = run.batches(derive_seed(run.cfg.seed, 3))

    def update(self, step: int, net: nn.Module) -> dict[str, torch.Tensor]:
        """D's update of `step` against G = `net`; its statistics ("d_loss", "d_real", ...) summed over rounds."""
        run, sums = self.run, {}
        self.opt.zero_grad(set_to_none=True)
        for a in range(run.accum):
            batch = [t.to(run.device, non_blocking=True) for t in next(self.batches)]
            generator = torch.Generator(run.device).manual_seed(derive_seed(run.cfg.seed, 4, step, run.micro_index(a)))
            loss, stats = self.d_step(self.disc, net, batch, generator)
            (loss / run.accum).backward()
            accumulate_stats(sums, {"loss": loss, **stats}, run.accum, run.device, prefix="d_")
        average_gradients(self.params)
        self.opt.step()
        return sums

    def state_dict(self) -> dict:
        return dict(disc=self.disc.state_dict(), optimizer_disc=self.opt.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["optimizer_disc"])


@dataclasses.dataclass
class _Micro:
    """One G micro-batch as the loss terms see it."""

    net: nn.Module
    phase: str | None
    labels: torch.Tensor | None
    w: torch.Tensor | None
    generator: torch.Generator
    out: dict  # term -> G's output for it
    targets: dict  # term -> its target image
    l_rec: torch.Tensor | float = 0  # L_rec as weighed (lambda's reference); 0 without it


class OneStepStage(Stage):
    """The one-step G's stage (Stage 2b, Stage 3): its loss terms, the discriminator step, RAdam.

    A subclass sets: cfg (with .loss, .disc, .train), net (G), sigma_max, sigma_data, num_classes, guided (G and D
    take w), backbone (of d), disc (a ProjectedDiscriminator, a DiscPair, or None), phases (None = one joint
    update; ("rec", "adv") = two updates per step, lambda = 1), and `target(batch, labels, generator)` ->
    (z [N, 3, base, base], x float [-1, 1] at G's output size).
    """

    name = "G"
    kind = "pagoda"
    disc: nn.Module | None = None
    adversary: Adversary | None = None
    w_rec = 1.0  # L_rec's weight (Stage 3 sets its loss.w_rec; 0 drops the term)
    w_cfg = 0.0  # the CFG distillation term's weight (DistillStage on guided pairs); needs `cfg_target`
    adv_real = "data"  # D's real images: the data, or "teacher" (the w-guided teacher's samples; needs `cfg_target`)
    fresh_params: tuple = ()  # G's parameters that start from zero (the w-embedding): trained at a higher lr

    def optimizer(self, params: list, cfg=None) -> torch.optim.Optimizer:
        """G's RAdam (no weight decay, no schedule; METHOD §2) at lr_G = train.lr; its `fresh_params` (a second
        group, when there are any) at guidance_lr_mult * lr_G."""
        lr, fresh = self.cfg.train.lr, {id(p) for p in self.fresh_params}
        groups = [dict(params=[p for p in params if id(p) not in fresh])]
        if fresh:
            groups.append(dict(params=[p for p in params if id(p) in fresh], lr_mult=self.cfg.guidance_lr_mult,
                               lr=lr * self.cfg.guidance_lr_mult))
        return torch.optim.RAdam(groups, lr=lr, betas=tuple(self.cfg.train.adam_betas))

    def disc_optimizer(self, params: list) -> torch.optim.Optimizer:
        """D's RAdam at lr_D = disc.lr, with G's betas."""
        return torch.optim.RAdam([dict(params=params)], lr=self.cfg.disc.lr, betas=tuple(self.cfg.train.adam_betas))

    def start(self, run: RunLayout) -> None:
        if self.disc is not None:
            self.adversary = Adversary(self.disc, self.d_step, self.disc_optimizer, run)

    def after_step(self, step: int, net: nn.Module) -> dict:
        """D's update, then (on every rank alike) one power iteration of its spectral norms."""
        if self.adversary is None:
            return {}
        stats = self.adversary.update(step, net)
        self.disc.power_iteration()
        return stats

    def state_dict(self) -> dict:
        return self.adversary.state_dict() if self.adversary is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state)

    def G(self, net, z: torch.Tensor, labels, w=None) -> torch.Tensor:
        """G(z, y[, w]) in float32: the raw network output at sigma_max (the image, unclamped in training)."""
        return one_step(net, z, labels, sigma_max=self.sigma_max, sigma_data=self.sigma_data, guidance=w).float()

    def _labels(self, y: torch.Tensor):
        return y if self.num_classes > 0 else None

    def _discs(self, disc):
        """(the samples' discriminator, the reconstructions' one or None)."""
        return (disc.main, disc.rec) if isinstance(disc, DiscPair) else (disc, None)

    def terms(self, phase: str | None) -> tuple[str, ...]:
        """The loss terms of `phase`'s update (PHASE_TERMS) that this stage has: a weight > 0 and, for the
        adversarial ones, their discriminator."""
        disc, disc_rec = self._discs(self.disc)
        have = dict(rec=self.w_rec > 0, cfg=self.w_cfg > 0, adv=disc is not None,
                    adv_rec=disc_rec is not None and self.w_rec > 0)
        return tuple(t for t in PHASE_TERMS[phase] if have[t])

    def step(self, net, batch: list[torch.Tensor], generator: torch.Generator, phase: str | None = None):
        """One G micro-batch: the sum of `terms(phase)` (module docstring), in that order. Draws from `generator`,
        in this order: the target's (L_dstl's noise), the fake's noise eps (every phase), the CFG term's noise, then
        each term's DiffAugment draw when loss.augment. Logs l_rec, l_cfg, l_adv_rec, lambda_rec, l_adv, lambda."""
        x, y, _, w = batch
        labels, terms = self._labels(y), self.terms(phase)
        w = w.float() if self.guided else None
        z, target = self.target(batch, labels, generator)
        eps = torch.randn(z.shape, generator=generator, device=z.device)  # the adversarial fake's noise
        inputs, targets = dict(rec=z, adv=self.sigma_max * eps), dict(rec=target)
        if "cfg" in terms:  # the CFG distillation term's fresh noise and its w-guided teacher target
            inputs["cfg"] = self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device)
            targets["cfg"] = self.cfg_target(inputs["cfg"], labels, w)
        names = [k for k in G_INPUTS if k in terms]
        reps = len(names)
        out = self.G(net, torch.cat([inputs[k] for k in names]), None if labels is None else labels.repeat(reps),
                     None if w is None else w.repeat(reps)).split(len(x))
        micro = _Micro(net, phase, labels, w, generator, dict(zip(names, out)), targets)
        loss, stats = 0, {}
        for term in terms:
            value, term_stats = getattr(self, f"_term_{term}")(micro)
            loss = loss + value
            stats.update(term_stats)
        return loss, stats

    def _distance(self, micro: _Micro, term: str) -> torch.Tensor:
        """mean d(G's output for `term`, its target), one DiffAugment draw shared by both when loss.augment."""
        draw = augment_params(len(micro.out[term]), micro.generator) if self.cfg.loss.augment else None
        return d(micro.out[term], micro.targets[term], [self.backbone], draw=draw).mean()

    def _term_rec(self, micro: _Micro):
        micro.l_rec = self.w_rec * self._distance(micro, "rec")
        return micro.l_rec, {"l_rec": micro.l_rec.detach()}

    def _term_cfg(self, micro: _Micro):
        l_cfg = self._distance(micro, "cfg")
        return self.w_cfg * l_cfg, {"l_cfg": l_cfg.detach()}

    def _term_adv_rec(self, micro: _Micro):
        """rec_disc_weight * lambda_rec * L_adv_rec, lambda_rec adaptive against L_rec, in L_rec's update."""
        l_adv_rec = self._g_adv(self._discs(self.disc)[1], micro.out["rec"], micro.labels, micro.w, micro.generator)
        lam_rec = adaptive_weight(micro.l_rec, l_adv_rec, adaptive_weight_layer(micro.net))
        return self.cfg.loss.rec_disc_weight * lam_rec * l_adv_rec, dict(l_adv_rec=l_adv_rec.detach(), lambda_rec=lam_rec)

    def _term_adv(self, micro: _Micro):
        """w_adv * lambda * L_adv: lambda adaptive against L_rec in a joint update with loss.adaptive, else 1."""
        l_adv = self._g_adv(self._discs(self.disc)[0], micro.out["adv"], micro.labels, micro.w, micro.generator)
        lam = torch.ones((), device=l_adv.device)
        if micro.phase is None and self.cfg.loss.adaptive:
            lam = adaptive_weight(micro.l_rec, l_adv, adaptive_weight_layer(micro.net))
        stats = dict(l_adv=l_adv.detach(), **({"lambda": lam} if micro.phase is None else {}))
        return self.cfg.loss.w_adv * lam * l_adv, stats

    def _g_adv(self, disc, images, labels, w, generator) -> torch.Tensor:
        """The generator's hinge loss L_adv = -mean D(aug(images), y[, w]) with D held fixed (gradients reach G
        only); a fresh DiffAugment draw when loss.augment."""
        images = apply_augment(images, augment_params(len(images), generator)) if self.cfg.loss.augment else images
        disc.requires_grad_(False)
        try:
            return hinge_g_loss(disc(images, labels, w)).mean()
        finally:
            disc.requires_grad_(True)

    def d_step(self, disc, net, batch: list[torch.Tensor], generator: torch.Generator):
        """One D micro-batch: hinge loss of real images against G's fakes of their labels (and w), one shared
        draw; with a reconstructions' discriminator also its hinge loss of x against G(z_x), one shared draw. The
        real images are the batch's photos, or with adv_real = "teacher" (Stage 2b) the teacher's samples
        (`cfg_target`: guided at the items' w on guided pairs) from fresh noise with the items' labels."""
        x, y, z, w = batch
        labels, real = self._labels(y), to_model(x)
        w = w.float() if self.guided else None
        disc, disc_rec = self._discs(disc)
        with torch.no_grad():
            fake = self.G(net, self.sigma_max * torch.randn(z.shape, generator=generator, device=z.device), labels, w)
            rec = self.G(net, z, labels, w) if disc_rec is not None else None
            if self.adv_real == "teacher":
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
