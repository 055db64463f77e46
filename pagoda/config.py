"""Configuration: frozen dataclasses per stage, named presets, JSON round trip, validation.

A config is data, never a CLI namespace: constructors elsewhere take its fields as keyword
arguments. `resolve(preset, overrides)` is what every command calls; `--dry-run` prints the
result of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from pagoda.errors import UserError

# Sorted class names of the bundled `photos` data set (one per photograph); kept here so a config
# can state its number of classes without building the data. pagoda.data checks it agrees.
PHOTOS_NUM_CLASSES = 16


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they are brought to the base resolution."""

    source: str = "photos"  # "photos" (bundled), an ImageNet-layout folder, or an ADM .npz
    resolution: int = 16  # base resolution (the teacher's and the one-step generator's input)
    xflip: bool = True  # dataset of 2N: index i >= N is the mirror of i - N
    num_workers: int = 0  # DataLoader workers per rank

    def validate(self) -> None:
        _check(self.resolution >= 4 and self.resolution & (self.resolution - 1) == 0,
               f"data.resolution={self.resolution} must be a power of two >= 4 (e.g. 16, 64)")
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _check(bool(self.source), "data.source is empty: give 'photos', an image folder or an .npz file")


@dataclass(frozen=True)
class UNetConfig:
    """ADM UNet architecture; field names are the keyword arguments of pagoda.networks.unet.UNet."""

    resolution: int = 16
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_head_channels: int = 32
    dropout: float = 0.0
    num_classes: int = PHOTOS_NUM_CLASSES  # 0 = unconditional; index num_classes is the null class
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    emb_noise_scale: float = 1000.0  # the UNet embeds emb_noise_scale * c_noise (ADM / EDM-IN64 import)
    guidance_embed: bool = False  # embed the CFG scale w (one-step generators with guidance)
    # the sinusoids' argument is guidance_emb_scale * w (DESIGN: 10 keeps every frequency smooth over w in [0, 10];
    # guided files written before this key embedded 1000 * w and load as such, pagoda.checkpoint.build_network)
    guidance_emb_scale: float = 10.0
    grow_stages: int = 0  # Stage 3: 2x growth stages before the head (output = resolution * 2^grow_stages)
    # Stage 3's blocks (set by `grow` from GrowConfig; these defaults are what files written before the keys hold):
    grow_scale_shift_norm: bool = True  # embedding as scale-shift of the norm (True) or a bias (False, official)
    grow_skip: bool = False  # image_k = up(image_{k-1}) + a zero-initialised head of its own (exact growth start)

    def validate(self) -> None:
        levels = len(self.channel_mult)
        _check(levels >= 1, "network.channel_mult must have at least one level, e.g. [1, 2, 2]")
        _check(self.guidance_emb_scale > 0, f"network.guidance_emb_scale={self.guidance_emb_scale} must be > 0")
        _check(self.resolution % 2 ** (levels - 1) == 0,
               f"network.resolution={self.resolution} is not divisible by 2^(levels-1)="
               f"{2 ** (levels - 1)}: use fewer channel_mult levels or a larger resolution")
        _check(self.model_channels > 0 and self.num_res_blocks >= 1,
               "network.model_channels and network.num_res_blocks must be positive")
        widths = {self.model_channels * m for m in self.channel_mult}
        _check(all(w % 32 == 0 for w in widths),
               f"network widths {sorted(widths)} must be multiples of 32 (GroupNorm with 32 groups)")
        _check(all(w % self.num_head_channels == 0 for w in widths),
               f"network.num_head_channels={self.num_head_channels} must divide every width {sorted(widths)}")
        res = {self.resolution // 2**i for i in range(levels)}
        bad = [r for r in self.attention_resolutions if r not in res]
        _check(not bad, f"network.attention_resolutions {bad} are not among the UNet's resolutions {sorted(res)}")
        _check(0.0 <= self.dropout < 1.0, f"network.dropout={self.dropout} must be in [0, 1)")
        _check(self.num_classes >= 0, f"network.num_classes={self.num_classes} must be >= 0")
        _check(0 <= self.grow_stages <= 6, f"network.grow_stages={self.grow_stages} must be in [0, 6]")


@dataclass(frozen=True)
class DiffusionConfig:
    """EDM (variance exploding) diffusion constants and the Stage-1 noise distribution (METHOD §1)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    label_dropout: float = 0.1  # p of replacing the label by the null class (enables CFG)

    def validate(self) -> None:
        _check(0 < self.sigma_min < self.sigma_max, "diffusion: need 0 < sigma_min < sigma_max")
        _check(self.sigma_data > 0 and self.P_std > 0, "diffusion: sigma_data and P_std must be positive")
        _check(RHO_RANGE[0] <= self.rho <= RHO_RANGE[1],
               f"diffusion.rho={self.rho} must be in [{RHO_RANGE[0]:g}, {RHO_RANGE[1]:g}] (EDM: 7)")
        _check(0.0 <= self.label_dropout < 1.0, f"diffusion.label_dropout={self.label_dropout} must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run (shared by every stage)."""

    batch: int = 32  # global batch per optimizer step (all ranks, all accumulation rounds)
    micro_batch: int = 0  # per-rank batch per forward pass; 0 = batch / world_size (no accumulation)
    steps: int = 400  # optimizer steps in total
    lr: float = 2e-3
    lr_warmup: int = 50  # linear warm-up steps
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    lr_decay: str = "none"  # none | linear (to 0 at the last step, after the warm-up)
    ema_rate: float = 0.999  # EMA decay per step (0 = no EMA)
    snapshot_every: int = 100  # steps between training-state + model snapshots
    log_every: int = 10  # steps between JSONL log rows
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast) | float16 (autocast + grad scaler)

    def validate(self) -> None:
        _check(self.batch >= 1 and self.steps >= 1, "train.batch and train.steps must be >= 1")
        _check(self.micro_batch >= 0, "train.micro_batch must be >= 0 (0 = no accumulation)")
        _check(self.micro_batch == 0 or self.batch % self.micro_batch == 0,
               f"train.batch={self.batch} must be a multiple of train.micro_batch={self.micro_batch}")
        _check(self.lr > 0 and self.lr_warmup >= 0, "train.lr must be > 0 and train.lr_warmup >= 0")
        _check(0.0 <= self.ema_rate < 1.0, f"train.ema_rate={self.ema_rate} must be in [0, 1)")
        _check(self.snapshot_every >= 1 and self.log_every >= 1,
               "train.snapshot_every and train.log_every must be >= 1")
        _check(self.dtype in ("float32", "bfloat16", "float16"),
               f"train.dtype={self.dtype!r} must be float32, bfloat16 or float16")
        _check(self.lr_decay in ("none", "linear"), f"train.lr_decay={self.lr_decay!r} must be none or linear")


SAMPLER_NAMES = ("heun", "euler", "ddim", "dpmpp2m")  # pagoda.samplers.SAMPLERS (tested equal)
SCHEDULES = ("karras", "loguniform")  # pagoda.diffusion.sigma_grid
RHO_RANGE = (1.0, 100.0)  # below 1 the Karras grid's float arithmetic no longer reaches sigma_min


def split_sampler_spec(spec: str) -> tuple[str, str, float | None]:
    """'heun' | 'dpmpp2m:loguniform' | 'euler:karras-rho3' -> (sampler, schedule, rho or None = the model's).

    The part after ':' names the sigma grid: karras (rho = the model's, 7 for EDM), karras-rhoR with R in
    RHO_RANGE = [1, 100], or loguniform (uniform in ln sigma). UserError for anything else.
    """
    name, _, grid = str(spec).partition(":")
    if name not in SAMPLER_NAMES:
        raise UserError(f"sampler {name!r} is unknown: use one of {', '.join(sorted(SAMPLER_NAMES))}")
    if spec.endswith(":"):
        raise UserError(f"sampler {spec!r} ends with ':': name a grid after it (loguniform, karras-rhoR) or drop the ':'")
    grid, rho = grid or "karras", None
    if grid.startswith("karras-rho"):
        try:
            rho = float(grid[len("karras-rho"):])
        except ValueError:
            rho = math.nan
        if not RHO_RANGE[0] <= rho <= RHO_RANGE[1]:
            raise UserError(f"sampler {spec!r}: karras-rhoR needs a number R in [{RHO_RANGE[0]:g}, "
                            f"{RHO_RANGE[1]:g}] (e.g. {name}:karras-rho3)")
        grid = "karras"
    if grid not in SCHEDULES:
        raise UserError(f"sampler {spec!r}: grid {grid!r} is unknown; use {name}, {name}:loguniform or "
                        f"{name}:karras-rhoR (e.g. {name}:karras-rho3)")
    return name, grid, rho


SAMPLER_HELP = ("ODE sampler of a diffusion checkpoint, name[:grid]: heun, euler (= ddim), dpmpp2m "
                "(DPM-Solver++(2M)); grid karras (default: the checkpoint's rho, 7 for EDM), karras-rhoR (R in "
                "[1, 100]) or loguniform, e.g. dpmpp2m:loguniform")


def sampler_spec(text: str) -> str:
    """argparse type: an ODE sampler spec name[:grid] (split_sampler_spec), e.g. dpmpp2m:loguniform."""
    try:
        split_sampler_spec(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


@dataclass(frozen=True)
class SampleConfig:
    """How a diffusion model is sampled when it is evaluated or demoed."""

    sampler: str = "heun"  # heun | euler (= DDIM, eta 0) | dpmpp2m, optionally :grid (split_sampler_spec)
    steps: int = 18  # grid points with nonzero sigma; Heun costs 2*steps - 1 NFE
    guidance: float = 1.0  # CFG scale w (1 = no guidance)

    def validate(self) -> None:
        split_sampler_spec(self.sampler)
        _check(self.steps >= 1, f"sample.steps={self.steps} must be >= 1")
        _check(self.guidance >= 0, f"sample.guidance={self.guidance} must be >= 0")


@dataclass(frozen=True)
class TeacherConfig:
    """Stage 1: EDM diffusion teacher at the base resolution."""

    data: DataConfig = field(default_factory=DataConfig)
    network: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()
        _check(self.network.resolution == self.data.resolution,
               f"network.resolution={self.network.resolution} differs from data.resolution="
               f"{self.data.resolution}: the teacher works at the base resolution")


ADV_REAL = ("data", "teacher")  # LossConfig.adv_real: what the discriminator sees as real


@dataclass(frozen=True)
class LossConfig:
    """Stage 2b objective (METHOD §2): L = L_rec (or L_dstl) + w_adv * lambda * L_adv."""

    kind: str = "rec"  # rec: d(G(z_x), x) on inversion pairs; dstl: d(G(z), ODE_teacher(z)) (paper Fig. 5)
    w_adv: float = 0.2  # weight of the adversarial loss (0 = reconstruction only)
    adaptive: bool = True  # lambda = clip(|grad_W L_rec| / (|grad_W L_adv| + 1e-4), 0.01, 10); else 1
    backbone: str = "random"  # feature backbone of the distance d (pagoda.networks.features)
    augment: bool = True  # DiffAugment (colour, translation, cutout), one draw shared by both images
    dstl_steps: int = 18  # Heun steps of the teacher ODE that makes L_dstl's targets
    # CFG distillation (DESIGN, METHOD §2 "Guidance"): on guided pairs, + w_cfg * d(G(z, y, w), ODE_w(z, y)) from
    # fresh noise z, with the item's y and w and the w-guided teacher solved by cfg_sampler in cfg_steps steps.
    w_cfg: float = 1.0  # its weight (0 = off; unguided pairs never use it)
    cfg_sampler: str = "dpmpp2m"  # the teacher's solver for its targets (pagoda.samplers)
    cfg_steps: int = 8  # and its steps (NFE per target = 2 x its NFE under guidance)
    # D's real images (DESIGN, README "Guidance"): data = the items' photos at every w; teacher = the teacher's
    # samples from fresh noise at the items' labels and w (cfg_sampler, cfg_steps), so that on guided pairs L_adv
    # and the CFG term share their minimiser (the w-guided teacher's distribution) instead of L_adv pulling G
    # toward w = 1. Costs one more teacher solve per D step.
    adv_real: str = "data"

    def validate(self) -> None:
        _check(self.kind in ("rec", "dstl"), f"loss.kind={self.kind!r} must be rec or dstl")
        _check(self.adv_real in ADV_REAL, f"loss.adv_real={self.adv_real!r} must be one of {', '.join(ADV_REAL)}")
        _check(self.w_adv >= 0, f"loss.w_adv={self.w_adv} must be >= 0")
        _check(self.dstl_steps >= 1, f"loss.dstl_steps={self.dstl_steps} must be >= 1")
        _check(self.w_cfg >= 0, f"loss.w_cfg={self.w_cfg} must be >= 0")
        _check(self.cfg_sampler in SAMPLER_NAMES,
               f"loss.cfg_sampler={self.cfg_sampler!r} must be one of {', '.join(sorted(SAMPLER_NAMES))}")
        _check(self.cfg_steps >= 1, f"loss.cfg_steps={self.cfg_steps} must be >= 1")


@dataclass(frozen=True)
class DiscConfig:
    """The projected discriminator of Stage 2b and its optimiser (RAdam, METHOD §2)."""

    backbone: str = "random"  # frozen feature backbone (pagoda.networks.features)
    lr: float = 2e-3
    cond_dim: int = 64  # projection conditioning width

    def validate(self) -> None:
        _check(self.lr > 0 and self.cond_dim >= 1, "disc.lr must be > 0 and disc.cond_dim >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """Stage 2b: the one-step generator G, a copy of the teacher network queried at sigma_max."""

    teacher: str = ""  # the Stage-1 teacher checkpoint (G starts as an exact copy of its network)
    pairs: str = ""  # the Stage-2a inversion pairs of the teacher (python -m pagoda pairs)
    # A base-resolution one-step G of the same teacher to start from instead of the teacher's network (DESIGN:
    # the guided G fine-tunes the plain G, so its steps go to what w does rather than to the one-step map).
    init: str = ""
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    # On guided pairs G's w-embedding starts at zero, so it learns from scratch at this multiple of train.lr
    # (the rest of G is fine-tuned from the teacher; DESIGN: at 1x it barely moves in a short run).
    guidance_lr_mult: float = 200.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch=32, steps=600, lr=1e-4, lr_warmup=0,
                                                                 adam_betas=(0.9, 0.999), ema_rate=0.999,
                                                                 snapshot_every=100, log_every=10))

    def validate(self) -> None:
        _check(self.guidance_lr_mult > 0, f"guidance_lr_mult={self.guidance_lr_mult} must be > 0")
        for f in fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "validate"):
                sub.validate()


def default_freeze(net: UNetConfig) -> tuple[str, ...]:
    """Stage 3's frozen modules (METHOD §2) for a UNet layout: the time / label / guidance embeddings, the input
    conv and encoder (`input_blocks`), the middle block and the early decoder, i.e. every output block before the
    second block of the level at half the base resolution (ImageNet-64: `output_blocks.0` .. `.8`; trainable:
    the last 3 blocks of the 32 px level onward and everything grown). Names that a network lacks (the label
    embedding of an unconditional G, the guidance embedding of an unguided one) are skipped."""
    first_trainable = (len(net.channel_mult) - 2) * (net.num_res_blocks + 1) + 1 if len(net.channel_mult) > 1 else 0
    return ("time_embed", "label_emb", "guidance_emb", "input_blocks", "middle_block",
            *(f"output_blocks.{i}" for i in range(first_trainable)))


@dataclass(frozen=True)
class GrowLossConfig:
    """Stage 3's per-stage objective (METHOD §2); stage k grows base * 2^(k-1) -> base * 2^k."""

    w_adv: float = 1.0  # weight of the adversarial loss (METHOD: 1.0 from 128 on)
    w_rec: float = 1.0  # weight of L_rec; 0 = the adversarial loss alone (the paper's Fig. 3 ablation: drift)
    adaptive: bool = True  # the adaptive lambda in the joint update (stages before split_from)
    split_from: int = 2  # from this stage (256 for ImageNet) two G updates per step: L_rec, then w_adv * L_adv (lambda 1)
    rec_disc_from: int = 3  # from this stage (512) a second discriminator judges reconstructions G(z_x) against x
    rec_disc_weight: float = 0.5  # its weight (x an adaptive lambda_rec against L_rec) in the reconstruction update
    backbone: str = "random"  # feature backbone of the distance d (pagoda.networks.features)
    augment: bool = True  # DiffAugment, one draw shared by both images

    def validate(self) -> None:
        _check(self.w_adv >= 0 and self.rec_disc_weight >= 0 and self.w_rec >= 0,
               "grow loss.w_adv, loss.w_rec and loss.rec_disc_weight must be >= 0")
        _check(self.w_adv > 0 or self.w_rec > 0, "grow loss.w_adv and loss.w_rec are both 0: nothing to train on")
        _check(self.split_from >= 1 and self.rec_disc_from >= 1, "loss.split_from and loss.rec_disc_from must be >= 1")


GROW_STARTS = ("kept-head", "skip")


@dataclass(frozen=True)
class GrowConfig:
    """Stage 3: grow a one-step G 2x (METHOD §2): an up-ResBlock and two ResBlocks before the kept head, the trunk
    frozen, trained on the SAME base-resolution latents with the crops of the same images at the new resolution."""

    source: str = ""  # the G to grow (--from): Stage 2b's G or a grown one
    pairs: str = ""  # the Stage-2a pairs the source was trained on (same teacher, base resolution)
    resolution: int = 0  # the output resolution; 0 = twice the source's (anything else is refused)
    # The grown blocks' embedding: scale-shift of the norm (True) or a bias (False: the official growth scripts pass
    # --use_scale_shift_norm_high=False). A source grown before keeps its setting: another one is refused.
    scale_shift_norm: bool = False
    # How a grown G starts (README "Design"): "kept-head" (the paper's: the source's head reads the new blocks, so
    # G_2x(z) is only near up(G(z))) or "skip" (ProGAN's skip: up(G's image) + a new zero-initialised head, exact).
    start: str = "kept-head"
    freeze: tuple[str, ...] = default_freeze(UNetConfig())  # modules of the UNet frozen (no optimiser / EMA state)
    loss: GrowLossConfig = field(default_factory=GrowLossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch=32, steps=300, lr=1e-4, lr_warmup=0,
                                                                 ema_rate=0.999, snapshot_every=100, log_every=10))

    def validate(self) -> None:
        self.loss.validate()
        self.disc.validate()
        self.train.validate()
        _check(self.resolution == 0 or (self.resolution >= 8 and self.resolution & (self.resolution - 1) == 0),
               f"resolution={self.resolution} must be 0 (twice the source's) or a power of two >= 8")
        _check(all(isinstance(n, str) and n for n in self.freeze), "freeze must be a list of module names")
        _check(self.start in GROW_STARTS, f"start={self.start!r} must be one of {', '.join(GROW_STARTS)}")


PD_FORMULATIONS = ("edm", "vp-cosine")
PD_LOSSES = ("truncated-snr", "x", "v", "eps")


@dataclass(frozen=True)
class PDConfig:
    """Progressive distillation (Salimans & Ho 2022; METHOD §3): rounds that halve the student's steps.

    One round per halving, from_steps -> from_steps / 2 -> ... -> to_steps; `train` is one round's run
    (steps = updates per round, the learning rate decays linearly to 0 within each round).
    """

    teacher: str = ""  # the Stage-1 teacher checkpoint (the first round's teacher and student)
    data: str = ""  # training images; "" = the teacher's own training data (its checkpoint's config)
    from_steps: int = 16  # the teacher's steps in the first round (its student takes half)
    to_steps: int = 1  # the last round's student steps
    formulation: str = "edm"  # edm: Karras grid, Euler half-steps (consistency-models' progdist); vp-cosine: original
    loss: str = "truncated-snr"  # squared error of: x, v (= (1 + SNR) x), eps (= SNR x), truncated-snr = max(x, eps)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch=32, steps=250, lr=1e-4, lr_warmup=0,
                                                                 lr_decay="linear", grad_clip=1.0, ema_rate=0.0,
                                                                 snapshot_every=50, log_every=10))

    def validate(self) -> None:
        self.train.validate()
        _check(self.from_steps >= 2 and self.from_steps & (self.from_steps - 1) == 0,
               f"from_steps={self.from_steps} must be a power of two >= 2 (each round halves the steps)")
        _check(1 <= self.to_steps < self.from_steps and self.from_steps % self.to_steps == 0
               and (self.from_steps // self.to_steps) & (self.from_steps // self.to_steps - 1) == 0,
               f"to_steps={self.to_steps} must be from_steps={self.from_steps} divided by a power of two "
               f"(e.g. {self.from_steps // 2}, ..., 1)")
        _check(self.formulation in PD_FORMULATIONS,
               f"formulation={self.formulation!r} must be one of {', '.join(PD_FORMULATIONS)}")
        _check(self.loss in PD_LOSSES, f"loss={self.loss!r} must be one of {', '.join(PD_LOSSES)}")


@dataclass(frozen=True)
class Preset:
    """A named experiment: one config per stage (later stages are added by their issues)."""

    name: str
    description: str
    teacher: TeacherConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    pd: PDConfig = field(default_factory=PDConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)

    def validate(self) -> None:
        self.teacher.validate()
        self.distill.validate()
        self.pd.validate()
        self.grow.validate()


STAGES = ("teacher", "distill", "pd", "grow")


# ---------------------------------------------------------------------------------------------
# Presets.

PAPER_RANKS = 8  # the ImageNet presets' micro-batches are their global batches over 8 GPUs (one node)


def _imagenet64() -> Preset:
    # The paper's teacher = the public EDM ImageNet-64 checkpoint architecture (~296M params);
    # optimiser settings follow the consistency-models EDM run (Adam 1e-4, batch 4096, EMA 0.9999).
    net = UNetConfig(resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                     num_classes=1000)
    train = TrainConfig(batch=4096, micro_batch=32, steps=600_000, lr=1e-4, lr_warmup=1000,
                        ema_rate=0.9999, snapshot_every=5000, log_every=100, dtype="bfloat16")
    data = DataConfig(source="data/imagenet/train", resolution=64, num_workers=8)
    # Stage 2b as the released 64 px model (METHOD §2): batch 96, RAdam lr_G 8e-6 / lr_D 2e-3, EMA 0.999,
    # w_adv 0.2 with the adaptive weight, DeiT + EfficientNet-lite0 features, ~90k G (+ 90k D) updates.
    distill = DistillConfig(loss=LossConfig(w_adv=0.2, backbone="paper"), disc=DiscConfig(backbone="paper", lr=2e-3),
                            train=TrainConfig(batch=96, micro_batch=12, steps=90_000, lr=8e-6, lr_warmup=0,
                                              ema_rate=0.999, snapshot_every=2000, log_every=100, dtype="float16"))
    # Progressive distillation as Salimans & Ho ran ImageNet 64 (METHOD §3): 1024 -> 1 steps, 50k updates per round
    # of batch 2048, Adam lr 1e-4 decaying linearly within each round, gradient clip 1, no EMA.
    pd = PDConfig(from_steps=1024, train=TrainConfig(batch=2048, micro_batch=32, steps=50_000, lr=1e-4, lr_warmup=0,
                                                     lr_decay="linear", grad_clip=1.0, ema_rate=0.0,
                                                     snapshot_every=2000, log_every=100, dtype="bfloat16"))
    return Preset("imagenet64", "ImageNet 64x64 EDM teacher (paper architecture, ~296M parameters)",
                  TeacherConfig(data=data, network=net, train=train, sample=SampleConfig(steps=40)), distill, pd,
                  _in64_grow(128))


def _in64_grow(resolution: int) -> GrowConfig:
    # Stage 3 on ImageNet (METHOD §2): lr and optimiser as Stage 2b, no schedule; batch 256 / 360 / 512 for
    # 128 / 256 / 512; w_adv 1.0; the paper's DeiT + EfficientNet features for d and D.
    net = UNetConfig(resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     attention_resolutions=(32, 16, 8), num_head_channels=64, num_classes=1000)
    # micro_batch = the official per-GPU batch on 8 ranks (global batch / world size, no accumulation; sony/pagoda
    # `commands/res64to*.sh` set microbatch = global batch): the discriminator's BatchNorm and the per-micro-batch
    # lambda see 32 / 45 / 64 images, the same on fewer GPUs (which accumulate).
    batch = {128: 256, 256: 360, 512: 512}[resolution]
    return GrowConfig(resolution=resolution, freeze=default_freeze(net),
                      loss=GrowLossConfig(w_adv=1.0, backbone="paper"), disc=DiscConfig(backbone="paper", lr=2e-3),
                      train=TrainConfig(batch=batch, micro_batch=batch // PAPER_RANKS, steps=50_000, lr=8e-6,
                                        lr_warmup=0, ema_rate=0.999, snapshot_every=2000, log_every=100,
                                        dtype="float16"))


def _in64to(resolution: int) -> Preset:
    base = _imagenet64()
    return replace(base, name=f"in64to{resolution}", grow=_in64_grow(resolution),
                   description=f"imagenet64, Stage 3 grown to {resolution} px (paper batch {_in64_grow(resolution).train.batch})")


# RAdam's beta2 for the CPU presets' G and D (DESIGN, README "Design"): with the paper's 0.999 the rectification keeps
# a run of a few hundred steps inside its warm-up (~56 full steps' worth of lr after 250 steps); 0.95 gets ~226.
# Measured on photos (G, 250 steps, train.seed 0-2, sd over seeds): FD 19.40 +- 0.50 at 0.999, 15.58 +- 0.26 at 0.95.
SHORT_RUN_BETAS = (0.9, 0.95)


# How the CPU presets' grown G starts (DESIGN, README "Design"): exactly at up(G). Measured on photos (16 -> 32 from a
# G of FD 15.28, 300 steps, FD at 32 px, drift / frame RMS in uint8 levels): the paper's kept head starts at FD 24.04,
# drift 38.0, a one-pixel frame of 128 levels, and ends at FD 11.04, drift 19.4, frame 41.0; "skip" starts at up(G)
# (FD 15.40, drift 0) and ends at FD 11.36, drift 14.5, frame 14.3 (no frame: the inner rings are 15-19).
CPU_GROW_START = "skip"


def _short_run(cfg):
    """A Stage 2b / 3 config with RAdam's beta2 for runs of hundreds of steps (SHORT_RUN_BETAS)."""
    return replace(cfg, train=replace(cfg.train, adam_betas=SHORT_RUN_BETAS))


def _photos() -> Preset:
    # Sized for a 2-core CPU: a ~1.3M-parameter UNet at 16 px trains at ~100 img/s.
    # Stage 3: 16 -> 32 -> 64, one `grow` run per 2x with this config (the target is twice the source).
    # The guided G's CFG targets from DPM-Solver++(2M)-4: half the cost of 8 steps per G step (README, Stage 3).
    return Preset("photos", "bundled photographs at 16 px, ~1.3M-parameter UNet, minutes on a CPU; grown to 32, 64",
                  TeacherConfig(), _short_run(DistillConfig(loss=LossConfig(cfg_steps=4))),
                  grow=_short_run(GrowConfig(start=CPU_GROW_START)))


def _smoke() -> Preset:
    # The smallest thing that exercises every code path: seconds on a CPU.
    net = UNetConfig(resolution=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_head_channels=32)
    train = TrainConfig(batch=16, steps=20, lr=2e-3, lr_warmup=5, snapshot_every=10, log_every=5)
    distill = DistillConfig(train=TrainConfig(batch=8, steps=6, lr=1e-4, lr_warmup=0, snapshot_every=3,
                                              log_every=2))
    pd = PDConfig(from_steps=4, train=TrainConfig(batch=8, steps=4, lr=1e-4, lr_warmup=0, lr_decay="linear",
                                                  grad_clip=1.0, ema_rate=0.0, snapshot_every=2, log_every=2))
    grow = GrowConfig(freeze=default_freeze(net), start=CPU_GROW_START,
                      train=TrainConfig(batch=8, steps=4, lr=1e-4, lr_warmup=0, snapshot_every=2, log_every=2))
    return Preset("smoke", "8 px photos, tiny UNet, 20 steps: a pipeline check in seconds (grown 8 -> 16)",
                  TeacherConfig(data=DataConfig(resolution=8), network=net, train=train,
                                sample=SampleConfig(steps=8)), _short_run(distill), pd, _short_run(grow))


PRESETS: dict[str, Preset] = {p.name: p for p in (_imagenet64(), *(_in64to(r) for r in (128, 256, 512)), _photos(),
                                                  _smoke())}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# JSON round trip and dotted overrides.

def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None:
            _check(len(value) == len(args), f"{where} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is bool:
        _check(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        _check(math.isfinite(value), f"{where} must be a finite number, got {value!r}")  # JSON 1e400 / Infinity
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{where} must be a string, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Rebuild a config dataclass from a dict; unknown or mistyped keys are UserErrors."""
    _check(isinstance(data, dict), f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    """A copy of the config `obj` with the dotted `path` set to `value`; UserError for a path that names no field
    (including one that goes below a plain value, e.g. train.steps.x)."""
    name = path[0]
    _check(is_dataclass(obj), f"--set {full}: {name!r} goes below a plain value ({type(obj).__name__}): set the "
                              f"value itself, e.g. --set {full.split('=')[0].rsplit('.', len(path))[0]}=...")
    names = [f.name for f in fields(obj)]
    _check(name in names, f"--set {full}: {name!r} is not a field here; choose one of {names}")
    if len(path) == 1:
        hints = typing.get_type_hints(type(obj))
        return replace(obj, **{name: _coerce(hints[name], value, full)})
    return replace(obj, **{name: _set_path(getattr(obj, name), path[1:], value, full)})


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=100` -> (['train', 'steps'], 100); values are JSON, bare words are strings."""
    _check("=" in text, f"--set {text!r} must look like key.path=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def resolve(stage: str, preset: str, overrides: list[str] = (), config_file: str | None = None) -> Any:
    """The validated config of one stage: a preset (or a JSON file) plus `--set` overrides."""
    _check(stage in STAGES, f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    cfg = getattr(get_preset(preset), stage)
    if config_file is not None:
        cfg = load_json(stage, config_file)
    for text in overrides:
        path, value = parse_override(text)
        cfg = _set_path(cfg, path, value, text)
    cfg.validate()
    return cfg


STAGE_CLASSES: dict[str, type] = {"teacher": TeacherConfig, "distill": DistillConfig, "pd": PDConfig,
                                  "grow": GrowConfig}


def load_json(stage: str, path: str) -> Any:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON ({e}): fix or regenerate it") from None
    return from_dict(STAGE_CLASSES[stage], data, where=path)


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
