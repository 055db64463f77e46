"""Stage 2b: the one-step generator G at the base resolution (METHOD §2, "Stage 2b").

G is an exact copy of the teacher's network F, always queried at sigma_max with the raw network output
as the image: x = F(c_in(sigma_max) z; c_noise(sigma_max), y) (pagoda.diffusion.one_step). Its loss is

    L = L_rec + w_adv * lambda * L_adv_G,    L_rec = d(G(z_x, y), x)       (kind "rec", the paper's)
                                           or L_dstl = d(G(z, y), ODE_teacher(z, y))  (kind "dstl", Fig. 5)

with d the feature distance of pagoda.losses on a frozen backbone, L_adv_G the hinge generator loss of a
projected discriminator on G(sigma_max eps, y) (the labels of the reconstruction batch), and lambda the
adaptive weight at G's last output conv, per micro-batch like every loss (so that two processes equal one
process accumulating the same micro-batches; D's spectral norms advance once per step). G and D steps
alternate 1:1 (pagoda.train runs `step`, then the stage's Adversary (pagoda.stages.onestep) runs `d_step` on a
second, independently shuffled stream whose real images are paired with fakes of their labels, one DiffAugment
draw shared by fake_i and real_i).
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
from pagoda.checkpoint import load_network, load_teacher, rebuild_network
from pagoda.config import DiffusionConfig, DistillConfig, to_dict
from pagoda.data import to_model
from pagoda.diffusion import EDMPrecond, karras_sigmas
from pagoda.errors import UserError
from pagoda.networks.discriminator import ProjectedDiscriminator
from pagoda.networks.features import build_backbone
from pagoda.samplers import get_sampler
from pagoda.stages.onestep import OneStepStage
from pagoda.train import train
from pagoda.weights import sha256_file


def generator_network(net: nn.Module, network: dict, *, guided: bool) -> tuple[nn.Module, dict]:
    """(G's network: a copy of `net` (the teacher's, or a one-step G's) with dropout 0 and, when guided, the
    w-embedding switched on; its network config). The official G is built with dropout 0 (sony/pagoda
    `cm/script_util.py`), whatever the teacher trained with (EDM ImageNet-64: 0.1): dropout inside G would act on
    L_rec, L_adv, the D step's fakes and lambda. A network that already has both is copied as it is."""
    changes = {"dropout": 0.0, **({"guidance_embed": True} if guided and net.guidance_emb is None else {})}
    if all(network.get(k) == v for k, v in changes.items()):
        return copy.deepcopy(net), dict(network)
    return rebuild_network(net, network, new_prefixes=("guidance_emb.",), **changes)


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
        self.adv_real = cfg.loss.adv_real
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
        teacher = load_teacher(cfg.teacher)
        teacher_net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
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
