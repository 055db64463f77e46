"""`python -m eval.fid`: FID of a checkpoint (or of saved images) against reference statistics.

    python -m eval.fid --ckpt runs/photos-teacher/teacher.safetensors --ref refs/photos-16.npz
    torchrun --nproc_per_node 8 -m eval.fid --ckpt G64.safetensors --ref VIRTUAL_imagenet64.npz

Generation and feature extraction stream: only float64 sums of features and outer products are
kept (plus a bounded feature store when --bootstrap asks for a confidence interval), so memory does
not depend on --num-samples. Sample i uses seed + i, so the FID does not depend on --batch or on the
number of processes (statistics are all-reduced; rank 0 prints and writes the row).
The reference may be one of ours (eval.ref), an ADM npz, a clean-fid / pytorch-fid npz or an EDM2
stats pkl; one built with another extractor or dimension is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from eval.metrics import fid_bootstrap, frechet_distance
from eval.pipeline import Want, check_sample_count, extract, init_distributed, is_main
from eval.rows import append_rows, format_table, make_row
from eval.sources import dist_info, open_source, save_samples
from eval.stats import load_reference
from pagoda.errors import UserError, guidance_scale, positive_int, run_cli


def labels_arg(text: str) -> str:
    """argparse type: how a conditional model's labels are chosen."""
    if text not in ("uniform", "seed"):
        raise argparse.ArgumentTypeError(f"{text!r}: use uniform or seed")
    return text


def add_source_args(p: argparse.ArgumentParser) -> None:
    """Options shared by eval.fid and eval.run: sampling, extraction and output."""
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="images to generate per model / cell (default 50000); with --images: the first N (default all)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per batch per process (no effect on results)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--labels", type=labels_arg, default="uniform",
                   help="labels of a conditional model: uniform (sample i gets class i mod C, default) or seed "
                        "(the generator's per-seed draw)")
    p.add_argument("--weights-dir", default=None, help="folder of extractor weights (default $PAGODA_WEIGHTS)")
    p.add_argument("--out", default="results/eval.jsonl", help="JSONL file the result rows are appended to")
    p.add_argument("--allow-small", action="store_true", help="run even with fewer samples than feature dimensions")


def make_extractor(name: str, weights_dir: str | None, device):
    from eval.extractors import get_extractor
    return get_extractor(name, weights_dir=weights_dir, device=device)


def measure(source, ex, ref, *, batch: int, device, bootstrap: int = 0, on_batch=None) -> tuple[float, tuple]:
    """FID (and a bootstrap CI if asked) of a source against a reference; streams the source once."""
    want = Want(store=min(source.num_samples, 50_000) if bootstrap else 0)  # bootstrap resamples stored rows
    out = extract(source, {ex.name: ex}, {ex.name: want}, batch=batch, device=device, on_batch=on_batch)[ex.name]
    fid = float(frechet_distance(out.stats.mean(), out.stats.cov(), ref.mu, ref.sigma))
    ci = (None, None)
    if bootstrap:
        ci = tuple(float(v) for v in fid_bootstrap(out.store.features(), ref.mu, ref.sigma, rounds=bootstrap)[1:])
    return fid, ci


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
    p = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a .safetensors checkpoint to sample from")
    src.add_argument("--images", help="an image folder or ADM .npz to measure instead of a checkpoint")
    p.add_argument("--ref", required=True, help="reference statistics (eval.ref npz, ADM npz, clean-fid npz, EDM2 pkl)")
    p.add_argument("--extractor", default="inception", help="feature extractor (default inception)")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale w (default: the model's own)")
    p.add_argument("--sampler", choices=("heun", "euler", "ddim"), default=None, help="sampler of a diffusion model")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps of a diffusion model")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap rounds for a 95%% CI (0 = none)")
    p.add_argument("--save-samples", default=None, help="also write the generated images as an ADM npz")
    add_source_args(p)
    args = p.parse_args(argv)
    if args.save_samples and not args.ckpt:
        raise UserError("--save-samples saves generated images: use it with --ckpt, not --images")
    device = init_distributed()
    ex = make_extractor(args.extractor, args.weights_dir, device)
    ref = load_reference(args.ref, expect_extractor=ex.name, expect_dim=ex.feature_dim)
    spec = args.ckpt or args.images
    num = (args.num_samples or 50_000) if args.ckpt else args.num_samples
    source = open_source(spec, num_samples=num, seed=args.seed, labels=args.labels, guidance=args.guidance,
                         sampler=args.sampler, steps=args.steps, device=device)
    check_sample_count(source.num_samples, ex.feature_dim, allow_small=args.allow_small, what=spec)
    saver = SampleSaver(args.save_samples) if args.save_samples else None
    fid, (lo, hi) = measure(source, ex, ref, batch=args.batch, device=device, bootstrap=args.bootstrap,
                            on_batch=saver)
    if not is_main():
        return 0
    if saver is not None:
        saver.save()
    row = make_row(metric="fid", value=fid, ci_low=lo, ci_high=hi, reference=str(args.ref), extractor=ex.name,
                   extractor_sha256=getattr(ex, "weights_sha256", None), batch=args.batch, dtype="float32",
                   device=str(device), **{"seed": args.seed if args.ckpt else None, **source.row_fields()})
    append_rows(Path(args.out), [row])
    print(format_table([row]))
    print(f"FID {fid:.4f}  ({source.num_samples} samples, {ex.name}, ref {args.ref}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
