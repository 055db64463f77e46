"""The one training loop: DDP, gradient accumulation, Adam with warm-up, EMA, snapshots, resume.

Every stage plugs in through a small object (see `Stage`); what a stage computes lives in its
`step()`, never in this file. Determinism is by construction: the data indices of step k and the
noise of its micro-batch m are functions of (seed, k, m) only, never of iterator or RNG state, so
a run killed and started again with the same command ends in the same weights, bit for bit.

Global batch = micro_batch * accumulation rounds * world size. Micro-batch m = round * world + rank
holds positions [m * micro_batch, (m + 1) * micro_batch) of the global batch. Each micro-batch loss
is a mean; dividing it by the number of rounds and letting DDP average over ranks gives the
gradient of the mean over the global batch, the same update one process would make.

Run directory: config.json, log.jsonl, state.pt, <stage>.safetensors, snapshots/<stage>-<step>.safetensors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pagoda import checkpoint, dist
from pagoda.config import TrainConfig
from pagoda.errors import UserError


class Stage(Protocol):
    """What the loop needs from a stage (teacher, distill, grow).

    A stage may also own a discriminator: an attribute `disc` (nn.Module, or None), a method
    `d_step(disc, net, batch, generator) -> (loss, stats)` called once per optimizer step after the
    network's update, on a batch from a second, independently shuffled stream over the same data set,
    and `optimizer(params, which) -> torch.optim.Optimizer` (which = "net" or "disc"; default Adam
    with cfg.lr for the net). The loop averages the discriminator's gradients over ranks itself (no
    DDP wrapper: a discriminator sees real and fake batches in two forwards). An optional
    `after_step(step)` runs on every rank once both updates of a step are done. A stage may also set
    `phases` (e.g. ("rec", "adv")): then the network gets one optimizer update per phase on the same
    micro-batches, `step(net, batch, generator, phase)` giving each phase's loss, and one EMA update after them.
    """

    name: str  # the deliverable is <out_dir>/<name>.safetensors
    kind: str  # checkpoint kind written into its metadata
    net: nn.Module  # the trained network; its EMA is the deliverable

    def step(self, net: nn.Module, batch: list[torch.Tensor], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss (a scalar mean over the micro-batch) and extra statistics to log. `net` is `self.net`,
        wrapped in DDP when distributed: call it, not `self.net`, so that gradients are synchronised."""
        ...


# ---------------------------------------------------------------------------------------------
# Deterministic data order and randomness.

def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy SeedSequence), e.g. (seed, purpose, step, m)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of a data set of n items in one epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, 0, epoch)))


def step_indices(n: int, *, seed: int, step: int, batch: int) -> torch.Tensor:
    """Data indices [batch] of the global batch of `step`: positions step*batch.. of the epoch stream."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epoch, offset = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.int64)
    for e in epoch.unique().tolist():
        sel = epoch == e
        out[sel] = _epoch_permutation(n, seed, e)[offset[sel]]
    return out


class StepSampler:
    """Batch sampler for a DataLoader: this rank's micro-batches of steps start..steps-1, in order."""

    def __init__(self, n: int, *, seed: int, batch: int, micro: int, start: int, steps: int, rank: int,
                 world: int):
        self.n, self.seed, self.batch, self.micro = n, seed, batch, micro
        self.start, self.steps, self.rank, self.world = start, steps, rank, world
        self.accum = batch // (micro * world)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for k in range(self.start, self.steps):
            idx = step_indices(self.n, seed=self.seed, step=k, batch=self.batch)
            for a in range(self.accum):
                m = a * self.world + self.rank
                yield idx[m * self.micro:(m + 1) * self.micro].tolist()


def micro_batching(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro_batch per rank, accumulation rounds) with micro * rounds * world == cfg.batch."""
    micro = cfg.micro_batch or cfg.batch // world
    if micro < 1 or cfg.batch % (micro * world):
        raise UserError(f"train.batch={cfg.batch} is not a multiple of train.micro_batch={micro} x {world} "
                        f"processes: choose batch, micro_batch and the process count so that it is")
    return micro, cfg.batch // (micro * world)


# ---------------------------------------------------------------------------------------------
# Schedules and EMA.

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


# ---------------------------------------------------------------------------------------------
# Run directory.

def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (checkpoint.write_atomic: temp file, fsync, os.replace)."""
    checkpoint.write_atomic(path, lambda tmp: tmp.write_text(text))


def first_difference(old, new, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first difference between two JSON trees, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            sub = first_difference(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
            if sub is not None:
                return sub
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _drop(tree, dotted: str):
    """A copy of a JSON tree without the (dotted) key, where present."""
    head, _, rest = dotted.partition(".")
    if not isinstance(tree, dict) or head not in tree:
        return tree
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _drop(tree[head], rest)}


def refuse_foreign_files(out_dir: Path, ours=lambda entry: False, what: str = "a pagoda run") -> None:
    """UserError when out_dir holds an entry that `ours` does not accept (by default: any entry), so that a run
    never writes into a folder of someone else's files; names up to three of them."""
    stray = sorted(p for p in out_dir.iterdir() if not ours(p))[:3] if out_dir.is_dir() else []
    if stray:
        raise UserError(f"run directory {out_dir} already holds files that are not {what} ("
                        f"{', '.join(p.name for p in stray)}{', ...' if len(stray) == 3 else ''}): pass --out to a "
                        "new or empty directory")


def check_run_config(out_dir: Path, config_dict: dict, *, ignore: tuple[str, ...] = ()) -> None:
    """UserError unless out_dir is (or can become) a run directory whose config.json, if any, equals config_dict
    (the dotted keys in `ignore` left out on both sides)."""
    path = out_dir / "config.json"
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"run directory {out_dir}: {folder} is a file, not a directory; pass --out to a "
                            "directory (it is created)")
    if not path.exists():
        refuse_foreign_files(out_dir)  # config.json is a run's first file: other files and none are not ours
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: delete the run directory {out_dir} or pass --out elsewhere") \
            from None
    new = json.loads(json.dumps(config_dict))  # tuples -> lists, as stored
    for key in ignore:
        old, new = _drop(old, key), _drop(new, key)
    # the settings first; then `inputs` (the SHA-256 of input files, so a file replaced at the same path differs)
    diff = first_difference(_drop(old, "inputs"), _drop(new, "inputs"))
    inputs = first_difference(old.get("inputs", "<missing>") if isinstance(old, dict) else "<missing>",
                              new.get("inputs", "<missing>"), "inputs.")
    if diff is None and inputs is not None:
        raise UserError(f"run directory {out_dir} holds a run made from other inputs ({inputs[0]}: "
                        f"{str(inputs[1])[:16]} there, {str(inputs[2])[:16]} now; an input file was replaced at the "
                        f"same path, or the run predates input hashes): pass --out to another directory or delete "
                        f"{out_dir} to start over")
    if diff is not None:
        raise UserError(f"run directory {out_dir} holds a run with a different config (first difference: "
                        f"{diff[0]} = {diff[1]!r} there, {diff[2]!r} now): pass --out to another directory "
                        f"or delete {out_dir} to start over")


def prepare_run_dir(out_dir: Path, config_dict: dict) -> None:
    """Create the run directory with config.json, or check that the one there matches (resume)."""
    path = out_dir / "config.json"
    config_dict = json.loads(json.dumps(config_dict))  # tuples -> lists, as stored
    check_run_config(out_dir, config_dict)
    dist.barrier()  # every rank has read before rank 0 writes
    if dist.is_main() and not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    dist.barrier()


def truncate_log(path: Path, step: int) -> None:
    """Drop rows of log.jsonl past `step` (written after the snapshot a resumed run starts from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))


def _cpu(tree):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def check_finite(out_dir: Path, step: int, values: dict[str, float]) -> None:
    """UserError when a logged loss is NaN or infinite: training stops before it logs or snapshots the diverged
    model, so the last snapshot (and a resume from it) stays usable."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise UserError(f"{out_dir}: training diverged at step {step} ({k} = {v}): nothing of it was saved (the last "
                        "snapshot there is kept): train again into another --out with a lower learning rate "
                        "(--set train.lr=...), or check the data for NaN / infinite values")


def save_snapshot(out_dir: Path, stage: Stage, *, weights: dict[str, torch.Tensor], state: dict, meta: dict) -> None:
    """snapshots/<name>-<step>.safetensors, <name>.safetensors (the EMA weights), then state.pt last."""
    (out_dir / "snapshots").mkdir(exist_ok=True)
    checkpoint.save_model(out_dir / "snapshots" / f"{stage.name}-{state['step']:07d}.safetensors", weights, meta)
    checkpoint.save_model(out_dir / f"{stage.name}.safetensors", weights, meta)
    checkpoint.save_training_state(out_dir / "state.pt", state)


def make_optimizer(stage, params: list, cfg: TrainConfig, which: str) -> torch.optim.Optimizer:
    """The stage's optimizer for `which` ("net" / "disc") if it defines one, else Adam with cfg's settings."""
    if hasattr(stage, "optimizer"):
        return stage.optimizer(params, which)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of each parameter's gradient over ranks (one flat all-reduce; a no-op in one process)."""
    if dist.world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).clone()


def _accumulate_stats(sums: dict, stats: dict, accum: int, device, prefix: str = "") -> None:
    for k, v in stats.items():
        sums[prefix + k] = sums.get(prefix + k, 0.0) + torch.as_tensor(v, device=device).detach().float() / accum


# ---------------------------------------------------------------------------------------------
# The loop.

def train(*, stage: Stage, cfg: TrainConfig, out_dir: str | os.PathLike, config_dict: dict,
          dataset: torch.utils.data.Dataset, num_workers: int = 0, device: torch.device | None = None,
          meta_extra: dict | None = None) -> Path:
    """Train `stage.net` on `dataset` for cfg.steps optimizer steps (resuming if possible); returns
    the path of the EMA model <out_dir>/<stage.name>.safetensors."""
    out_dir, device = Path(out_dir), device or dist.device()
    world, rank = dist.world_size(), dist.rank()
    micro, accum = micro_batching(cfg, world)
    model_path, state_path, log_path = out_dir / f"{stage.name}.safetensors", out_dir / "state.pt", out_dir / "log.jsonl"
    prepare_run_dir(out_dir, config_dict)

    # Network, EMA, optimizer, loss scaler (float16 only), autocast; the stage's discriminator if it has one.
    net = stage.net.to(device).train()
    ema = ema_init(net)  # trainable parameters only (Stage 3 freezes part of the net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(stage, params, cfg, "net")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    disc = getattr(stage, "disc", None)
    if disc is not None:
        disc = disc.to(device).train()
        params_d = [p for p in disc.parameters() if p.requires_grad]
        opt_d = make_optimizer(stage, params_d, cfg, "disc")
    autocast = dict(device_type=device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")

    # The trainable weights at step 0, so that every log row and model file says how far the run took them.
    init, peak_lr = ema_init(net), peak_learning_rates(net, opt, cfg.lr)

    # Resume from state.pt when there is one.
    step = 0
    if state_path.exists():
        state = checkpoint.load_training_state(state_path)
        net.load_state_dict(state["net"])
        load_ema(ema, state["ema"], state_path)
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["optimizer_disc"])
        step = int(state["step"])
        init = state.get("init")  # None in states written before it was kept: no displacement then
    if step >= cfg.steps:
        dist.print0(f"{out_dir}: finished ({step} of {cfg.steps} steps), nothing to do; model: {model_path}")
        return model_path
    if dist.is_main():
        truncate_log(log_path, step)
        dist.print0(f"{out_dir}: {'resuming at step ' + str(step) if step else 'starting'}; {cfg.steps} steps of "
                    f"{cfg.batch} images ({micro} per pass x {accum} rounds x {world} processes)")
    ddp = net
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    phases = tuple(getattr(stage, "phases", None) or (None,))
    sampler = StepSampler(len(dataset), seed=cfg.seed, batch=cfg.batch, micro=micro, start=step, steps=cfg.steps,
                          rank=rank, world=world)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                               pin_memory=device.type == "cuda"))
    if disc is not None:  # the discriminator's real images: a second, independently shuffled stream
        sampler_d = StepSampler(len(dataset), seed=derive_seed(cfg.seed, 3), batch=cfg.batch, micro=micro,
                                start=step, steps=cfg.steps, rank=rank, world=world)
        batches_d = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler_d, num_workers=num_workers,
                                                     pin_memory=device.type == "cuda"))
    bar = tqdm(total=cfg.steps, initial=step, unit="step", mininterval=2.0, disable=None if dist.is_main() else True)
    loss_sum, stat_sums, window_steps, window_t0 = torch.zeros((), device=device), {}, 0, time.perf_counter()
    while step < cfg.steps:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:  # a group may train at a multiple of the schedule (its "lr_mult")
            group["lr"] = lr * group.get("lr_mult", 1.0)

        # Accumulate gradients over this rank's micro-batches; DDP syncs on the last round only. A stage with
        # `phases` (e.g. Stage 3's ("rec", "adv")) makes one optimizer update per phase on the same micro-batches.
        micro_batches = [[t.to(device, non_blocking=True) for t in next(batches)] for _ in range(accum)]
        for p, phase in enumerate(phases):
            opt.zero_grad(set_to_none=True)
            for a, batch in enumerate(micro_batches):
                m = a * world + rank
                keys = (cfg.seed, 1, step, m) if p == 0 else (cfg.seed, 1, step, m, p)
                generator = torch.Generator(device).manual_seed(derive_seed(*keys))
                torch.manual_seed(derive_seed(cfg.seed, 2, step, m, *keys[4:]))  # the global RNG (dropout)
                sync = contextlib.nullcontext() if world == 1 or a == accum - 1 else ddp.no_sync()
                with sync:
                    with torch.autocast(**autocast):
                        loss, stats = stage.step(ddp, batch, generator) if phase is None else \
                            stage.step(ddp, batch, generator, phase)
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float() / accum
                _accumulate_stats(stat_sums, stats, accum, device)

            # Optimizer step (gradients unscaled first when clipping).
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        update_ema(ema, net, ema_beta(cfg.ema_rate, step))

        # The discriminator's update (stages that have one): its own micro-batches, gradients averaged here.
        if disc is not None:
            opt_d.zero_grad(set_to_none=True)
            for a in range(accum):
                m = a * world + rank
                batch_d = [t.to(device, non_blocking=True) for t in next(batches_d)]
                generator = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 4, step, m))
                loss_d, stats_d = stage.d_step(disc, net, batch_d, generator)
                (loss_d / accum).backward()
                _accumulate_stats(stat_sums, {"loss": loss_d, **stats_d}, accum, device, prefix="d_")
            average_gradients(params_d)
            opt_d.step()
        if hasattr(stage, "after_step"):
            stage.after_step(step)
        step += 1
        window_steps += 1
        bar.update(1)

        # Log row: means over the steps since the last row and over all ranks.
        if step % cfg.log_every == 0:
            names = sorted(stat_sums)
            means = dist.all_reduce_mean(torch.stack([loss_sum, *(stat_sums[k] for k in names)]) / window_steps)
            check_finite(out_dir, step, dict(zip(["loss", *names], means.tolist())))
            elapsed = time.perf_counter() - window_t0
            row = dict(step=step, kimg=step * cfg.batch / 1000, loss=means[0].item(), lr=lr,
                       img_per_s=window_steps * cfg.batch / elapsed, sec_per_step=elapsed / window_steps,
                       time=time.time(), world_size=world, **{k: means[i + 1].item() for i, k in enumerate(names)})
            if init is not None:
                row["disp_lr"] = displacement_lr(dict(net.named_parameters()), init, peak_lr)
            if dist.is_main():
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
            loss_sum, stat_sums, window_steps, window_t0 = torch.zeros((), device=device), {}, 0, time.perf_counter()

        # Snapshot: models first, state.pt last, so a state always has its model files.
        if step % cfg.snapshot_every == 0 or step == cfg.steps:
            check_finite(out_dir, step, {"loss": dist.all_reduce_mean(loss_sum.reshape(1)).item()})
            if dist.is_main():
                state = dict(step=step, net=net.state_dict(), ema=ema, optimizer=opt.state_dict(),
                             scaler=scaler.state_dict(), **({"init": init} if init is not None else {}))
                if disc is not None:
                    state.update(disc=disc.state_dict(), optimizer_disc=opt_d.state_dict())
                state = _cpu(state)
                budget = dict(train_images=step * cfg.batch, **(
                    {"displacement_lr": displacement_lr(ema, init, peak_lr)} if init is not None else {}))
                meta = checkpoint.model_meta(kind=stage.kind, stage=stage.name, config=config_dict, step=step,
                                             ema_rate=cfg.ema_rate, extra={**(meta_extra or {}), **budget})
                save_snapshot(out_dir, stage, weights=ema_weights(ema, net), state=state, meta=meta)
            dist.barrier()
    bar.close()
    dist.print0(f"{out_dir}: done ({cfg.steps} steps); model: {model_path}")
    return model_path
