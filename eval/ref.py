"""`python -m eval.ref`: reference statistics of a data set for FID / KID / P-R, with provenance.

    python -m eval.ref photos:train:16 -o refs/photos-16-domain.npz --extractor domain
    python -m eval.ref data/imagenet64_val.npz -o refs/in64.npz --weights-dir weights/
    python -m eval.ref --list      # the published references that --ref NAME fetches (eval.catalog)

Stores the float64 mean and covariance of the features (and of the sFID spatial features when the
extractor has them: mu_s / sigma_s, as ADM reference batches do), the features of --store-features images
(for KID and precision / recall; a fixed random subset when not all are kept, as is --max-samples)
with their class labels when the data set has classes (photos, an ImageNet-layout folder, an npz
with arr_1; for per-class metrics), and the provenance: a content fingerprint of the inputs, the
extractor, its weights' SHA-256, its resize mode, the sample and stored-feature counts, the order,
the class names and the pagoda version. Running the command again on an up-to-date output does
nothing; an output whose provenance differs is stale and is rebuilt only with --force.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from eval.cache import default_cache
from eval.catalog import format_list
from eval.measure import make_extractors
from eval.pipeline import Want, check_sample_count, extract, init_distributed, is_main
from eval.run import add_cache_arg, add_weights_args, apply_offline
from eval.sources import RandomOrder, open_source
from eval.stats import Reference, check_fresh, load_reference, save_reference
from pagoda.errors import ArgumentParser, UserError, check_output, positive_int, run_cli
from pagoda.version import __version__


def provenance_of(spec: str, source, ex, store: int = 0) -> dict:
    """What the statistics depend on; two references with equal provenance are interchangeable."""
    prov = dict(source=spec, source_fingerprint=source.fingerprint(), resolution=source.resolution,
                num_samples=source.num_samples, extractor=ex.name, feature_dim=ex.feature_dim,
                extractor_sha256=ex.weights_sha256, resize=str(ex.resize),
                stored_features=min(store, source.num_samples),
                order=f"random(seed={source.seed})" if isinstance(source, RandomOrder) else "as listed",
                pagoda_version=__version__)
    if ex.spatial_dim:  # sFID statistics are stored too: a reference made before lacks them
        prov.update(spatial_dim=ex.spatial_dim)
    if source.image_resize:  # brought to the resolution on the way in (eval.ref --resolution on a folder / npz)
        prov.update(image_resize=source.image_resize)
    if source.num_classes:  # labelled: a reference made before labels were stored is stale
        prov.update(num_classes=source.num_classes, class_names=list(source.class_names or []) or None)
    return prov


def _is_reference(path: Path) -> bool:
    """Whether an existing -o file is a reference eval.ref may rebuild: an npz holding `mu`, or an empty file (what an
    interrupted copy leaves: nothing to lose); a samples npz, a results file or anything else is the user's, never
    overwritten."""
    if path.stat().st_size == 0:
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return "mu.npy" in z.namelist()


def stale_reason(path: Path, provenance: dict) -> str | None:
    """None if the reference at `path` was built from exactly `provenance`, else what differs."""
    try:
        old = load_reference(path)
    except UserError as e:
        return f"is stale: it cannot be read ({e}); rebuild it with --force"
    try:
        check_fresh(old, **provenance)
    except UserError as e:
        return str(e)
    return None


def build(source, ex, *, batch: int, store: int, device, provenance: dict, cache=None):
    """Stream the source once through the extractor (reading / filling `cache`, an eval.cache.FeatureCache); a
    Reference with mean, covariance and stored features."""
    want = Want(store=store, labels=bool(store and source.num_classes), spatial=bool(ex.spatial_dim))
    out = extract(source, {ex.name: ex}, {ex.name: want}, batch=batch, device=device, cache=cache)[ex.name]
    features = out.store.features() if out.store is not None else None
    spatial = (out.spatial.mean(), out.spatial.cov()) if out.spatial is not None else (None, None)
    return Reference(mu=out.stats.mean(), sigma=out.stats.cov(), n=out.stats.n, features=features,
                     provenance=provenance, labels=out.stored_labels(), mu_s=spatial[0], sigma_s=spatial[1])


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.ref` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m eval.ref", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", help="an image folder, an ADM .npz, or photos[:split[:resolution]]")
    p.add_argument("-o", "--out", help="output reference .npz")
    p.add_argument("--list", action="store_true", help="list the named references (--ref NAME elsewhere) with their "
                   "source and protocol, and exit")
    p.add_argument("--extractor", default="inception", help="feature extractor (default inception)")
    add_weights_args(p)
    p.add_argument("--resize", default=None, help="image convention of the DINOv2 extractor (pil-bicubic, edm2-torch)")
    p.add_argument("--resolution", type=positive_int, default=None, help="resolution of the bundled data set; "
                   "a folder or npz is brought to it by ADM's centre crop (recorded in the reference)")
    p.add_argument("--split", default="train", help="split of the bundled data set (default train)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per batch (no effect on results)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="use a fixed random subset of N images (seed 0)")
    p.add_argument("--store-features", type=int, default=10_000,
                   help="keep the features (and labels) of a fixed random subset of N images for KID, P/R "
                        "and per-class metrics (default 10000, 0 = none)")
    p.add_argument("--allow-small", action="store_true", help="accept fewer images than feature dimensions")
    p.add_argument("--force", action="store_true", help="rebuild an existing output whose provenance differs")
    add_cache_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list:
        print(format_list(args.weights_dir))
        return 0
    if args.dataset is None or args.out is None:
        p.error("give a DATASET and -o OUT (or --list)")
    apply_offline(args)
    check_output(args.out)
    if Path(args.out).is_file() and not _is_reference(Path(args.out)):  # results, samples: --force never overwrites
        raise UserError(f"-o {args.out} exists and is not a reference (an .npz of mu and sigma): eval.ref overwrites only a stale "
                        "reference, never another file: choose another -o")
    if args.store_features < 0:
        raise UserError(f"--store-features={args.store_features} must be >= 0")
    spec = args.dataset
    if spec.endswith(".safetensors"):
        raise UserError(f"{spec} is a checkpoint: eval.ref takes a data set (an image folder, an ADM .npz or "
                        "photos[:split[:resolution]]); measure checkpoints with eval.run / eval.fid")
    if spec.split(":")[0] != "photos" and args.split != "train":
        raise UserError(f"--split {args.split} exists only for the bundled photos; {spec} has one split: drop --split")
    if spec.startswith("photos:") and (args.split != "train" or args.resolution is not None):
        raise UserError(f"{spec} names its split / resolution itself: drop --split / --resolution, or write "
                        "photos:SPLIT:RES")
    device = init_distributed()
    if ":" not in spec and spec == "photos":
        spec = f"photos:{args.split}"
    source = open_source(spec, resolution=args.resolution, split=args.split)  # a missing data set: said first
    (ex,) = make_extractors({args.extractor}, weights_dir=args.weights_dir, device=device,
                            resize=args.resize).values()
    if min(args.max_samples or source.num_samples, args.store_features) < source.num_samples:
        source = RandomOrder(source, seed=0)  # a subset is kept: make it a random one, not the first classes
    source = source.limit(args.max_samples, "--max-samples")
    provenance = provenance_of(spec, source, ex, args.store_features)
    out = Path(args.out)
    if out.exists():
        why = stale_reason(out, provenance)
        if why is None:
            print(f"{out} is up to date ({source.num_samples} images, {ex.name}); nothing to do")
            return 0
        if not args.force:
            raise UserError(f"{out}: {why} (or write to another -o)")
    check_sample_count(source.num_samples, ex.feature_dim, allow_small=args.allow_small, what=spec,
                       option="--max-samples (or more images)")
    ref = build(source, ex, batch=args.batch, store=args.store_features, device=device, provenance=provenance,
                cache=default_cache(not args.no_cache))
    if is_main():
        save_reference(out, ref)
        classes = f" with labels of {source.num_classes} classes" if ref.labels is not None else ""
        print(f"wrote {out}: {ref.n} images, {ex.name} ({ex.feature_dim}-d), "
              f"{0 if ref.features is None else len(ref.features)} features stored{classes}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
