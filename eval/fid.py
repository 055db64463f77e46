"""`python -m eval.fid`: FID of a checkpoint (or of saved images) against reference statistics.

    python -m eval.fid --ckpt runs/photos-teacher/teacher.safetensors --ref refs/photos-16.npz
    python -m eval.fid --images samples.npz --ref VIRTUAL_imagenet64_labeled.npz
    torchrun --nproc_per_node 8 -m eval.fid --ckpt G64.safetensors --ref VIRTUAL_imagenet64.npz

The one-metric form of `python -m eval.run --metrics fid` (the same registry, checks and rows).
Generation and feature extraction stream: only float64 sums of features and outer products are
kept (plus a bounded feature store when --bootstrap asks for a confidence interval), so memory does
not depend on --num-samples. Sample i uses seed + i, so the FID does not depend on --batch or on the
number of processes (statistics are all-reduced; rank 0 prints and writes the row).
The reference may be one of ours (eval.ref), an ADM npz, a clean-fid / pytorch-fid npz or an EDM2
stats pkl; one built with another extractor, dimension or image convention is refused.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from eval.measure import DEFAULT_SAMPLES
from eval.pipeline import extract, is_main
from eval.registry import Estimators, score, wants
from eval.run import (
    add_common_args,
    apply_offline,
    check_bootstrap,
    refuse_checkpoint_options,
)
from eval.sources import dist_info, save_samples
from pagoda.config import SAMPLER_HELP, sampler_spec
from pagoda.errors import (
    ArgumentParser,
    UserError,
    check_output,
    guidance_scale,
    positive_int,
    run_cli,
)
from pagoda.rows import append_rows, check_rows_output, format_table


def measure(source, ex, ref, *, batch: int, device, bootstrap: int = 0) -> tuple[float, tuple]:
    """Library use: (FID, (ci_low, ci_high)) of a source against a Reference, streaming the source once."""
    est = Estimators(bootstrap=bootstrap)
    need = wants(["fid"], {"main": ex.name}, est, num_samples=source.num_samples, per_class=False, prompts=None)
    out = extract(source, {ex.name: ex}, need, batch=batch, device=device)[ex.name]
    (_, fid, lo, hi, _), = score("fid", out, ref, est)
    return fid, (lo, hi)


class SampleSaver:
    """Collects this process's images for --save-samples (one process only: the samples are kept in memory)."""

    def __init__(self, path: str):
        if dist_info()[1] > 1:
            raise UserError("--save-samples works in one process: run without torchrun to save samples")
        self.path, self.images, self.labels = path, [], []

    def __call__(self, x, y, index) -> None:
        self.images.append(x.permute(0, 2, 3, 1).numpy())
        self.labels.append(None if y is None else y.numpy())

    def save(self) -> None:
        labels = None if any(y is None for y in self.labels) else np.concatenate(self.labels)
        save_samples(self.path, np.concatenate(self.images), labels)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a .safetensors checkpoint to sample from")
    src.add_argument("--images", help="samples to measure instead of a checkpoint: an image folder, EDM2's nested seed "
                     "folders, an ADM .npz, a .zip / .tar or webdataset shards a-{000..009}.tar")
    p.add_argument("--ref", required=True, help="reference statistics (eval.ref npz, ADM npz, clean-fid npz, EDM2 pkl), "
                   "or a named one fetched on first use: imagenet64|128|256|512, edm2-img64|512 (eval.ref --list)")
    p.add_argument("--extractor", default="inception", help="feature extractor (default inception)")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale w (default: the model's own)")
    p.add_argument("--sampler", type=sampler_spec, default=None, help=SAMPLER_HELP + " (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps of a diffusion model")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap rounds for a 95%% CI (0 = none)")
    p.add_argument("--save-samples", default=None, help="also write the generated images as an ADM npz")
    p.add_argument("--resize", default=None,
                   help="image convention of the DINOv2 extractor (pil-bicubic or edm2-torch; default: its own)")
    add_common_args(p)
    args = p.parse_args(argv)
    check_bootstrap(args.bootstrap)
    check_rows_output(args.out)
    apply_offline(args)
    if args.images:
        refuse_checkpoint_options(args, "--images")
        if args.save_samples:
            raise UserError("--save-samples saves generated images: use it with --ckpt, not --images")
    if args.save_samples:
        check_output(args.save_samples, "--save-samples")
    from eval.api import Evaluator
    ev = Evaluator(args.ref, ["fid"], extractor=args.extractor, resize=args.resize,
                   estimator=Estimators(bootstrap=args.bootstrap), batch=args.batch, allow_small=args.allow_small,
                   weights_dir=args.weights_dir, cache=not args.no_cache)
    spec, seed = args.ckpt or args.images, args.seed or 0
    num = (args.num_samples or DEFAULT_SAMPLES) if args.ckpt else args.num_samples
    source = ev.source(spec, num_samples=num, seed=seed, labels=args.labels or "seed", guidance=args.guidance,
                       sampler=args.sampler, steps=args.steps)
    with source:
        ev.check(source, what=spec, option="--num-samples" if args.ckpt else "--num-samples (or more images)")
        saver = SampleSaver(args.save_samples) if args.save_samples else None
        (row,) = ev.measure(source, seed=seed if args.ckpt else None, on_batch=saver, check=False)
    if not is_main():
        return 0
    if saver is not None:
        saver.save()
    append_rows(args.out, [row])
    print(format_table([row]))
    print(f"FID {row['value']:.4f}  ({source.num_samples} samples, {row['extractor']}, ref {args.ref}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
