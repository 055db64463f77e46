"""`python -m bench.compare`: the cost of any mix of generators, per batch size, and optionally their quality.

    python -m bench.compare --ckpt runs/g/G.safetensors --ckpt runs/g32/G.safetensors \\
        --ckpt runs/pd/pd-1/pd-1.safetensors --ckpt runs/t/teacher.safetensors \\
        --sampler euler,heun,dpmpp2m --steps 4,8,16 --batch 1,32 -o results/bench.jsonl \\
        [--quality refs/photos16.npz --quality refs/photos32.npz --metrics fid,pr --extractor domain]

Every checkpoint is swept as `eval.run` sweeps it (a diffusion teacher over --sampler x --steps x --guidance;
a one-step G or a PD student is one setting per guidance scale it accepts) and every setting is profiled at
each --batch by `bench.profile`: counted NFE, latency (median and p90 over --reps calls), images/s, peak
memory, FLOPs per image, parameters. With --quality REF the same settings are also measured by the eval
pipeline (`eval.run`: --metrics against the references, --num-samples each), so one command writes the
quality-cost frontier: the rows share model, method, resolution, guidance, sampler and steps (and dtype:
the quality is measured in the --dtype the cost is). Every setting's quality request (references, sample
counts) is checked before anything is measured; a model that takes no guidance scale is measured at its own
(said on stderr).

--dtype bfloat16 / float16 samples under autocast; --compile wraps the network in torch.compile (the
warm-up calls compile it; rows say compile=true). Figures are only comparable on one machine and thread
count: every row names its device (CPU model and threads, or the GPU).
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
from tqdm import tqdm

from bench.profile import DTYPES, MIN_REPS, network_of, profile, set_network
from eval.measure import DEFAULT_SAMPLES, cells_of
from eval.registry import metric_list
from eval.rows import make_row
from eval.run import add_weights_args, apply_offline, csv_of
from eval.run import run as eval_run
from pagoda.config import SAMPLER_HELP, sampler_spec
from pagoda.errors import (
    ArgumentParser,
    UserError,
    guidance_scale,
    positive_int,
    run_cli,
)
from pagoda.generator import load_generator
from pagoda.rows import append_rows, check_rows_output, format_table

COLUMNS = ("model", "resolution", "guidance", "sampler", "steps", "nfe", "batch", "metric", "value")
QUALITY_OPTIONS = ("metrics", "extractor", "num_samples", "eval_batch", "allow_small")


def pick_device(name: str | None) -> torch.device:
    """--device (cpu, cuda or cuda:i), default cuda when there is one; UserError for anything else."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device {name}: bench measures on cpu or cuda[:i]: pick one of them")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s): use cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return device


def quality_setup(args, device):
    """The eval.api.Evaluator of --quality (references, metrics, extractors), built once; None without --quality."""
    from eval.api import Evaluator

    if not args.quality:
        return None
    return Evaluator(args.quality, args.metrics, extractor=args.extractor, batch=args.eval_batch,
                     allow_small=args.allow_small, weights_dir=args.weights_dir, device=device)


def check_quality(quality, gen, cell, num_samples: int) -> None:
    """eval.run's refusals for one setting (extractor, reference, sample count), before anything is measured;
    a missing reference is named as this command's --quality."""
    from eval.sources import GeneratorSource

    try:
        with GeneratorSource(gen, num_samples, guidance=cell.guidance, name=cell.spec) as source:
            quality.check(source, what=cell.spec, option="--num-samples")
    except UserError as e:
        raise UserError(str(e).replace("--ref", "--quality")) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.compare` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m bench.compare", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], required=True, help="checkpoint (repeatable)")
    p.add_argument("--sampler", type=csv_of(sampler_spec), default=None, help="diffusion checkpoints: " + SAMPLER_HELP)
    p.add_argument("--steps", type=csv_of(positive_int), default=None, help="diffusion sampler steps, e.g. 4,8,16")
    p.add_argument("--guidance", type=csv_of(guidance_scale), default=None, help="CFG scales, e.g. 1,2")
    p.add_argument("--batch", type=csv_of(positive_int), default=[1, 32], help="images per call (default 1,32)")
    p.add_argument("--reps", type=int, default=MIN_REPS, help=f"timed calls per batch (>= {MIN_REPS})")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (compiles under --compile)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="sampling dtype (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default cuda when available)")
    p.add_argument("--quality", action="append", default=[], help="reference for quality rows (repeatable)")
    p.add_argument("--metrics", type=metric_list, default=None, help="quality metrics (with --quality; default fid)")
    p.add_argument("--extractor", default=None, help="extractor of the quality metrics (default inception)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help=f"images per quality measurement (default {DEFAULT_SAMPLES})")
    p.add_argument("--eval-batch", type=positive_int, default=None, help="batch of the quality measurement (250)")
    add_weights_args(p)
    p.add_argument("--allow-small", action="store_true", default=None,
                   help="quality with fewer samples than feature dimensions")
    p.add_argument("-o", "--out", default="results/bench.jsonl", help="JSONL file the rows are appended to")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    apply_offline(args)
    if args.reps < MIN_REPS:
        p.error(f"--reps {args.reps}: at least {MIN_REPS} timed calls are needed for a median and p90")
    if args.warmup < 1:
        p.error(f"--warmup {args.warmup}: at least one untimed call is needed (it also compiles under --compile)")
    given = [f"--{o.replace('_', '-')}" for o in QUALITY_OPTIONS if getattr(args, o) is not None]
    if not args.quality and given:
        p.error(f"{', '.join(given)}: option(s) of the quality measurement: add --quality REF (or drop them)")
    args.metrics, args.extractor = args.metrics or ["fid"], args.extractor or "inception"
    args.eval_batch, args.allow_small = args.eval_batch or 250, bool(args.allow_small)
    num_samples = args.num_samples or DEFAULT_SAMPLES
    check_rows_output(args.out)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype float16 on the CPU: autocast supports bfloat16 there; use --dtype bfloat16")
    quality = quality_setup(args, device)

    cells = []  # every checkpoint is read and every setting checked before anything is measured
    for ckpt in dict.fromkeys(args.ckpt):  # a checkpoint named twice is measured once
        gen = load_generator(ckpt, device=device, dtype=dtype)
        mine = cells_of(ckpt, gen, args.guidance or [None], args.sampler or [None], args.steps or [None])
        if args.guidance and any(w not in (None, 1) for w in args.guidance) and mine[0].guidance is None:
            print(f"note: {ckpt} takes no guidance scale (unguided): measured at its own w = {gen.guidance:g}",
                  file=sys.stderr)
        for cell in mine:
            gen.check_guidance(cell.guidance)
            if quality:
                check_quality(quality, gen, cell, num_samples)
            cells.append(cell)
    rows, done = [], 0  # appended per setting: an interrupted sweep keeps the settings it finished
    try:
        for cell in tqdm(cells, desc="settings", unit="setting", file=sys.stderr, dynamic_ncols=True):
            gen = load_generator(cell.spec, sampler=cell.sampler, steps=cell.steps, device=device, dtype=dtype)
            if args.compile:
                set_network(gen, torch.compile(network_of(gen)))
            made = profile(gen, batches=args.batch, guidance=cell.guidance, reps=args.reps, warmup=args.warmup,
                           compiled=args.compile, make_row=make_row, fields={"model": cell.spec})
            if quality:
                made += eval_run(quality, ckpts=[cell.spec], images=[], num_samples=num_samples, seed=0,
                                 labels="seed", guidance=[cell.guidance], samplers=[cell.sampler], steps=[cell.steps],
                                 dtype=dtype)
            append_rows(args.out, made)
            rows, done = rows + made, done + 1
    except KeyboardInterrupt:
        print(f"interrupted: the rows of {done} of {len(cells)} settings are in {args.out} (a partial sweep; "
              "rerunning measures every setting again)", file=sys.stderr)
        raise
    print(format_table(rows, COLUMNS))
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
