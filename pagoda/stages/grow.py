"""Stage 3: progressive growing of the one-step generator (METHOD §2, "Stage 3"; Kim et al., NeurIPS 2024, §3.3).

Each run grows G 2x. The grown network is the source's UNet with `grow_stages + 1`: one more up-ResBlock
(nearest) and two ResBlocks at the head's width appended to the decoder before the kept output head, with
zero-initialised output convs (pagoda.networks.unet). Every weight of the source is copied by module
structure: the grown UNet has the source's modules under the same paths plus the new blocks, and the source's
state dict is loaded into it (anything other than "exactly the new blocks are missing" is an error).
Before any training the grown G is the source's trunk followed by h -> up(h) and the head; the head's
GroupNorm and SiLU commute with nearest upsampling, its 3x3 conv does not (`upsampling_gap_bound`), so G_2x(z)
is close to, not equal to, up(G(z)) (start "kept-head", the paper's). With start "skip" (ProGAN's skip
generator) the stage adds a head of its own, zero-initialised, to the upsampled image of the source: G_2x = up(G)
exactly at step 0. The grown blocks take the embedding as a bias (official `use_scale_shift_norm_high=False`)
unless scale_shift_norm is set; the grown G has dropout 0 (the official G is built with dropout 0).

Frozen (`GrowConfig.freeze`, data shown by `--dry-run`): the embeddings, the input conv and encoder, the middle
block and the early decoder; frozen parameters have requires_grad = False, so the loop gives them no optimiser
or EMA state. The generator input stays 3 x base x base: the SAME latents z_x of the Stage-2a pairs, now paired
with the crops of the same source images at the new resolution. A fresh discriminator per stage. Losses by
stage k (output = base * 2^k; ImageNet: 128, 256, 512 for k = 1, 2, 3):
- k < loss.split_from (128): L_rec + w_adv * lambda * L_adv with the adaptive lambda (as Stage 2b);
- k >= loss.split_from (256, 512): two G updates per step, on L_rec, then on w_adv * L_adv with lambda = 1;
- k >= loss.rec_disc_from (512): a second discriminator judges reconstructions G(z_x) against x; its generator
  loss joins the L_rec update as rec_disc_weight (0.5) * lambda_rec * L_adv_rec, lambda_rec adaptive against L_rec
  (sony/pagoda `cm/train_util.py` with `--recon_discriminator_weight=0.5`; none without L_rec).
The deliverable G.safetensors is a OneStepGenerator: nfe 1, resolution = its output, noise_shape = the base.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagoda import dist
from pagoda.checkpoint import diffusion_config, load_network, read_meta, rebuild_network
from pagoda.config import GrowConfig, UNetConfig, from_dict, to_dict
from pagoda.data import to_model
from pagoda.errors import UserError
from pagoda.networks.discriminator import DiscPair, ProjectedDiscriminator
from pagoda.networks.features import build_backbone
from pagoda.rundir import check_run_config
from pagoda.stages.onestep import OneStepStage
from pagoda.train import train
from pagoda.weights import sha256_file


def grow_network(source: nn.Module, network: dict, *, scale_shift_norm: bool = False,
                 start: str = "kept-head") -> tuple[nn.Module, dict]:
    """(the source UNet grown by one 2x stage with every source weight copied, its network config).

    network: the source's UNetConfig fields (its checkpoint's meta["network"]). The new blocks are initialised
    from the global RNG (seed it for a reproducible run); their output convs are zero. scale_shift_norm and start:
    GrowConfig's (the grown blocks' embedding; "skip" adds a zero-initialised head per stage, so the grown G is
    exactly up(G) before training). Dropout is 0 in the grown G (the official G is built with dropout 0), whatever
    the source recorded. UserError when the source was grown with other settings (one G, one layout).
    """
    src = from_dict(UNetConfig, network, where="source network")
    skip = start == "skip"
    if src.grow_stages and (src.grow_scale_shift_norm, src.grow_skip) != (scale_shift_norm, skip):
        raise UserError(f"the source G was grown with scale_shift_norm={str(src.grow_scale_shift_norm).lower()}, "
                        f"start={'skip' if src.grow_skip else 'kept-head'}: grow it with the same settings "
                        f"(--set scale_shift_norm=... --set start=...)")
    stages = src.grow_stages + 1
    new = [f"output_blocks.{len(source.output_blocks) + i}." for i in range(3)]  # the 3 blocks of one 2x stage
    if skip:
        new.append(f"grow_out.{stages - 1}.")  # and its head
    return rebuild_network(source, network, new_prefixes=new, grow_stages=stages, dropout=0.0,
                           grow_scale_shift_norm=scale_shift_norm, grow_skip=skip)


def freeze(net: nn.Module, names) -> list[str]:
    """Freeze the named submodules of `net` (requires_grad = False); returns the names frozen. A name the UNet
    holds as None (no label or guidance embedding) is skipped; any other unknown name is a UserError."""
    frozen = []
    for name in names:
        head, _, rest = name.partition(".")
        if getattr(net, head, "<absent>") is None and not rest:
            continue
        try:
            module = net.get_submodule(name)
        except AttributeError:
            tops = ", ".join(n for n, _ in net.named_children())
            raise UserError(f"freeze: {name!r} is not a module of this UNet (top level: {tops}; decoder blocks are "
                            f"output_blocks.0 .. output_blocks.{len(net.output_blocks) - 1})") from None
        module.requires_grad_(False)
        frozen.append(name)
    return frozen


def upsampling_gap_bound(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A bound on max |G_2x(z) - up(G(z))| per image [N] for a freshly grown G, from the source's last features h
    (the input of its head, [N, C, R, R]).

    Why it is not exact: with a = SiLU(GN(h)) (GroupNorm and SiLU commute with nearest upsampling: the groups'
    statistics of up(h) are those of h) and W the head's 3x3 conv, G_2x = W * up(a) + b but up(G) = up(W * a + b).
    At every output pixel the two 3x3 windows read, tap by tap, the same source pixel or two pixels at most one
    step apart in each axis (a diagonal pair at worst, or a pixel against the zero padding at the far border).
    So |difference in output channel c| <= sum_in sum_taps |W[c, in]| * 2 * step_in, step_in the largest
    horizontal or vertical step of a's channel `in` (padding included; a diagonal step is at most two of those).
    Returns max_c of that bound.
    """
    head = net.out
    a = head[1](head[0](h.float()))
    padded = F.pad(a, (1, 1, 1, 1))
    step = torch.maximum((padded[..., 1:, :] - padded[..., :-1, :]).abs().amax(dim=(2, 3)),
                         (padded[..., :, 1:] - padded[..., :, :-1]).abs().amax(dim=(2, 3)))  # [N, C_in]
    w_l1 = head[2].weight.detach().float().abs().sum(dim=(2, 3))  # [C_out, C_in]
    return (2 * step @ w_l1.T).amax(dim=1)


class GrowStage(OneStepStage):
    """The grown G (source weights copied, trunk frozen), the distance's backbone and a fresh discriminator."""

    def __init__(self, cfg: GrowConfig, source_net: nn.Module, network: dict, *, sigma_max: float, sigma_data: float,
                 stage_index: int, guided: bool, weights_dir=None):
        self.cfg, self.stage_index, self.guided = cfg, stage_index, guided
        self.sigma_max, self.sigma_data = sigma_max, sigma_data
        self.net, self.network = grow_network(source_net, network, scale_shift_norm=cfg.scale_shift_norm,
                                              start=cfg.start)
        self.net.train()
        self.frozen = freeze(self.net, cfg.freeze)
        if not any(p.requires_grad for p in self.net.parameters()):
            raise UserError(f"freeze {list(cfg.freeze)} leaves nothing to train: keep at least the grown blocks "
                            f"(output_blocks.{source_net.base_output_blocks} ...) and the head `out` trainable")
        grown = range(len(source_net.output_blocks), len(self.net.output_blocks))
        new_modules = [self.net.output_blocks[i] for i in grown] + ([self.net.grow_out[-1]] if self.net.grow_skip else [])
        if any(not p.requires_grad for m in new_modules for p in m.parameters()):
            raise UserError(f"freeze {list(cfg.freeze)} freezes blocks this stage adds (output_blocks."
                            f"{grown.start}-{grown.stop - 1}{', grow_out' if self.net.grow_skip else ''}): they start "
                            "at zero and must be trained; drop them")
        self.num_classes, self.resolution = self.net.num_classes, self.net.output_resolution
        self.backbone = build_backbone(cfg.loss.backbone, weights_dir=weights_dir, seed=1)
        self.w_rec = cfg.loss.w_rec
        self.phases = None
        if stage_index >= cfg.loss.split_from:  # two updates per step; an absent loss has none
            self.phases = tuple(p for p, w in (("rec", cfg.loss.w_rec), ("adv", cfg.loss.w_adv)) if w > 0)
        self.disc = None
        if cfg.loss.w_adv > 0:
            def make(seed: int) -> ProjectedDiscriminator:
                return ProjectedDiscriminator(build_backbone(cfg.disc.backbone, weights_dir=weights_dir, seed=seed),
                                              num_classes=self.num_classes, resolution=self.resolution,
                                              cond_dim=cfg.disc.cond_dim, guidance_embedding=guided)
            self.disc = make(2)
            if stage_index >= cfg.loss.rec_disc_from and cfg.loss.w_rec > 0:  # it joins the L_rec update
                self.disc = DiscPair(self.disc, make(3))

    def to(self, device) -> GrowStage:
        self.backbone.to(device)
        return self

    def target(self, batch, labels, generator):
        """(z, x): the base-resolution latent and the crop of the same image at the new resolution."""
        x, _, z, _ = batch
        return z, to_model(x)


@torch.no_grad()
def check_lineage(low_path, high_path) -> None:
    """UserError unless the G at high_path was grown (through any number of stages) from the G at low_path: its
    meta's `lineage` (the SHA-256 of every source it was grown from) holds low's file hash. A grown G written
    before lineage was recorded is checked by its teacher only."""
    low_meta, high_meta = read_meta(low_path), read_meta(high_path)
    lineage = high_meta.get("lineage")
    if lineage is not None and sha256_file(low_path) not in lineage:
        raise UserError(f"--high {high_path} was not grown from --low {low_path} (its lineage does not hold that "
                        "file): pass the G it was grown from, or the one grown from this G")
    if lineage is None and low_meta.get("teacher_sha256") != high_meta.get("teacher_sha256"):
        raise UserError(f"--low {low_path} and --high {high_path} come from different teachers: drift compares a "
                        "G with one grown from it")


def drift(low, high, seeds, *, batch: int = 100) -> dict:
    """How far a grown G moved from the G it was grown from (paper Fig. 3: objects drift between resolutions
    without L_rec). low, high: OneStepGenerators with the same noise shape (the base), high at a resolution
    2^k times low's. With x_lo = low(z) and x_hi = high(z) from the same seeds (labels drawn from the seeds):

        drift_rms = mean over seeds of the RMS difference (uint8 levels, 0..255) of area-downsample(x_hi) and x_lo
        drift_psnr_db = mean over seeds of the PSNR (dB) of the same pair
        ring_rms = RMS (uint8 levels) of x_hi - nearest-up(x_lo) over the pixels r from the image edge, r = 0 ..
                   RINGS - 1, then over the rest; frame_rms = ring_rms[0], where a one-pixel frame shows

    A grown G that keeps the content of its source scores a small RMS (it only adds detail, which averaging
    removes); one that drifts to other objects scores about the RMS between unrelated images (~60-90 levels).
    """
    from pagoda.data import psnr
    from pagoda.generator import OneStepGenerator, as_seeds

    for g in (low, high):
        if not isinstance(g, OneStepGenerator):
            raise UserError(f"drift compares PaGoDA generators; {g.name} is a {g.kind!r} checkpoint: pass G files")
    if low.resolution > high.resolution:
        raise UserError(f"--low {low.name} is at {low.resolution} px and --high {high.name} at {high.resolution} px: "
                        "swap them (--high is the grown one)")
    if low.noise_shape != high.noise_shape or high.resolution <= low.resolution or high.resolution % low.resolution:
        raise UserError(f"drift compares a G with one grown from it: {low.name} ({low.resolution} px, noise "
                        f"{low.noise_shape}) and {high.name} ({high.resolution} px, noise {high.noise_shape}) are not such a pair: "
                        "pass --high a G grown from --low")
    rms, ps, ring_sq = [], [], torch.zeros(RINGS + 1, dtype=torch.float64)
    seeds = as_seeds(seeds)
    ring = border_rings(high.resolution)
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        x_lo = low.sample(s).cpu()
        x_hi = high.sample(s).cpu().float()
        down = F.interpolate(x_hi, size=(low.resolution, low.resolution), mode="area").round().clamp(0, 255)
        down = down.to(torch.uint8)
        rms.append((down.float() - x_lo.float()).square().mean(dim=(1, 2, 3)).sqrt())
        ps.append(psnr(down, x_lo))
        up = F.interpolate(x_lo.float(), size=x_hi.shape[-2:], mode="nearest")
        sq = (x_hi - up).square().sum(dim=(0, 1)).double()  # [H, W] summed over samples and channels
        ring_sq.index_add_(0, ring.flatten(), sq.flatten())
    rms, ps = torch.cat(rms), torch.cat(ps)
    finite = ps[torch.isfinite(ps)]
    count = torch.bincount(ring.flatten(), minlength=RINGS + 1).double() * len(seeds) * 3
    ring_rms = (ring_sq / count).sqrt().tolist()
    return {"drift_rms": rms.mean().item(), "drift_psnr_db": finite.mean().item() if len(finite) else None,
            "frame_rms": ring_rms[0], "ring_rms": ring_rms, "num_samples": len(seeds), "low": low.name,
            "high": high.name, "low_resolution": low.resolution, "high_resolution": high.resolution}


RINGS = 4  # border rings of drift's profile: 0 = the outermost pixel, ..., RINGS - 1; RINGS = everything inside


def border_rings(size: int) -> torch.Tensor:
    """int64 [size, size]: each pixel's distance in pixels from the nearest image edge, capped at RINGS."""
    i = torch.arange(size)
    d = torch.minimum(i, size - 1 - i)
    return torch.minimum(torch.minimum(d[:, None], d[None, :]), torch.tensor(RINGS))


def stage_index(base: int, resolution: int) -> int:
    """k with resolution = base * 2^k."""
    return int(round(math.log2(resolution / base)))


def check_target(source: str, source_resolution: int, target: int) -> int:
    """The output resolution of the grown G: `target` (0 = twice the source's), refused unless it is 2x."""
    target = target or 2 * source_resolution
    if target != 2 * source_resolution:
        raise UserError(f"resolution={target} is not twice the resolution of --from {source} "
                        f"({source_resolution} px): each grow run doubles it; use {2 * source_resolution} (or 0)")
    return target


def run(cfg: GrowConfig, *, out_dir: str | os.PathLike, weights_dir=None) -> Path:
    """Grow (or resume, or find finished) G 2x in out_dir; returns the path of G.safetensors."""
    from pagoda.pairs import load_pairs, pairs_sha256

    if not cfg.source:
        raise UserError("no generator given: pass --from G.safetensors (Stage 2b's G, or a grown one)")
    if not cfg.pairs:
        raise UserError("no pairs given: pass --pairs DIR (the Stage-2a pairs the source G was trained on)")
    # a run is its inputs' content, not their paths (a G retrained at the same path is another run); a clash with
    # the run there: one line before any work
    inputs = dict(source_sha256=sha256_file(cfg.source) if Path(cfg.source).is_file() else None,
                  pairs_sha256=pairs_sha256(cfg.pairs))
    config_dict = {**to_dict(cfg), "inputs": inputs}
    check_run_config(Path(out_dir), config_dict)
    with dist.session():
        source, meta = load_network(cfg.source, kind="pagoda")
        diffusion = diffusion_config(cfg.source, meta)
        base = source.resolution
        target = check_target(cfg.source, source.output_resolution, cfg.resolution)
        pairs = load_pairs(cfg.pairs, teacher_sha256=meta.get("teacher_sha256"), resolution=base,
                           image_resolution=target)
        trained = meta.get("guidance_range")
        if (pairs.guidance_range and list(pairs.guidance_range)) != (trained or None):
            def say(r):
                return f"guided pairs (w in [{r[0]:g}, {r[1]:g}])" if r else "unguided pairs"
            raise UserError(f"--pairs {cfg.pairs} are {say(pairs.guidance_range)} but --from {cfg.source} was trained "
                            f"on {say(trained)}: grow it on the pairs it was trained on")
        fingerprint = meta.get("pairs_data_fingerprint")
        if fingerprint and fingerprint != pairs.index["data"]["fingerprint"]:
            raise UserError(f"--pairs {cfg.pairs} hold other images ({pairs.index['data']['source']}) than the pairs "
                            f"--from {cfg.source} was trained on ({meta.get('pairs')}): grow it on those")
        torch.manual_seed(cfg.train.seed)  # the same new blocks and discriminator on every rank and every rerun
        k = stage_index(base, target)
        stage = GrowStage(cfg, source, meta["network"], sigma_max=diffusion.sigma_max,
                          sigma_data=diffusion.sigma_data, stage_index=k, guided=trained is not None,
                          weights_dir=weights_dir).to(dist.device())
        dist.print0(f"grow: {source.output_resolution} -> {target} px (stage {k}, base {base}); frozen: "
                    f"{', '.join(stage.frozen)}; losses: "
                    f"{' then '.join(stage.phases) + ' (one update each)' if stage.phases else 'L_rec + w_adv lambda L_adv'}"
                    f"{' (w_rec = 0: no L_rec)' if cfg.loss.w_rec == 0 else ''}"
                    f"{' + a reconstructions discriminator' if isinstance(stage.disc, DiscPair) else ''}")
        extra = dict(network=stage.network, diffusion=meta.get("diffusion", {}), resolution=target,
                     noise_resolution=base, num_classes=source.num_classes, teacher=meta.get("teacher"),
                     teacher_sha256=meta.get("teacher_sha256"), pairs=str(cfg.pairs), source=str(cfg.source),
                     method="pagoda", guidance_range=trained, grow_stage=k, frozen=stage.frozen,
                     pairs_data_fingerprint=pairs.index["data"]["fingerprint"],
                     lineage=[*meta.get("lineage", []), inputs["source_sha256"]])
        return train(stage=stage, cfg=cfg.train, out_dir=out_dir, config_dict=config_dict, dataset=pairs,
                     meta_extra=extra)
