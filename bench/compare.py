"""`python -m bench.compare`: the cost of any mix of generators, per batch size, and optionally their quality.

    python -m bench.compare --ckpt runs/photos/g16/pagoda.safetensors --ckpt runs/photos/g32/pagoda.safetensors \\
        --ckpt runs/photos/pd/pd-1.safetensors --ckpt runs/photos/teacher/teacher.safetensors \\
        --sampler euler,heun,dpmpp2m --steps 4,8,16 --batch 1,32 -o results/bench.jsonl \\
        [--quality refs/photos-16.npz --quality refs/photos-32.npz --metrics fid,pr --extractor domain]

Every checkpoint is swept as `eval.run` sweeps it (a diffusion teacher over --sampler x --steps x --guidance;
a one-step G or a PD student is one setting per guidance scale it accepts) and every setting is profiled at
each --batch by `bench.profile`: counted NFE, latency (median and p90 over --reps calls), images/s, peak
memory, FLOPs per image, parameters. With --quality REF the same settings are also measured by the eval
pipeline (`eval.run`: --metrics against the references, --num-samples each), so one command writes the
quality-cost frontier: the rows share model, method, resolution, guidance, sampler and steps.

--dtype bfloat16 / float16 samples under autocast; --compile wraps the network in torch.compile (the
warm-up calls compile it; rows say compile=true). Figures are only comparable on one machine and thread
count: every row names its device (CPU model and threads, or the GPU).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from bench.profile import DTYPES, MIN_REPS, network_of, profile, set_network
from eval.rows import append_rows, check_rows_output, format_table, make_row
from pagoda.errors import (
    SAMPLER_HELP,
    ArgumentParser,
    UserError,
    guidance_scale,
    positive_int,
    run_cli,
    sampler_spec,
)

COLUMNS = ("model", "resolution", "guidance", "sampler", "steps", "nfe", "batch", "metric", "value", "extra")


def csv_of(kind):
    def parse(text: str) -> list:
        return [kind(t) for t in text.split(",") if t.strip()]
    return parse


def pick_device(name: str | None) -> torch.device:
    """--device, default cuda when there is one; UserError for a CUDA device that is not there."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here: use --device cpu")
    return device


def quality_setup(args, device):
    """(plan, references, extractors) for --quality, built once; None without --quality."""
    from eval.registry import Estimators, check_extractor
    from eval.run import Plan, References, make_extractors

    if not args.quality:
        return None
    plan = Plan(metrics=tuple(args.metrics), est=Estimators(), batch=args.eval_batch, allow_small=args.allow_small,
                roles={"main": args.extractor, "dinov2": "dinov2", "clip": "clip", "cmmd": "clip-vitl14-336"})
    for m in plan.metrics:
        check_extractor(m, plan.extractor_of(m))
    extractors = make_extractors({plan.extractor_of(m) for m in plan.metrics}, weights_dir=args.weights_dir,
                                 device=device, resize=None)
    return plan, References(args.quality), extractors


def main(argv: list[str] | None = None) -> int:
    from eval.registry import metric_list
    from eval.run import DEFAULT_SAMPLES, cells_of
    from eval.run import run as eval_run
    from pagoda.generator import load_generator

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
    p.add_argument("--metrics", type=metric_list, default=["fid"], help="quality metrics (with --quality)")
    p.add_argument("--extractor", default="inception", help="extractor of the quality metrics")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help=f"images per quality measurement (default {DEFAULT_SAMPLES})")
    p.add_argument("--eval-batch", type=positive_int, default=250, help="batch of the quality measurement")
    p.add_argument("--weights-dir", default=None, help="extractor weights folder (default $PAGODA_WEIGHTS)")
    p.add_argument("--allow-small", action="store_true", help="quality with fewer samples than feature dimensions")
    p.add_argument("-o", "--out", default="results/bench.jsonl", help="JSONL file the rows are appended to")
    args = p.parse_args(argv)
    if args.reps < MIN_REPS:
        p.error(f"--reps {args.reps}: at least {MIN_REPS} timed calls are needed for a median and p90")
    if args.warmup < 1:
        p.error(f"--warmup {args.warmup}: at least one untimed call is needed (it also compiles under --compile)")
    if not args.quality and (args.num_samples or args.metrics != ["fid"]):
        p.error("--metrics / --num-samples measure quality: add --quality REF (or drop them)")
    check_rows_output(args.out)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype float16 on the CPU: autocast supports bfloat16 there; use --dtype bfloat16")
    quality = quality_setup(args, device)

    cells = []  # every checkpoint is read and every setting checked before anything is measured
    for ckpt in args.ckpt:
        gen = load_generator(ckpt, device=device, dtype=dtype)
        for cell in cells_of(ckpt, gen, args.guidance or [None], args.sampler or [None], args.steps or [None]):
            gen.check_guidance(cell.guidance)
            cells.append(cell)
    rows = []  # appended per setting: an interrupted sweep keeps the settings it finished
    for cell in tqdm(cells, desc="settings", unit="setting", file=sys.stderr, dynamic_ncols=True):
        gen = load_generator(cell.spec, sampler=cell.sampler, steps=cell.steps, device=device, dtype=dtype)
        if args.compile:
            set_network(gen, torch.compile(network_of(gen)))
        made = profile(gen, batches=args.batch, guidance=cell.guidance, reps=args.reps, warmup=args.warmup,
                       compiled=args.compile, make_row=make_row, fields={"model": cell.spec})
        if quality:
            plan, refs, extractors = quality
            made += eval_run(plan, ckpts=[cell.spec], images=[], refs=refs, extractors=extractors,
                             num_samples=args.num_samples, seed=0, labels="seed", guidance=[cell.guidance],
                             samplers=[cell.sampler], steps=[cell.steps], resolutions=None, device=device)
        append_rows(args.out, made)
        rows += made
    shown = [r for r in rows if r["metric"] in ("nfe", "latency_ms", "img_per_s") or quality and r["metric"] in
             quality[0].metrics]
    print(format_table(shown, COLUMNS[:-1]))
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
