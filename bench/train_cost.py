"""`python -m bench.train_cost`: what training the teacher at the base resolution saves (the paper's "64x cheaper
Stage 1"), and what the one-off inversion pairs cost against the teacher run, measured on our network.

    python -m bench.train_cost --preset photos --factors 1,2,4,8 -o results/train_cost.jsonl
    python -m bench.train_cost --preset imagenet64 --factors 1,2,4,8 --num-images 1281167   # FLOPs only

The teacher UNet of the preset is rebuilt at f x its resolution for each --factors f, with its attention at
the same depths (attention_resolutions x f): the network a one-resolution diffusion model would train at the
target size (--attention resolution keeps attention at the base's resolutions instead, so only the
convolutions grow with the pixel count: the paper's "64x" is that pixel count at 8x). One training step is
the teacher stage's own (`TeacherStage.step`: the EDM loss, backward, Adam update) on random uint8 images of
a micro-batch of --batch.

- train_step_gflops: FLOPs per image of forward + backward, counted by FlopCounterMode on fake tensors
  (FakeTensorMode: shapes only, no memory, no time: any size works), with extra.ratio_vs_base.
- train_step_ms: the median of --reps timed steps (after one untimed) on this machine, for the factors whose
  resolution is at most --time-up-to; extra.per_image_ms and ratio_vs_base (per image).
- pairs_cost_ratio: the inversion pairs (2 items per training image, `pagoda.pairs`: NUM_POINTS - 1 Heun
  steps, 2 (NUM_POINTS - 1) NFE per item, twice that for guided pairs) against the teacher run (the preset's
  steps x batch training images). extra.kind "flops" always; "time" (one inversion micro-batch timed against
  the timed training step) when the base resolution is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from tqdm import tqdm

from bench.profile import device_name, flop_counter
from eval.rows import make_row
from eval.run import csv_of
from pagoda.config import get_preset
from pagoda.diffusion import EDMPrecond
from pagoda.errors import ArgumentParser, UserError, positive_int, run_cli
from pagoda.networks.unet import UNet
from pagoda.pairs import NUM_POINTS, invert, nfe_per_item
from pagoda.rows import append_rows, check_rows_output, text_table
from pagoda.samplers import inversion_sigmas
from pagoda.stages.teacher import TeacherStage


def scaled(cfg, factor: int, attention: str = "depth"):
    """The teacher config with its network (and data) at factor x the resolution; attention at the same depths
    (attention="depth": its resolutions x factor) or at the same resolutions ("resolution": the levels above
    the base's get none)."""
    net = cfg.network
    att = net.attention_resolutions
    if attention == "depth":
        att = tuple(r * factor for r in att)
    net = dataclasses.replace(net, resolution=net.resolution * factor, attention_resolutions=att)
    return dataclasses.replace(cfg, network=net, data=dataclasses.replace(cfg.data, resolution=net.resolution))


def fake_batch(cfg, batch: int, device) -> list[torch.Tensor]:
    """Random uint8 images [batch, 3, R, R] and labels [batch] of the config's resolution and classes."""
    g = torch.Generator().manual_seed(0)
    r = cfg.network.resolution
    x = torch.randint(0, 256, (batch, 3, r, r), generator=g, dtype=torch.uint8)
    y = torch.randint(0, max(cfg.network.num_classes, 1), (batch,), generator=g)
    return [x.to(device), y.to(device)]


def train_step(stage: TeacherStage, opt: torch.optim.Optimizer, batch: list[torch.Tensor]) -> None:
    """One optimiser step of the teacher stage on one micro-batch."""
    loss, _ = stage.step(stage.net, batch, None)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_flops(cfg, batch: int = 2) -> float:
    """FLOPs per image of one training step's forward + backward, on fake tensors (no memory, no time)."""
    r = cfg.network.resolution
    with FakeTensorMode():
        stage = TeacherStage(cfg)
        data = [torch.zeros(batch, 3, r, r, dtype=torch.uint8), torch.zeros(batch, dtype=torch.long)]
        with flop_counter() as counter:
            loss, _ = stage.step(stage.net, data, None)
            loss.backward()
    return counter.get_total_flops() / batch


def nfe_flops(cfg) -> float:
    """FLOPs of one denoiser evaluation of one image (forward, no grad), on fake tensors."""
    with FakeTensorMode(), torch.no_grad():
        net = UNet(**dataclasses.asdict(cfg.network))
        r = cfg.network.resolution
        labels = torch.zeros(1, dtype=torch.long) if cfg.network.num_classes else None
        with flop_counter() as counter:
            EDMPrecond(net, sigma_data=cfg.diffusion.sigma_data)(torch.zeros(1, 3, r, r), torch.ones(1), labels)
    return float(counter.get_total_flops())


def time_steps(cfg, batch: int, reps: int) -> float:
    """Median ms of `reps` training steps of `batch` images (after one untimed step)."""
    torch.manual_seed(0)
    stage = TeacherStage(cfg)
    opt = torch.optim.Adam(stage.net.parameters(), lr=cfg.train.lr)
    data = fake_batch(cfg, batch, "cpu")
    train_step(stage, opt, data)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        train_step(stage, opt, data)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_inversion(cfg, batch: int, guided: bool) -> float:
    """Seconds of inverting one micro-batch of `batch` items as pagoda.pairs does (NUM_POINTS grid, Heun)."""
    torch.manual_seed(0)
    net = UNet(**dataclasses.asdict(cfg.network)).eval().requires_grad_(False)
    d = cfg.diffusion
    sigmas = inversion_sigmas(NUM_POINTS, sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho)
    x, y = fake_batch(cfg, batch, "cpu")
    labels = y if cfg.network.num_classes else None
    w = torch.full((batch,), 2.0) if guided and labels is not None else None
    denoiser = EDMPrecond(net, sigma_data=d.sigma_data)
    invert(denoiser, x[:1], None if labels is None else labels[:1], sigmas, guidance=None if w is None else w[:1])
    t0 = time.perf_counter()  # after a warm-up inversion of one item, as the training step is timed warm
    invert(denoiser, x, labels, sigmas, guidance=w)
    return time.perf_counter() - t0


def num_images(preset, given: int | None) -> int:
    """Training images of the preset's data set (--num-images, else the data set built here)."""
    if given:
        return given
    from pagoda.data import build_dataset

    source = preset.teacher.data.source
    try:
        return len(build_dataset(source, preset.teacher.data.resolution))
    except UserError:
        raise UserError(f"the data set of preset {preset.name} ({source}) is not here, so its size is unknown: "
                        "pass --num-images N (ImageNet-1k train: 1281167)") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.train_cost` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m bench.train_cost", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="photos", help="preset whose teacher is measured (default photos)")
    p.add_argument("--factors", type=csv_of(positive_int), default=[1, 2, 4, 8],
                   help="resolution multiples of the base to measure (default 1,2,4,8)")
    p.add_argument("--time-up-to", type=positive_int, default=64,
                   help="time training steps only at resolutions up to this (default 64; FLOPs at every factor)")
    p.add_argument("--batch", type=positive_int, default=8, help="images per timed step (default 8)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed steps per factor (default 5)")
    p.add_argument("--num-images", type=positive_int, default=None, help="training images (default: the data set's)")
    p.add_argument("--guided", action="store_true", help="cost of guided pairs (two rows per NFE)")
    p.add_argument("--attention", choices=("depth", "resolution"), default="depth",
                   help="attention of the scaled UNet at the same depths (default; its token count grows with the "
                        "resolution) or at the same resolutions as the base's")
    p.add_argument("-o", "--out", default="results/train_cost.jsonl", help="JSONL file the rows are appended to")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.factors = sorted(set(args.factors))
    if 1 not in args.factors:
        p.error(f"--factors {args.factors}: include 1 (the base resolution every ratio is taken against)")
    check_rows_output(args.out)
    preset = get_preset(args.preset)
    cfg, train = preset.teacher, preset.teacher.train
    items = 2 * num_images(preset, args.num_images)
    base = cfg.network.resolution
    torch.set_grad_enabled(True)
    fields = dict(model=f"{preset.name} teacher UNet", method="teacher-train", batch=args.batch, dtype="float32",
                  device="cpu", num_samples=None)
    extra = dict(device_name=device_name(torch.device("cpu")), compile=False, preset=preset.name,
                 attention=args.attention)

    flops = {f: step_flops(scaled(cfg, f, args.attention))
             for f in tqdm(args.factors, desc="flops", file=sys.stderr)}
    timed = [f for f in args.factors if base * f <= args.time_up_to]
    ms = {f: time_steps(scaled(cfg, f, args.attention), args.batch, args.reps)
          for f in tqdm(timed, desc="timed", file=sys.stderr)}
    rows = []
    for f in args.factors:
        row = dict(fields, resolution=base * f)
        rows.append(make_row(metric="train_step_gflops", value=flops[f] / 1e9, **row,
                             extra=dict(extra, factor=f, ratio_vs_base=flops[f] / flops[1])))
        if f in ms:
            rows.append(make_row(metric="train_step_ms", value=ms[f], **row,
                                 extra=dict(extra, factor=f, per_image_ms=ms[f] / args.batch, reps=args.reps,
                                            ratio_vs_base=ms[f] / ms[1] if 1 in ms else None)))
    nfe = nfe_per_item(args.guided)
    run_images = train.steps * train.batch
    pairs = dict(extra, items=items, nfe_per_item=nfe, teacher_steps=train.steps, teacher_batch=train.batch,
                 guided=args.guided)
    row = dict(fields, resolution=base, nfe=nfe)
    rows.append(make_row(metric="pairs_cost_ratio", value=items * nfe * nfe_flops(cfg) / (run_images * flops[1]),
                         **row, extra=dict(pairs, kind="flops")))
    if 1 in ms:
        per_item = time_inversion(cfg, args.batch, args.guided) / args.batch
        step_per_image_ms = ms[1] / args.batch
        rows.append(make_row(metric="pairs_cost_ratio", value=items * per_item * 1e3 / (run_images * step_per_image_ms),
                             **row, extra=dict(pairs, kind="time", per_item_ms=per_item * 1e3)))
    append_rows(args.out, rows)
    table = [dict(metric=r["metric"], resolution=r["resolution"], factor=r["extra"].get("factor"),
                  kind=r["extra"].get("kind"), value=r["value"], ratio_vs_base=r["extra"].get("ratio_vs_base"))
             for r in rows]
    print(text_table(table, ("metric", "resolution", "factor", "kind", "value", "ratio_vs_base")))
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
