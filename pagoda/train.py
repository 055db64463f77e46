"""The one training loop: DDP, gradient accumulation, Adam with warm-up, EMA, snapshots, resume.

Every stage is a `Stage`: what it computes lives in its methods, never in this file, and the loop calls
each method the one way the base class declares (its defaults are the no-ops). Determinism is by
construction: the data indices of step k and the noise of its micro-batch m are functions of (seed, k, m)
only, never of iterator or RNG state, so a run killed and started again with the same command ends in the
same weights, bit for bit.

Global batch = micro_batch * accumulation rounds * world size. Micro-batch m = round * world + rank
holds positions [m * micro_batch, (m + 1) * micro_batch) of the global batch. Each micro-batch loss
is a mean; dividing it by the number of rounds and letting DDP average over ranks gives the
gradient of the mean over the global batch, the same update one process would make.

Run directory (pagoda.rundir): config.json, log.jsonl, state.pt, <stage>.safetensors,
snapshots/<stage>-<step>.safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pagoda import checkpoint, dist
from pagoda.config import TrainConfig
from pagoda.errors import UserError
from pagoda.rundir import prepare_run_dir, truncate_log
from pagoda.schedule import (
    displacement_lr,
    ema_beta,
    ema_init,
    ema_weights,
    learning_rate,
    load_ema,
    peak_learning_rates,
    update_ema,
)


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where a run stands, for a stage that keeps a second model (`Stage.start`): its settings, device, data set,
    process layout (micro-batch per rank, accumulation rounds, world size, rank) and the step it starts at."""

    cfg: TrainConfig
    dataset: torch.utils.data.Dataset
    device: torch.device
    micro: int
    accum: int
    world: int
    rank: int
    start: int
    num_workers: int = 0

    def batches(self, seed: int):
        """This rank's micro-batches of steps start..cfg.steps-1 (StepSampler order under `seed`), as CPU tensors."""
        sampler = StepSampler(len(self.dataset), seed=seed, batch=self.cfg.batch, micro=self.micro, start=self.start,
                              steps=self.cfg.steps, rank=self.rank, world=self.world)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                                pin_memory=self.device.type == "cuda"))

    def micro_index(self, a: int) -> int:
        """The global index m of this rank's accumulation round a."""
        return a * self.world + self.rank


class Stage:
    """What the loop runs (teacher, distill, grow, a progressive-distillation round): a subclass sets `name` (the
    deliverable is <out_dir>/<name>.safetensors), `kind` (checkpoint kind in its metadata) and `net` (the trained
    network; its EMA is the deliverable), and defines `step`. The other methods default to no-ops.

    `phases`: None for one optimizer update per step; a tuple (Stage 3's ("rec", "adv")) for one update per phase
    on the same micro-batches, `step` called with each phase, and one EMA update after them."""

    name: str
    kind: str
    net: nn.Module
    phases: tuple[str, ...] | None = None

    def optimizer(self, params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
        """The network's optimizer: by default Adam with cfg's lr, betas and weight decay."""
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)

    def step(self, net: nn.Module, batch: list[torch.Tensor], generator: torch.Generator, phase: str | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Loss (a scalar mean over the micro-batch) and extra statistics to log. `net` is `self.net`, wrapped in
        DDP when distributed: call it, not `self.net`, so that gradients are synchronised. `phase` is one of
        `phases` (None without them)."""
        raise NotImplementedError(f"{type(self).__name__} defines no step()")

    def start(self, run: RunLayout) -> None:
        """Once, before the first step (and before a resumed state is loaded): set up what else the stage trains."""

    def after_step(self, step: int, net: nn.Module) -> dict[str, torch.Tensor]:
        """On every rank once the network's update(s) and EMA of `step` are done (`net` unwrapped): the stage's own
        updates (a discriminator's). Returns statistics to log, summed over this step's micro-batches / rounds."""
        return {}

    def state_dict(self) -> dict:
        """Entries the stage adds to state.pt (a discriminator and its optimizer); loaded by `load_state_dict`."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the stage's entries from a state.pt (the whole state dict; `state_dict`'s keys)."""


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
# State on disk.

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


def average_gradients(params: list[nn.Parameter]) -> None:
    """Mean of each parameter's gradient over ranks (one flat all-reduce; a no-op in one process)."""
    if dist.world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
    for p, g in zip(params, flat.split([q.numel() for q in params])):
        p.grad = g.view_as(p).clone()


def accumulate_stats(sums: dict, stats: dict, accum: int, device, prefix: str = "") -> None:
    """sums[prefix + k] += stats[k] / accum (float32 tensors on `device`): one micro-batch's share of a step's mean."""
    for k, v in stats.items():
        sums[prefix + k] = sums.get(prefix + k, 0.0) + torch.as_tensor(v, device=device).detach().float() / accum


# ---------------------------------------------------------------------------------------------
# The loop, in named steps over one record of what it trains.

@dataclasses.dataclass
class _Training:
    """The network's side of a run: the net (and its DDP wrapper), EMA, optimizer, loss scaler, the weights at step
    0 with their peak learning rates, and the step reached."""

    stage: Stage
    cfg: TrainConfig
    net: nn.Module
    ddp: nn.Module
    ema: dict
    params: list
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    init: dict | None
    peak_lr: dict
    step: int = 0


def _build(stage: Stage, cfg: TrainConfig, device: torch.device) -> _Training:
    """Network on `device` in train mode, EMA (trainable parameters only: Stage 3 freezes part of the net), the
    stage's optimizer, the float16 loss scaler, and the trainable weights at step 0 (so that every log row and
    model file says how far the run took them)."""
    net = stage.net.to(device).train()
    ema = ema_init(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = stage.optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    return _Training(stage, cfg, net, net, ema, params, opt, scaler, ema_init(net), peak_learning_rates(net, opt, cfg.lr))


def _read_state(t: _Training, state_path: Path) -> dict | None:
    """Load state.pt into the network's side when there is one (the step, net, EMA, optimizer, scaler, start
    weights); the stage's own entries are loaded after `Stage.start`. Returns the state, or None."""
    if not state_path.exists():
        return None
    state = checkpoint.load_training_state(state_path)
    t.net.load_state_dict(state["net"])
    load_ema(t.ema, state["ema"], state_path)
    t.opt.load_state_dict(state["optimizer"])
    t.scaler.load_state_dict(state["scaler"])
    t.step = int(state["step"])
    t.init = state.get("init")  # None in states written before it was kept: no displacement then
    return state


def _update_net(t: _Training, run: RunLayout, micro_batches: list, sums: dict) -> torch.Tensor:
    """The network's update(s) of step t.step: per phase, gradients accumulated over this rank's micro-batches (DDP
    syncs on the last round only), then one optimizer step (gradients unscaled first when clipping). The noise of
    micro-batch m comes from derive_seed(seed, 1, step, m[, phase index]), the global RNG (dropout) from
    derive_seed(seed, 2, step, m[, phase index]). Returns the loss summed over phases, each a mean over rounds."""
    cfg, accum = t.cfg, run.accum
    autocast = dict(device_type=run.device.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    loss_sum = torch.zeros((), device=run.device)
    for p, phase in enumerate(t.stage.phases or (None,)):
        t.opt.zero_grad(set_to_none=True)
        for a, batch in enumerate(micro_batches):
            keys = (cfg.seed, 1, t.step, run.micro_index(a), *((p,) if p else ()))
            generator = torch.Generator(run.device).manual_seed(derive_seed(*keys))
            torch.manual_seed(derive_seed(cfg.seed, 2, *keys[2:]))
            sync = contextlib.nullcontext() if run.world == 1 or a == accum - 1 else t.ddp.no_sync()
            with sync:
                with torch.autocast(**autocast):
                    loss, stats = t.stage.step(t.ddp, batch, generator, phase)
                t.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
            accumulate_stats(sums, stats, accum, run.device)
        if cfg.grad_clip > 0:
            t.scaler.unscale_(t.opt)
            nn.utils.clip_grad_norm_(t.params, cfg.grad_clip)
        t.scaler.step(t.opt)
        t.scaler.update()
    return loss_sum


def _log_row(t: _Training, log_path: Path, out_dir: Path, window: dict, lr: float) -> dict:
    """Append one row to log.jsonl: means over the steps since the last row and over all ranks (loss, the stage's
    statistics, throughput, displacement in lr units); a NaN / infinite mean stops the run first (check_finite)."""
    names = sorted(window["sums"])
    means = dist.all_reduce_mean(torch.stack([window["loss"], *(window["sums"][k] for k in names)]) / window["steps"])
    check_finite(out_dir, t.step, dict(zip(["loss", *names], means.tolist())))
    elapsed = time.perf_counter() - window["t0"]
    row = dict(step=t.step, kimg=t.step * t.cfg.batch / 1000, loss=means[0].item(), lr=lr,
               img_per_s=window["steps"] * t.cfg.batch / elapsed, sec_per_step=elapsed / window["steps"],
               time=time.time(), world_size=dist.world_size(), **{k: means[i + 1].item() for i, k in enumerate(names)})
    if t.init is not None:
        row["disp_lr"] = displacement_lr(dict(t.net.named_parameters()), t.init, t.peak_lr)
    if dist.is_main():
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _snapshot(t: _Training, out_dir: Path, loss_window: torch.Tensor, config_dict: dict, meta_extra: dict) -> None:
    """Models first (the EMA weights, with their budget in the metadata), state.pt last, so a state always has its
    model files; refused (check_finite) when the window's loss is not finite."""
    check_finite(out_dir, t.step, {"loss": dist.all_reduce_mean(loss_window.reshape(1)).item()})
    if dist.is_main():
        state = dict(step=t.step, net=t.net.state_dict(), ema=t.ema, optimizer=t.opt.state_dict(),
                     scaler=t.scaler.state_dict(), **({"init": t.init} if t.init is not None else {}),
                     **t.stage.state_dict())
        budget = dict(train_images=t.step * t.cfg.batch, **(
            {"displacement_lr": displacement_lr(t.ema, t.init, t.peak_lr)} if t.init is not None else {}))
        meta = checkpoint.model_meta(kind=t.stage.kind, stage=t.stage.name, config=config_dict, step=t.step,
                                     ema_rate=t.cfg.ema_rate, extra={**meta_extra, **budget})
        save_snapshot(out_dir, t.stage, weights=ema_weights(t.ema, t.net), state=_cpu(state), meta=meta)
    dist.barrier()


def _new_window(device: torch.device) -> dict:
    """A log window's running sums: loss, the stages' statistics, its step count and start time."""
    return dict(loss=torch.zeros((), device=device), sums={}, steps=0, t0=time.perf_counter())


def train(*, stage: Stage, cfg: TrainConfig, out_dir: str | os.PathLike, config_dict: dict,
          dataset: torch.utils.data.Dataset, num_workers: int = 0, device: torch.device | None = None,
          meta_extra: dict | None = None) -> Path:
    """Train `stage.net` on `dataset` for cfg.steps optimizer steps (resuming if possible); returns
    the path of the EMA model <out_dir>/<stage.name>.safetensors."""
    out_dir, device = Path(out_dir), device or dist.device()
    micro, accum = micro_batching(cfg, dist.world_size())
    model_path, log_path = out_dir / f"{stage.name}.safetensors", out_dir / "log.jsonl"
    prepare_run_dir(out_dir, config_dict)
    t = _build(stage, cfg, device)
    state = _read_state(t, out_dir / "state.pt")
    if t.step >= cfg.steps:
        dist.print0(f"{out_dir}: finished ({t.step} of {cfg.steps} steps), nothing to do; model: {model_path}")
        return model_path
    run = RunLayout(cfg, dataset, device, micro, accum, dist.world_size(), dist.rank(), t.step, num_workers)
    stage.start(run)
    if state is not None:
        stage.load_state_dict(state)
    if dist.is_main():
        truncate_log(log_path, t.step)
        dist.print0(f"{out_dir}: {'resuming at step ' + str(t.step) if t.step else 'starting'}; {cfg.steps} steps "
                    f"of {cfg.batch} images ({micro} per pass x {accum} rounds x {run.world} processes)")
    if run.world > 1:
        t.ddp = nn.parallel.DistributedDataParallel(t.net, device_ids=[device.index] if device.type == "cuda" else None)
    batches = run.batches(cfg.seed)
    bar = tqdm(total=cfg.steps, initial=t.step, unit="step", mininterval=2.0, disable=None if dist.is_main() else True)
    window = _new_window(device)
    while t.step < cfg.steps:
        lr = learning_rate(cfg, t.step)
        for group in t.opt.param_groups:  # a group may train at a multiple of the schedule (its "lr_mult")
            group["lr"] = lr * group.get("lr_mult", 1.0)
        micro_batches = [[x.to(device, non_blocking=True) for x in next(batches)] for _ in range(accum)]
        window["loss"] += _update_net(t, run, micro_batches, window["sums"])
        update_ema(t.ema, t.net, ema_beta(cfg.ema_rate, t.step))
        for k, v in stage.after_step(t.step, t.net).items():
            window["sums"][k] = window["sums"].get(k, 0.0) + v
        t.step += 1
        window["steps"] += 1
        bar.update(1)
        if t.step % cfg.log_every == 0:
            row = _log_row(t, log_path, out_dir, window, lr)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
            window = _new_window(device)
        if t.step % cfg.snapshot_every == 0 or t.step == cfg.steps:
            _snapshot(t, out_dir, window["loss"], config_dict, meta_extra or {})
    bar.close()
    dist.print0(f"{out_dir}: done ({cfg.steps} steps); model: {model_path}")
    return model_path
