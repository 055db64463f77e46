"""`python -m eval.run`: several metrics of several models over a sweep, one generation pass per cell.

    python -m eval.run --ckpt teacher.safetensors --ckpt G16.safetensors --ref refs/photos-16.npz \\
        --extractor domain --metrics fid,kid,is,pr --guidance 1,2 --sampler heun,euler --steps 8,18

A cell is (checkpoint, guidance, sampler, steps). Options that do not apply to a model collapse:
sampler and steps for a one-step generator, guidance for an unconditional one. `--resolutions`
keeps only the checkpoints of those resolutions. In each cell the images are generated once and
every extractor the metrics need (the --extractor for fid/kid/is/pr, dinov2 for fd_dinov2, clip for
clip) runs once over them. Each (cell, metric) is one JSONL row; a table is printed at the end.

Rows: `fid` and `fd_dinov2` (CI from --bootstrap), `kid` (extra.std), `precision` and `recall`
(k = 3; CI from --bootstrap), `is` with extra.style = adm | torch-fidelity and extra.std, `clip`
(100 * mean max(cos, 0); prompt "a photo of a {class}"). A --ref serves the metrics whose extractor and resolution match
its provenance (a reference without provenance, e.g. an ADM npz or EDM2 pkl, matches any).

--per-class (class-conditional models, a reference with labels) adds, for fid and pr, one row per
class: `fid_class`, `precision_class`, `recall_class`, with extra.class (id), extra.class_name and the
sample counts extra.num_fake / extra.num_real. The generated side is every stored sample of that class
(the first 50,000; labels follow --labels); the reference side is its stored features of that class. Classes with too
few samples on either side (2 for FID, k + 1 for P/R) are skipped with a warning. A class usually
has fewer samples than feature dimensions, so its FID is biased upwards: compare it between models
at equal sample counts, never with published FIDs. The table shows the 5 worst classes per metric;
the JSONL holds all.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from eval.fid import add_source_args, make_extractor
from eval.metrics import (
    clip_score,
    fid_bootstrap,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    per_class,
    pr_bootstrap,
    precision_recall,
)
from eval.pipeline import Want, check_sample_count, extract, init_distributed, is_main
from eval.rows import append_rows, format_table, make_row
from eval.sources import GeneratorSource, TensorSource
from eval.stats import load_reference
from pagoda.errors import UserError, run_cli

METRICS = ("fid", "kid", "is", "pr", "fd_dinov2", "clip")
PER_CLASS = ("fid", "pr")  # the metrics --per-class splits by class
PR_K = 3
STORE_LIMIT = 50_000  # features kept per set for KID / P-R (the usual 50k; memory ~ STORE_LIMIT x D x 4 bytes)


def ex_device(ex):
    return getattr(ex, "device", "cpu")


def csv_of(kind):
    """argparse type: a comma-separated list of `kind` values."""
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def metric_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}: choose from {','.join(METRICS)}")
    return names


@dataclass(frozen=True)
class Cell:
    """One point of the sweep; None = the model's own setting (or not applicable)."""

    ckpt: str
    guidance: float | None
    sampler: str | None
    steps: int | None


def extractor_of(metric: str, args) -> str:
    """The registry name of the extractor a metric is measured with."""
    return {"fd_dinov2": args.dinov2, "clip": args.clip}.get(metric, args.extractor)


class References:
    """The --ref files, each found by the extractor and resolution its provenance records."""

    def __init__(self, paths: list[str]):
        self.paths, self.prov = paths, {}
        for p in paths:  # an ADM batch has no provenance, but its images say their resolution
            ref = load_reference(p)
            self.prov[p] = dict(ref.provenance or {})
            if self.prov[p].get("resolution") is None and ref.image_size:
                self.prov[p]["resolution"] = ref.image_size
        self.loaded = {}  # (path, extractor) -> Reference, read (and for ADM batches, extracted) once per run

    def find(self, ex, resolution: int | None, metric: str, *, features: bool = False):
        """(path, Reference) for a metric; features=True (kid, pr, --per-class) needs per-sample features."""
        ok = [p for p in self.paths if self.prov[p].get("extractor") in (None, ex.name)
              and self.prov[p].get("resolution") in (None, resolution)]
        ok.sort(key=lambda p: (self.prov[p].get("extractor") is None, self.prov[p].get("resolution") is None))
        if not ok:
            raise UserError(f"no --ref for {metric} at resolution {resolution} with extractor {ex.name} "
                            f"(given: {', '.join(self.paths)}): build one with python -m eval.ref ... "
                            f"--extractor {ex.name}")
        path, key = ok[0], (ok[0], ex.name)
        if key not in self.loaded:
            self.loaded[key] = load_reference(path, expect_extractor=ex.name, expect_dim=ex.feature_dim)
        ref = self.loaded[key]
        if (features or metric in ("kid", "pr")) and ref.features is None:
            if ref.n is None or ref.format != "adm":
                raise UserError(f"reference {path} stores no features, needed by {metric}: rebuild it with "
                                "python -m eval.ref ... --store-features N")
            ref.features, ref.labels = self._features_of_images(path, ex)  # an ADM batch: images, no features
        return path, ref

    @staticmethod
    def _features_of_images(path: str, ex):
        """Features (and arr_1 labels, if any) of the first STORE_LIMIT images of an ADM reference batch."""
        adm = load_reference(path, load_images=True)
        x = torch.from_numpy(adm.images[:STORE_LIMIT]).permute(0, 3, 1, 2)
        out = extract(TensorSource(x, name=path), {ex.name: ex}, {ex.name: Want(store=len(x))}, batch=250,
                      device=ex_device(ex))[ex.name]
        return out.store.features(), None if adm.image_labels is None else adm.image_labels[:STORE_LIMIT]


def cells_of(ckpt: str, gen, guidance: list, samplers: list, steps: list) -> list[Cell]:
    """The sweep for one model, collapsed where an axis does not apply to it."""
    diffusion = getattr(gen, "sampler", None) is not None
    conditional = getattr(gen, "num_classes", 0) > 0 and getattr(gen, "supports_guidance", True)
    return [Cell(ckpt, w, s, n) for w in (guidance if conditional else [None]) or [None]
            for s in (samplers if diffusion else [None]) or [None]
            for n in (steps if diffusion else [None]) or [None]]


def class_prompts(num_classes: int) -> list[str]:
    """CLIP prompts per class; class names known for the bundled photos data set only."""
    from pagoda.data import PHOTO_CLASSES
    if num_classes != len(PHOTO_CLASSES):
        raise UserError(f"metric clip needs class names, known only for the photos data set "
                        f"({len(PHOTO_CLASSES)} classes); this model has {num_classes}: drop clip from --metrics")
    return [f"a photo of a {name.replace('_', ' ')}" for name in PHOTO_CLASSES]


def check_per_class(ckpt: str, gen, refs: References, ex, metrics: list[str]) -> None:
    """UserError unless the model is class-conditional and each reference --per-class uses has labels."""
    if not getattr(gen, "num_classes", 0):
        raise UserError(f"--per-class: {ckpt} is unconditional (num_classes=0), so its samples have no class: "
                        "drop --per-class or evaluate a class-conditional checkpoint")
    for m in set(PER_CLASS) & set(metrics):
        path, ref = refs.find(ex, gen.resolution, m, features=True)
        if ref.labels is None:
            raise UserError(f"--per-class: reference {path} stores no class labels: rebuild it with "
                            f"`python -m eval.ref DATASET -o {path} --force` from a labelled source (photos, an "
                            "ImageNet-layout folder or an ADM npz with arr_1)")
        ref_classes = ref.provenance.get("num_classes") or int(ref.labels.max()) + 1
        if ref_classes > gen.num_classes or ref.provenance.get("num_classes", gen.num_classes) != gen.num_classes:
            raise UserError(f"--per-class: reference {path} has {ref_classes} classes but {ckpt} has "
                            f"{gen.num_classes}: use a reference of the data set the model was trained on")


def class_results(metric: str, fake, y_fake, ref, num_classes: int) -> list[tuple[str, float, dict]]:
    """(row metric, value, extra) for each class with enough samples on both sides; warns about the others."""
    if metric == "fid":
        names, min_count, fn = ("fid_class",), 2, fid_from_features
    else:
        names, min_count, fn = ("precision_class", "recall_class"), PR_K + 1, partial(precision_recall, k=PR_K)
    with warnings.catch_warnings():  # one class has fewer samples than dimensions: documented above
        warnings.filterwarnings("ignore", message=".*< feature dimension")
        values = per_class(fn, fake, y_fake, ref.features, ref.labels, min_count=min_count)
    n_fake, n_real = np.bincount(y_fake, minlength=num_classes), np.bincount(ref.labels, minlength=num_classes)
    skipped = [c for c in range(num_classes) if c not in values]
    if skipped and is_main():
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        print(f"warning: --per-class {metric}: {len(skipped)} of {num_classes} classes have fewer than {min_count} "
              f"generated or reference samples and are skipped ({shown}): raise --num-samples or the "
              "reference's --store-features", file=sys.stderr)
    class_names = ref.provenance.get("class_names") or []
    out = []
    for c, vals in sorted(values.items()):
        extra = {"class": c, "class_name": class_names[c] if c < len(class_names) else None,
                 "num_fake": int(n_fake[c]), "num_real": int(n_real[c])}
        if metric == "pr":
            extra["k"] = PR_K
        out += [(name, float(v), extra) for name, v in zip(names, np.atleast_1d(vals))]
    return out


def worst_classes(rows: list[dict], n: int = 5) -> list[dict]:
    """The n worst per-class rows of each (model, cell, metric): highest FID, lowest precision / recall."""
    groups = {}
    for r in rows:
        if r["metric"].endswith("_class"):
            groups.setdefault((r["model"], r["guidance"], r["sampler"], r["steps"], r["metric"]), []).append(r)
    worst = []
    for key, group in groups.items():
        sign = -1 if key[-1] == "fid_class" else 1
        worst += sorted(group, key=lambda r: sign * r["value"])[:n]
    return worst


def score_cell(cell: Cell, source, metrics: list[str], extractors: dict, refs: References, args) -> list[dict]:
    """Generate once, run each needed extractor once, and turn the outputs into rows."""
    need = {extractor_of(m, args) for m in metrics}
    store = min(source.num_samples, STORE_LIMIT) if ({"kid", "pr"} & set(metrics) or args.bootstrap) else 0
    by_class = bool(args.per_class and set(PER_CLASS) & set(metrics))
    if by_class:
        store = min(source.num_samples, STORE_LIMIT)
    wants = {name: Want(store=store if name == args.extractor or args.bootstrap else 0,
                        labels=by_class and name == args.extractor,
                        logits="is" in metrics and name == args.extractor,
                        texts=class_prompts(source.num_classes) if "clip" in metrics and name == args.clip else None)
             for name in need}
    outs = extract(source, {n: extractors[n] for n in need}, wants, batch=args.batch, device=args.device)
    base = dict(source.row_fields(), batch=args.batch, dtype="float32", device=str(args.device), seed=args.seed)
    rows = []

    def row(metric, value, ex, ref_path=None, lo=None, hi=None, **extra):
        rows.append(make_row(metric=metric, value=value, ci_low=lo, ci_high=hi, reference=ref_path,
                             extractor=ex.name, extractor_sha256=getattr(ex, "weights_sha256", None),
                             extra=extra, **base))

    for m in metrics:
        ex = extractors[extractor_of(m, args)]
        out = outs[extractor_of(m, args)]
        if m in ("fid", "fd_dinov2"):
            path, ref = refs.find(ex, source.resolution, m, features=by_class and m == "fid")
            value = float(frechet_distance(out.stats.mean(), out.stats.cov(), ref.mu, ref.sigma))
            lo = hi = None
            if args.bootstrap:
                _, lo, hi = (float(v) for v in fid_bootstrap(out.store.features(), ref.mu, ref.sigma,
                                                               rounds=args.bootstrap))
            row(m, value, ex, path, lo, hi)
        elif m in ("kid", "pr"):
            path, ref = refs.find(ex, source.resolution, m)
            fake = out.store.features()
            if m == "kid":
                mean, std = kid(ref.features, fake, subset_size=min(1000, len(fake), len(ref.features)),
                                  seed=args.seed)
                row("kid", mean, ex, path, std=float(std))
            elif args.bootstrap:  # membership indicators resampled, manifolds fixed (pr_bootstrap)
                for name, (v, lo, hi) in zip(("precision", "recall"),
                                             pr_bootstrap(ref.features, fake, k=PR_K, rounds=args.bootstrap)):
                    row(name, v, ex, path, lo, hi, k=PR_K)
            else:
                p, r = precision_recall(ref.features, fake, k=PR_K)
                row("precision", p, ex, path, k=PR_K)
                row("recall", r, ex, path, k=PR_K)
        elif m == "is":
            mean, std = inception_score(out.logits.features(), splits=10, style=args.is_style)
            row("is", mean, ex, style=args.is_style, std=float(std))
        elif m == "clip":
            row("clip", float(clip_score(out.cos.features().flatten())), ex)
        if by_class and m in PER_CLASS:
            for name, value, extra in class_results(m, out.store.features(), out.stored_labels(), ref,
                                                    source.num_classes):
                row(name, value, ex, path, **extra)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, help="checkpoint to evaluate (repeatable)")
    p.add_argument("--ref", action="append", default=[], help="reference statistics (repeatable, see above)")
    p.add_argument("--metrics", type=metric_list, default=["fid"], help=f"comma list from {','.join(METRICS)}")
    p.add_argument("--extractor", default="inception", help="extractor of fid/kid/is/pr (default inception)")
    p.add_argument("--dinov2", default="dinov2", help="extractor of fd_dinov2 (default dinov2 = ViT-L/14)")
    p.add_argument("--clip", default="clip", help="extractor of clip (default clip = ViT-L/14; clip-vitb32)")
    p.add_argument("--resolutions", type=csv_of(int), default=None, help="keep checkpoints of these resolutions")
    p.add_argument("--guidance", type=csv_of(float), default=[None], help="CFG scales, e.g. 1,1.5,2")
    p.add_argument("--sampler", type=csv_of(str), default=[None], help="diffusion samplers, e.g. heun,euler")
    p.add_argument("--steps", type=csv_of(int), default=[None], help="diffusion sampler steps, e.g. 8,18")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap rounds for FID / FD / P-R CIs (0 = none)")
    p.add_argument("--is-style", choices=("adm", "torch-fidelity"), default="adm", help="IS split convention")
    p.add_argument("--per-class", action="store_true",
                   help="also one fid / pr row per class (class-conditional model, reference with labels)")
    add_source_args(p)
    args = p.parse_args(argv)
    args.num_samples = args.num_samples or 50_000
    _validate(args, p)
    args.device = init_distributed()
    from pagoda.generator import load_generator
    refs = References(args.ref)
    needed = {extractor_of(m, args) for m in args.metrics}
    extractors = {n: make_extractor(n, args.weights_dir, args.device) for n in needed}
    for ex in extractors.values():
        if {"fid", "fd_dinov2"} & set(args.metrics):
            check_sample_count(args.num_samples, ex.feature_dim, allow_small=args.allow_small, what="--num-samples")
    plan = []
    for ckpt in args.ckpt:
        gen = load_generator(ckpt, device=args.device)
        if args.resolutions and gen.resolution not in args.resolutions:
            print(f"skip {ckpt}: resolution {gen.resolution} not in --resolutions", file=sys.stderr)
            continue
        for m in set(args.metrics) - {"is", "clip"}:  # a missing reference fails before any sampling
            refs.find(extractors[extractor_of(m, args)], gen.resolution, m)
        if args.per_class:
            check_per_class(ckpt, gen, refs, extractors[args.extractor], args.metrics)
        plan += cells_of(ckpt, gen, args.guidance, args.sampler, args.steps)
    if not plan:
        raise UserError(f"no checkpoint has a resolution in --resolutions {args.resolutions}: check the list")
    rows = []
    for cell in plan:
        gen = load_generator(cell.ckpt, sampler=cell.sampler, steps=cell.steps, device=args.device)
        source = GeneratorSource(gen, args.num_samples, seed=args.seed, labels=args.labels, guidance=cell.guidance,
                                 name=getattr(gen, "name", None) or Path(cell.ckpt).stem)
        rows += score_cell(cell, source, args.metrics, extractors, refs, args)
    if is_main():
        append_rows(args.out, rows)
        print(format_table([r for r in rows if not r["metric"].endswith("_class")]))
        if args.per_class:
            print(f"\nworst 5 classes per metric (all classes in {args.out}):")
            print(format_table(worst_classes(rows)))
        print(f"{len(rows)} rows -> {args.out}")
    return 0


def _validate(args, p) -> None:
    if args.bootstrap < 0:
        p.error(f"--bootstrap {args.bootstrap} must be >= 0")
    if any(s not in ("heun", "euler", "ddim", None) for s in args.sampler):
        p.error(f"--sampler {args.sampler}: choose from heun, euler, ddim")
    if any(n is not None and n < 1 for n in args.steps) or any(w is not None and w < 0 for w in args.guidance):
        p.error("--steps must be >= 1 and --guidance >= 0")
    if args.per_class and not set(PER_CLASS) & set(args.metrics):
        p.error("--per-class applies to fid and pr: add one of them to --metrics")
    if not args.ref and set(args.metrics) - {"is", "clip"}:
        p.error(f"--ref is needed for {sorted(set(args.metrics) - {'is', 'clip'})}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
