"""`python -m pagoda <command>`: train a stage, invert data into pairs, sample a checkpoint, inspect one,
list presets.

Every mistake a user can make ends as one line `error: ...` and exit status 2 (argparse's own
errors included). Stages are a dict: a later stage adds one entry to STAGES.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import sys
from pathlib import Path

from pagoda.config import SAMPLER_HELP, sampler_spec
from pagoda.errors import (
    ArgumentParser,
    UserError,
    check_output,
    guidance_scale,
    int_list,
    positive_int,
    run_cli,
)

# stage name -> module with `run(cfg, *, out_dir) -> Path` (the trained model file)
STAGES = {"teacher": "pagoda.stages.teacher", "distill": "pagoda.stages.distill",
          "pd": "pagoda.baselines.progressive_distillation", "grow": "pagoda.stages.grow"}
# inputs of a stage given as options (each is the config field of the same name): stage -> {option: help}
STAGE_INPUTS = {"distill": {"teacher": "the Stage-1 teacher checkpoint (G starts as a copy of its network)",
                            "pairs": "the teacher's inversion pairs (python -m pagoda pairs)",
                            "init": "a one-step G of this teacher to start from instead of its network (optional; "
                                    "e.g. the plain G for the guided G)"},
                "pd": {"teacher": "the Stage-1 teacher checkpoint (first round's teacher and student)",
                       "from_steps": "the teacher's steps in the first round (a power of two)",
                       "to_steps": "the last student's steps (from_steps / 2^k)",
                       "data": "training images (default: the teacher's own training data)"},
                "grow": {"source": "the G to grow 2x (Stage 2b's G.safetensors or a grown one)",
                         "pairs": "the Stage-2a pairs the source G was trained on",
                         "resolution": "the output resolution, twice the source's (default)"}}
FLAGS = {"source": "from"}  # config field -> option name where they differ
# commands whose module parses its own arguments: name -> (module with main(argv), help)
DELEGATED = {
    "domain": ("pagoda.networks.domain", "train the photos domain classifier (python -m pagoda domain -h)"),
    "import-edm": ("pagoda.importers", "import the public EDM ImageNet-64 teacher (python -m pagoda import-edm -h)"),
    "edit": ("pagoda.edit", "reconstruct / super-resolve / inpaint / transfer / interpolate through a G "
                            "(python -m pagoda edit -h)"),
}
def labels_arg(text: str) -> str | list[int]:
    """`seed` (drawn per seed), `uniform` (i mod num_classes) or class ids like `int_list`."""
    return text if text in ("seed", "uniform") else int_list(text)


def guidance_range_arg(text: str) -> tuple[float, float]:
    """`1:3` -> (1.0, 3.0); a single `2` -> (2.0, 2.0)."""
    lo, sep, hi = text.partition(":")
    try:
        lo, hi = float(lo), float(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LO:HI of CFG scales (e.g. 1:3)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO <= HI (e.g. 1:3)")
    return lo, hi


def device_arg(text: str) -> str:
    """A torch device that exists here (cpu, cuda, cuda:1, ...)."""
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu")
    return text


# ---------------------------------------------------------------------------------------------
# Commands.

def cmd_stage(args) -> int:
    """Resolve the stage config; print it (--dry-run) or train (resuming when the run directory has state)."""
    from pagoda.config import dumps, resolve
    inputs = [f"{name}={getattr(args, name)}" for name in STAGE_INPUTS.get(args.command, {})
              if getattr(args, name) is not None]
    cfg = resolve(args.command, args.preset, inputs + args.set, args.config)
    if args.dry_run:
        print(dumps(cfg))
        return 0
    out_dir = args.out or f"runs/{args.preset}-{args.command}"
    path = importlib.import_module(STAGES[args.command]).run(cfg, out_dir=out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # one line under torchrun, not one per process
        print(f"model: {path}")
    return 0


def cmd_presets(args) -> int:
    """Name and description of every preset."""
    from pagoda.config import PRESETS
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def cmd_info(args) -> int:
    """The checkpoint's meta: kind, resolution, parameter count, step, provenance and its config."""
    from pagoda.checkpoint import load_model, num_parameters
    meta = load_model(args.ckpt, kind=args.kind)[1]  # checks its checksum: a damaged file is an error, not a listing
    print(f"{'file:':<18}{args.ckpt}")
    for key in ("kind", "stage", "resolution", "noise_resolution", "grow_stage", "guidance_range", "num_classes",
                "step", "ema_rate", "git_commit", "pagoda_version", "time", "source"):
        if key in meta:
            print(f"{key + ':':<18}{meta[key]}")
    print(f"{'parameters:':<18}{num_parameters(args.ckpt):,}")
    config = meta.get("config") or {k: meta[k] for k in ("network", "diffusion", "sample") if k in meta}
    print("config:")
    print(json.dumps(config, indent=2, sort_keys=True))
    return 0


def _sample_labels(gen, seeds, labels):
    """The labels of the samples (int64 [N]) or None for an unconditional model."""
    import torch
    if gen.num_classes == 0:
        if labels != "seed":
            raise UserError(f"--labels {labels}: the model is unconditional (num_classes=0): drop --labels")
        return None
    if labels == "seed":
        return gen.seed_labels(seeds)
    if labels == "uniform":
        return torch.arange(len(seeds)) % gen.num_classes
    return gen.check_labels(torch.tensor(labels), len(seeds))


def write_grid(path: Path, images) -> None:
    """A PNG grid of uint8 images [N, 3, H, W], ceil(sqrt(N)) columns; atomic."""
    import numpy as np
    from PIL import Image

    from pagoda.checkpoint import write_atomic
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    write_atomic(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def write_npz(path: Path, images, labels) -> None:
    """ADM sample file of uint8 [N, 3, H, W] images: arr_0 NHWC, arr_1 labels (when conditional); atomic."""
    from pagoda.data import save_npz

    save_npz(path, images.permute(0, 2, 3, 1).numpy(), None if labels is None else labels.numpy())


def cmd_sample(args) -> int:
    """Generate images of --seeds with a checkpoint and write them as .npz or .png."""
    import torch

    from pagoda.generator import load_generator
    out = Path(args.out)
    if out.suffix.lower() not in (".npz", ".png"):
        raise UserError(f"-o {out}: the output must end in .npz (ADM sample file) or .png (image grid)")
    check_output(out)
    gen = load_generator(args.ckpt, sampler=args.sampler, steps=args.steps, device=args.device)
    if args.resolution is not None and gen.resolution != args.resolution:
        raise UserError(f"--ckpt {args.ckpt} is at resolution {gen.resolution}, not --resolution "
                        f"{args.resolution}: pass a {args.resolution} px checkpoint or drop --resolution")
    gen.check_guidance(args.guidance)  # names a G's trained range, or why the model takes no guidance
    seeds = torch.tensor(args.seeds, dtype=torch.int64)
    labels = _sample_labels(gen, seeds, args.labels)
    images = torch.cat([x.cpu() for x in gen.sample_batches(seeds, labels, args.guidance, batch=args.batch)])
    if out.suffix.lower() == ".npz":
        write_npz(out, images, labels)
    else:
        write_grid(out, images)
    print(f"wrote {out}: {len(images)} images at {gen.resolution} px, {gen.nfe_for(args.guidance):g} NFE each "
          f"({gen.name})")
    return 0


def cmd_pairs(args) -> int:
    """Stage 2a: invert the data (and its mirror images) with the teacher into --out; resumes when rerun."""
    from pagoda.pairs import make_pairs
    make_pairs(args.teacher, args.data, args.out, dtype=args.dtype, shard_size=args.shard_size,
               batch=args.batch, guidance=args.guidance, device=args.device)
    return 0


def cmd_drift(args) -> int:
    """Stage 3's drift between a G and one grown from it (pagoda.stages.grow.drift); prints (and appends) JSON."""
    import torch

    from pagoda.generator import load_generator
    from pagoda.rows import append_rows, check_rows_output
    from pagoda.stages.grow import check_lineage, drift
    if args.out:
        check_rows_output(args.out, "--out")  # a model file or malformed rows there: refused, not appended to
    low, high = (load_generator(p, device=args.device) for p in (args.low, args.high))
    if low.resolution < high.resolution:  # a swapped pair gets drift()'s own message
        check_lineage(args.low, args.high)
    row = drift(low, high, torch.tensor(args.seeds, dtype=torch.int64))
    print(json.dumps({"metric": "drift", **row, "low_path": str(args.low), "high_path": str(args.high)}))
    if args.out:
        append_rows(args.out, drift_rows(row, args.low, args.high))
    return 0


def drift_rows(row: dict, low_path, high_path) -> list[dict]:
    """`drift()`'s measure as result rows (ARCHITECTURE "Result row"): drift_rms (uint8 levels) and drift_psnr_db
    of the grown model (model = its path as given, as eval.run names a checkpoint; resolution = its output),
    extra.source = the source G's path as given."""
    import datetime

    import torch

    from pagoda.version import __version__, git_commit
    common = {"model": str(high_path), "method": "pagoda", "resolution": row["high_resolution"], "guidance": 1.0,
              "sampler": None, "steps": None, "nfe": 1, "num_samples": row["num_samples"],
              "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "torch": torch.__version__, "commit": git_commit(), "pagoda_version": __version__,
              "extra": {"source": str(low_path), "source_resolution": row["low_resolution"]}}
    return [{**common, "metric": m, "value": row[m]} for m in ("drift_rms", "drift_psnr_db", "frame_rms")
            if row.get(m) is not None]


# ---------------------------------------------------------------------------------------------
# Parser.

def _add_stage(sub, stage: str) -> None:
    p = sub.add_parser(stage, help=f"train the {stage} stage (resumes when run again)",
                       description=f"Train the {stage} stage. Rerunning the same command resumes its run directory.")
    p.add_argument("--preset", required=True, help="named configuration (see `python -m pagoda presets`)")
    p.add_argument("--config", metavar="FILE.json", help="a full stage config in JSON (e.g. a run's config.json); "
                   "replaces the preset's config")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value, e.g. --set train.steps=100 (repeatable; values are JSON)")
    p.add_argument("--out", metavar="DIR", help=f"run directory (default runs/<preset>-{stage})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    for name, text in STAGE_INPUTS.get(stage, {}).items():
        p.add_argument(f"--{FLAGS.get(name, name).replace('_', '-')}", dest=name, help=f"{text} (= --set {name}=...)")
    p.set_defaults(func=cmd_stage)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images with a checkpoint", description="Generate images of the "
                       "given seeds with a checkpoint; sample i depends on seed i only.")
    p.add_argument("--ckpt", required=True, help="model checkpoint (.safetensors)")
    p.add_argument("-o", "--out", required=True, help="output: .npz (ADM: arr_0 uint8 NHWC, arr_1 labels) "
                   "or .png (grid)")
    p.add_argument("--seeds", type=int_list, default=list(range(64)), help="seeds, e.g. 0-63 or 1,5,7 (default 0-63)")
    p.add_argument("--labels", type=labels_arg, default="seed", help="class ids (one, or one per seed, e.g. 3 or "
                   "0-63), 'uniform' (seed index mod classes) or 'seed' (drawn from each seed; default)")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale w (1 = none; default: the "
                   "checkpoint's)")
    p.add_argument("--sampler", type=sampler_spec, default=None, help=SAMPLER_HELP + " (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--batch", type=positive_int, default=64, help="images per forward batch (default 64)")
    p.add_argument("--resolution", type=positive_int, default=None, help="refuse a checkpoint not at this "
                   "resolution")
    p.add_argument("--device", type=device_arg, default=None, help="torch device (default cuda when available, else cpu)")
    p.set_defaults(func=cmd_sample)


def _add_pairs(sub) -> None:
    p = sub.add_parser("pairs", help="Stage 2a: DDIM-invert the training data with a teacher (resumes when "
                       "run again)",
                       description="DDIM inversion of every training image and its mirror (item j = image "
                       "j // 2, flipped iff j odd) into checksummed shards + index.json. Rerunning the same "
                       "command resumes; under torchrun each rank writes its own shards.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.safetensors); sets the resolution")
    p.add_argument("--data", required=True, help="'photos', an image folder or an ADM .npz (the teacher's "
                   "training data)")
    p.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="pairs folder (created; resumed if it exists)")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="latent storage type (default: the folder's, else float32)")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="items per shard file, a multiple of --batch (default: the folder's, else 1024)")
    p.add_argument("--batch", type=positive_int, default=None, help="items per network call, aligned to item "
                   "ids; recorded, as float results depend on it (default: the folder's, else 32)")
    p.add_argument("--guidance", type=guidance_range_arg, default=None, metavar="LO:HI",
                   help="invert with the CFG-guided teacher, w_j spread evenly over [LO, HI] (for a guidance-"
                   "conditioned G; e.g. 1:3; default: the folder's, else none)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="torch device (default cuda when available, else cpu)")
    p.set_defaults(func=cmd_pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m pagoda", description="PaGoDA: train one-step generators and their teachers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        _add_stage(sub, stage)
    _add_sample(sub)
    _add_pairs(sub)
    p = sub.add_parser("drift", help="Stage 3: how far a grown G moved from its source (downsample(G_2x(z)) vs G(z))",
                       description="RMS difference (uint8 levels) and PSNR between area-downsampled samples of a grown "
                       "G and the samples of the G it was grown from, on the same seeds (paper Fig. 3).")
    p.add_argument("--low", required=True, help="the source G (.safetensors)")
    p.add_argument("--high", required=True, help="a G grown from it (same base noise)")
    p.add_argument("--seeds", type=int_list, default=list(range(1000)), help="seeds (default 0-999)")
    p.add_argument("--out", default=None, help="append the JSON row to this .jsonl file")
    p.add_argument("--device", type=device_arg, default=None, help="torch device (default cuda when available)")
    p.set_defaults(func=cmd_drift)
    p = sub.add_parser("info", help="print a checkpoint's metadata", description="Print a checkpoint's metadata.")
    p.add_argument("--ckpt", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--kind", default=None, help="refuse a checkpoint of another kind (e.g. teacher)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("presets", help="list the named configurations", description="List the presets.")
    p.set_defaults(func=cmd_presets)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "cpu") is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
