"""`python -m eval.run`: every metric of checkpoints and of anyone's samples, one extraction pass per extractor.

    python -m eval.run --ckpt teacher.safetensors --ckpt G16.safetensors --ref refs/photos-16.npz \\
        --extractor domain --metrics fid,kid,is,pr --guidance 1,2 --sampler heun,euler --steps 8,18
    python -m eval.run --images samples.npz --images samples_dir/ --images shards-{000..009}.tar \\
        --ref imagenet64 --metrics fid,sfid,is,pr,dc

A checkpoint is swept over cells (guidance, sampler, steps); axes that do not apply collapse (sampler and
steps for a one-step generator, guidance for an unconditional one). `--images` (an ADM npz with arr_0 and
optional arr_1 labels, an image folder, EDM2's nested seed folders, a zip / tar or webdataset shards:
eval.stores) is one cell with method "samples", named by its path; it goes through the same code path as a
checkpoint's samples, and its features are cached by content (eval.cache; --no-cache). In each cell every
extractor the metrics need runs once over the images (`--extractor NAME,dinov2=NAME,clip=NAME,cmmd=NAME`: the
first for fid, sfid, kid, is, pr, dc, the others for fd_dinov2, clip and cmmd). Each (cell, metric) is one JSONL
row with its estimator parameters in `extra`; a
table is printed at the end. A --ref serves the metrics whose extractor, image convention (resize) and
resolution match its provenance (a reference without provenance, e.g. an ADM npz or EDM2 pkl, matches any).

Rows: fid, sfid (ADM evaluator spatial FID), fd_dinov2 (CI from --estimator bootstrap=N), kid (extra.std, subset_size,
subsets), precision / recall (k, CI), density / coverage (k, CI), is (extra.splits, style, std), clip
(100 * mean max(cos, 0); class prompts "a photo of a {class}" or one caption per image), cmmd (x 1000).
Every impossible request (a metric its extractor cannot measure, too few samples or stored reference
features, a reference lacking what a metric needs) is refused before any image is generated.

Labels of a class-conditional checkpoint are drawn per sample from its seed (`--labels seed`, as EDM and
ADM sample), so no metric depends on the generation order; `--labels balanced` gives exactly equal class
counts in a seeded random order, and its rows say so (extra.labels).

--per-class (class-labelled samples, a reference with labels) adds, for fid and pr, one row per class:
`fid_class`, `precision_class`, `recall_class`, with extra.class, class_name, num_fake, num_real. A class
usually has fewer samples than feature dimensions, so its FID is biased upwards: compare it between
models at equal sample counts, never with published FIDs. The table shows the 5 worst classes per metric.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.catalog import refetch_hint, resolve_ref
from eval.pipeline import Want, extract, is_main
from eval.registry import (
    DEFAULT_ROLES,
    METRICS,
    PER_CLASS,
    STORE_LIMIT,
    Estimators,
    bootstrap_error,
    check_extractor,
    check_reference,
    check_request,
    class_rows,
    estimators_arg,
    metric_list,
    role_option,
    score,
    wants,
)
from eval.rows import append_rows, check_rows_output, format_table, make_row
from eval.sources import GeneratorSource, TensorSource, open_source
from eval.stats import load_reference
from pagoda.config import SAMPLER_HELP, sampler_spec
from pagoda.errors import (
    ArgumentParser,
    UserError,
    guidance_scale,
    positive_int,
    run_cli,
    sample_count,
)
from pagoda.weights import sha256_file

DEFAULT_SAMPLES = 50_000


# ---------------------------------------------------------------------------------------------
# What a run measures (built from the command line once, then passed explicitly).


@dataclass(frozen=True)
class Plan:
    """The measurement every cell gets: metrics, the extractor of each role, estimators and options."""

    metrics: tuple[str, ...]
    roles: dict  # role -> extractor name
    est: Estimators
    per_class: bool = False
    class_names: tuple[str, ...] | None = None  # CLIP prompts per class (--prompts classes:FILE)
    captions: tuple[str, ...] | None = None  # CLIP: one caption per image (--prompts captions:FILE)
    batch: int = 250
    allow_small: bool = False
    cache: object = None  # eval.cache.FeatureCache for sample stores, None = extract every time (--no-cache)

    def extractor_of(self, metric: str) -> str:
        return self.roles[METRICS[metric].role]


class References:
    """The --ref files, each found by the extractor, resize and resolution its provenance records. A --ref may
    name a published reference (eval.catalog: fetched on first use into `weights_dir`, else the cache); rows
    and messages name it as given."""

    def __init__(self, paths: list[str], weights_dir=None):
        self.paths, self.prov, self.files, self.trust = list(paths), {}, {}, {}
        for p in self.paths:
            self.files[p], self.trust[p] = resolve_ref(p, weights_dir)
        for p in self.paths:  # an ADM batch has no provenance, but its images say their resolution
            try:
                ref = load_reference(self.files[p])
            except UserError as e:
                if self.trust[p] is None:
                    raise
                raise UserError(f"{e} ({refetch_hint(p, self.files[p])})") from None
            self.prov[p] = dict(ref.provenance or {})
            if self.prov[p].get("resolution") is None and ref.image_size:
                self.prov[p]["resolution"] = ref.image_size
        self.loaded = {}  # (path, extractor) -> Reference, read (and for ADM batches, extracted) once per run

    def about(self, path: str | None) -> dict:
        """Row fields of the reference `path` (as given): its file's SHA-256, and how a named one is trusted."""
        if path is None:
            return {}
        out = {"reference_sha256": sha256_file(self.files[path])}
        if self.trust[path] is not None:
            out["reference_trust"] = self.trust[path]
        return out

    def check_extractors(self, plan: Plan) -> None:
        """UserError, before any weights are loaded, when no --ref can serve a metric's extractor: every --ref
        records another extractor (a domain ref with the default --extractor inception, say)."""
        for m in plan.metrics:
            name = plan.extractor_of(m)
            if not self.paths or METRICS[m].ref is None or any(
                    self.prov[p].get("extractor") in (None, name) for p in self.paths):
                continue
            built = sorted({self.prov[p]["extractor"] for p in self.paths})
            role = METRICS[m].role
            given = ", ".join(f"{p} ({self.prov[p]['extractor']})" for p in self.paths)
            raise UserError(f"{m} uses extractor {name} ({role_option(role, name)}) but every --ref was built with "
                            f"another one ({given}): pass {role_option(role, built[0])}, or build a reference with "
                            f"python -m eval.ref DATA -o REF.npz --extractor {name}")

    def find(self, ex, resolution: int | None, metric: str, est: Estimators, *, labels: bool = False):
        """(path, Reference) holding what `metric` needs; labels=True (--per-class) also needs stored labels.
        A reference with provenance (extractor, resolution) is preferred to one without; two equally good
        ones are refused as ambiguous."""
        ok = [p for p in self.paths if self.prov[p].get("extractor") in (None, ex.name)
              and self.prov[p].get("resolution") in (None, resolution)]

        def rank(p):
            return (self.prov[p].get("extractor") is None, self.prov[p].get("resolution") is None)
        ok.sort(key=rank)
        if not ok:
            given = "; ".join(f"{p} ({self.prov[p].get('extractor') or 'any extractor'}, "
                              f"{self.prov[p].get('resolution') or 'any'} px)" for p in self.paths) or "none"
            raise UserError(f"no --ref for {metric} at resolution {resolution} with extractor {ex.name} (given: "
                            f"{given}): build one with python -m eval.ref DATA -o REF.npz --extractor {ex.name}")
        if len(ok) > 1 and rank(ok[0]) == rank(ok[1]):
            raise UserError(f"--ref {ok[0]} and --ref {ok[1]} both fit {metric} at resolution {resolution} with "
                            f"{ex.name}: give only the one to measure against")
        path, key = ok[0], (ok[0], ex.name)
        if key not in self.loaded:
            self.loaded[key] = load_reference(self.files[path], expect_extractor=ex.name, expect_dim=ex.feature_dim,
                                              expect_resize=ex.resize,
                                              expect_sha256=ex.weights_sha256,
                                              metric=_edm2_key(METRICS[metric].role))
        ref = self.loaded[key]
        need = METRICS[metric].ref
        if ((need == "features" or labels) and ref.features is None) or (need == "spatial" and ref.mu_s is None):
            if ref.format != "adm" or ref.n is None:
                what = "sFID statistics" if need == "spatial" else "features"
                raise UserError(f"reference {path} stores no {what}, needed by {metric}: rebuild it with "
                                f"python -m eval.ref ... --extractor {ex.name} --store-features N --force")
            self._extract_images(self.files[path], ref, ex)  # an ADM batch: images, no features
        check_reference(metric, ref, path, est)
        return path, ref

    @staticmethod
    def _extract_images(path: str, ref, ex) -> None:
        """Features (with arr_1 labels) of the first STORE_LIMIT images of an ADM reference batch, and their
        spatial statistics when the extractor has them (sFID of a batch without mu_s)."""
        adm = load_reference(path, load_images=True)
        x = torch.from_numpy(adm.images[:STORE_LIMIT]).permute(0, 3, 1, 2)
        want = Want(store=len(x), spatial=bool(ex.spatial_dim) and ref.mu_s is None)
        out = extract(TensorSource(x, name=path), {ex.name: ex}, {ex.name: want}, batch=250,
                      device=ex.device)[ex.name]
        ref.features = out.store.features()
        ref.labels = None if adm.image_labels is None else adm.image_labels[:STORE_LIMIT]
        if out.spatial is not None:
            ref.mu_s, ref.sigma_s = out.spatial.mean(), out.spatial.cov()


def _edm2_key(role: str) -> str | None:
    """Which statistics of an EDM2 pkl a role reads (its file holds fid and fd_dinov2)."""
    return {"main": None, "dinov2": "fd_dinov2"}.get(role)


# ---------------------------------------------------------------------------------------------
# Cells and sources.


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a checkpoint setting (None = the model's own / not applicable) or a sample set."""

    spec: str
    guidance: float | None = None
    sampler: str | None = None
    steps: int | None = None
    images: bool = False


def cells_of(ckpt: str, gen, guidance: list, samplers: list, steps: list) -> list[Cell]:
    """The sweep for one model, collapsed where an axis does not apply to it."""
    diffusion = gen.sweepable
    conditional = gen.num_classes > 0 and gen.supports_guidance
    asked = [w for w in guidance if w is not None]
    if not conditional and asked and 1.0 not in asked:  # its only scale is 1: no silent w = 1 row for a w = 2 ask
        raise UserError(f"--guidance {','.join(f'{w:g}' for w in asked)}: {ckpt} has no classifier-free guidance "
                        f"(unconditional, no label dropout, or a G trained without guided pairs), so its only scale "
                        f"is 1: add 1 to --guidance or evaluate it in a separate run")
    if not conditional and len(asked) > 1:
        print(f"note: {ckpt} has no classifier-free guidance: measured at guidance 1 only", file=sys.stderr)
    return [Cell(ckpt, w, s, n) for w in (guidance if conditional else [None]) or [None]
            for s in (samplers if diffusion else [None]) or [None]
            for n in (steps if diffusion else [None]) or [None]]


def class_prompts(num_classes: int, class_names: tuple[str, ...] | None, what: str) -> list[str]:
    """CLIP prompts per class: --prompts classes:FILE, else the bundled photos' names when the class count fits."""
    if class_names is None:
        from pagoda.data import PHOTO_CLASSES
        if num_classes != len(PHOTO_CLASSES):
            raise UserError(f"metric clip on {what} needs the names of its {num_classes} classes (known only for "
                            "the photos data set): pass --prompts classes:FILE (one per line) or --prompts "
                            "captions:FILE")
        class_names = PHOTO_CLASSES
    if len(class_names) != num_classes:
        raise UserError(f"--prompts classes:FILE has {len(class_names)} names but {what} has {num_classes} classes: "
                        "give one name per class, in class-id order")
    return [f"a photo of a {name.replace('_', ' ')}" for name in class_names]


def prompts_of(plan: Plan, source) -> tuple[list[str], str] | None:
    """(texts, "label" | "index") for the CLIP score of `source`, or None without clip."""
    if "clip" not in plan.metrics:
        return None
    if plan.captions is not None:
        if len(plan.captions) < source.num_samples:
            raise UserError(f"--prompts captions:FILE has {len(plan.captions)} lines but {source.name} has "
                            f"{source.num_samples} "
                            "images: give one caption per image (line i = image i)")
        return list(plan.captions[:source.num_samples]), "index"
    if not source.num_classes:
        raise UserError(f"metric clip on {source.name}: the images have no class labels: pass --prompts captions:FILE "
                        "(one caption per image) or drop clip")
    return class_prompts(source.num_classes, plan.class_names, source.name), "label"


# ---------------------------------------------------------------------------------------------
# Checking a cell before sampling, and scoring it.


def check_cell(plan: Plan, source, extractors: dict, refs: References, what: str, option: str) -> None:
    """Every refusal that does not need the images: extractors, references, counts, labels, prompts."""
    for m in plan.metrics:
        check_extractor(m, extractors[plan.extractor_of(m)])
        if METRICS[m].ref is not None:
            refs.find(extractors[plan.extractor_of(m)], source.resolution, m, plan.est,
                      labels=plan.per_class and m in PER_CLASS)
    check_request(list(plan.metrics), extractors, plan.roles, plan.est, source.num_samples,
                  allow_small=plan.allow_small, what=what, option=option)
    prompts_of(plan, source)
    if plan.per_class:
        check_per_class(plan, source, extractors, refs, what)


def check_per_class(plan: Plan, source, extractors: dict, refs: References, what: str) -> None:
    """UserError unless the samples have classes and each reference --per-class uses has labels of as many."""
    if not source.num_classes:
        raise UserError(f"--per-class: {what} has no class labels (an unconditional model, or images "
                        "without arr_1 / class folders): drop --per-class")
    ex = extractors[plan.roles["main"]]
    for m in set(PER_CLASS) & set(plan.metrics):
        path, ref = refs.find(ex, source.resolution, m, plan.est, labels=True)
        if ref.labels is None:
            raise UserError(f"--per-class: reference {path} stores no class labels: rebuild it with "
                            f"`python -m eval.ref DATASET -o {path} --force` from a labelled source (photos, an "
                            "ImageNet-layout folder or an ADM npz with arr_1)")
        ref_classes = ref.provenance.get("num_classes") or int(ref.labels.max()) + 1
        if ref_classes > source.num_classes or ref.provenance.get("num_classes", source.num_classes) \
                != source.num_classes:
            raise UserError(f"--per-class: reference {path} has {ref_classes} classes but {what} has "
                            f"{source.num_classes}: use a reference of the data set the model was trained on")


def score_cell(plan: Plan, source, extractors: dict, refs: References, *, device, seed: int | None,
               on_batch=None) -> list[dict]:
    """Stream the source once through every needed extractor and turn the outputs into rows."""
    need = wants(list(plan.metrics), plan.roles, plan.est, num_samples=source.num_samples,
                 per_class=plan.per_class, prompts=prompts_of(plan, source))
    outs = extract(source, {n: extractors[n] for n in need}, need, batch=plan.batch, device=device,
                   on_batch=on_batch, cache=plan.cache)
    dtype = str(getattr(getattr(source, "generator", None), "dtype", torch.float32)).removeprefix("torch.")
    base = dict(source.row_fields(), batch=plan.batch, dtype=dtype, device=str(device), seed=seed)
    rows = []
    for metric in plan.metrics:
        ex = extractors[plan.extractor_of(metric)]
        out, path, ref = outs[ex.name], None, None
        if METRICS[metric].ref is not None:
            path, ref = refs.find(ex, source.resolution, metric, plan.est)
        made = score(metric, out, ref, plan.est)
        if plan.per_class and metric in PER_CLASS:
            _, ref = refs.find(ex, source.resolution, metric, plan.est, labels=True)
            made += class_rows(metric, out.store.features(), out.stored_labels(), ref, source.num_classes, plan.est)
        for name, value, lo, hi, extra in made:
            extra = dict(extra, resize=ex.resize, weights_trust=ex.weights_trust,
                         **refs.about(path), **source.row_extra())
            rows.append(make_row(metric=name, value=value, ci_low=lo, ci_high=hi, reference=path, extractor=ex.name,
                                 extractor_sha256=ex.weights_sha256, extra=extra, **base))
    return rows


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


# ---------------------------------------------------------------------------------------------
# Command line.


def csv_of(kind):
    """argparse type: a comma-separated list of `kind` values."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except argparse.ArgumentTypeError as e:  # the item's own message names the fix
            raise argparse.ArgumentTypeError(f"in {text!r}: {e}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list: give at least one value")
        return values
    return parse


def labels_arg(text: str) -> str:
    """argparse type: how a conditional model's labels are chosen."""
    if text not in ("seed", "balanced"):
        raise argparse.ArgumentTypeError(f"{text!r}: use seed (drawn per sample, default) or balanced")
    return text


def lines_arg(text: str) -> tuple[str, ...]:
    """argparse type: the non-empty lines of a UTF-8 text file."""
    try:
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {text} as UTF-8 text ({type(e).__name__})") from None
    lines = tuple(line.strip() for line in lines if line.strip())
    if not lines:
        raise argparse.ArgumentTypeError(f"{text} holds no lines")
    return lines


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared by eval.fid and eval.run: sampling, extraction and output."""
    p.add_argument("--num-samples", type=sample_count, default=None,
                   help=f"images to generate per checkpoint cell (default {DEFAULT_SAMPLES}); "
                        "with --images: the first N (default all)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per batch per process (no effect on results)")
    p.add_argument("--seed", type=int, default=None, help="checkpoints: sample i uses seed + i (default 0)")
    p.add_argument("--labels", type=labels_arg, default=None,
                   help="labels of a conditional checkpoint: seed (drawn per sample, default) or balanced "
                        "(equal class counts in a seeded random order)")
    add_weights_args(p)
    p.add_argument("-o", "--out", default="results/eval.jsonl", help="JSONL file the result rows are appended to")
    p.add_argument("--allow-small", action="store_true", help="run even with fewer samples than feature dimensions")
    add_cache_arg(p)


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    """--no-cache: extract a sample store's features again instead of reading / writing the feature cache."""
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache of sample stores "
                   "(default: $PAGODA_FEATURES, else ~/.cache/pagoda/features; keyed by content)")


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--weights-dir and --offline: where extractor weights and named references are looked for and fetched."""
    p.add_argument("--weights-dir", default=None, help="folder of extractor weights and named references (default: "
                   "$PAGODA_WEIGHTS, else ~/.cache/pagoda, then ./weights; missing files are fetched into it)")
    p.add_argument("--offline", action="store_true", help="never touch the network (= PAGODA_OFFLINE=1): a missing "
                   "file is named with its hash and where to copy it")


def apply_offline(args) -> None:
    """--offline: set PAGODA_OFFLINE=1 for this process and the ones it starts."""
    if getattr(args, "offline", False):
        os.environ["PAGODA_OFFLINE"] = "1"


def make_extractors(names: set[str], *, weights_dir, device, resize: str | None) -> dict:
    """Build each named extractor once; --resize goes to the extractors that take it."""
    from eval.extractors import EXTRACTORS, get_extractor
    out = {}
    for name in sorted(names):
        if name not in EXTRACTORS:
            raise UserError(f"unknown extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
        opts = {"resize": resize} if resize and "resize" in EXTRACTORS[name].options else {}
        out[name] = get_extractor(name, weights_dir=weights_dir, device=device, **opts)
    if resize and not any("resize" in EXTRACTORS[n].options for n in names):
        raise UserError(f"--resize {resize}: none of the extractors {sorted(names)} has a choice of resize: drop it")
    return out


def check_bootstrap(rounds: int) -> None:
    """UserError unless --bootstrap is 0 (off) or enough rounds for a percentile interval."""
    if bootstrap_error(rounds):
        raise UserError(f"--bootstrap {rounds}: {bootstrap_error(rounds)}")


def refuse_checkpoint_options(args, what: str) -> None:
    """UserError for sampling options given with sample files only (they would be silently ignored)."""
    given = [opt for opt, v in (("--guidance", args.guidance), ("--sampler", args.sampler), ("--steps", args.steps),
                                ("--labels", args.labels), ("--seed", args.seed)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)}: sampling option(s) for checkpoints only, not for {what}: drop them")


def extractor_spec(text: str) -> tuple[dict, str | None]:
    """argparse type: `NAME[,ROLE=NAME...][,resize=R]` -> ({role: name}, resize). NAME is the main extractor
    (fid, sfid, kid, is, pr, dc); ROLE is dinov2 (fd_dinov2), clip (clip) or cmmd (cmmd); resize is the image
    convention of the extractors that offer one (DINOv2: pil-bicubic, edm2-torch)."""
    roles, resize = {}, None
    for i, item in enumerate(filter(None, (t.strip() for t in text.split(",")))):
        key, eq, value = item.partition("=")
        if not eq and i == 0:
            roles["main"] = key
        elif key == "resize" and value and resize is None:
            resize = value
        elif key in DEFAULT_ROLES and value and key not in roles:
            roles[key] = value
        else:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: write NAME[,dinov2=NAME][,clip=NAME]"
                                             "[,cmmd=NAME][,resize=MODE], each once (e.g. domain,dinov2=dinov2-vitb14)")
    if not roles and resize is None:
        raise argparse.ArgumentTypeError(f"{text!r} names no extractor: write NAME[,dinov2=NAME][,clip=NAME]"
                                         "[,cmmd=NAME][,resize=MODE] (e.g. inception or domain)")
    return roles, resize


def prompts_arg(text: str) -> tuple[str, tuple[str, ...]]:
    """argparse type: `classes:FILE` (one class name per line) or `captions:FILE` (one caption per image)."""
    kind, colon, path = text.partition(":")
    if not colon or kind not in ("classes", "captions"):
        raise argparse.ArgumentTypeError(f"{text!r}: write classes:FILE (one class name per line, class-id order) or "
                                         "captions:FILE (one caption per image)")
    return kind, lines_arg(path)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint to evaluate (repeatable)")
    p.add_argument("--images", action="append", default=[], help="samples (repeatable): an image folder, EDM2's "
                   "nested seed folders, an ADM npz, a .zip / .tar, webdataset shards a-{000..009}.tar")
    p.add_argument("--ref", action="append", default=[], help="reference statistics (repeatable, see above), or a "
                   "named one: imagenet64|128|256|512, edm2-img64|512 (python -m eval.ref --list)")
    p.add_argument("--metrics", type=metric_list, default=["fid"], help=f"comma list from {','.join(METRICS)}")
    p.add_argument("--extractor", type=extractor_spec, default=({}, None),
                   help="NAME[,dinov2=NAME][,clip=NAME][,cmmd=NAME][,resize=MODE]: the extractor of fid/sfid/kid/"
                        "is/pr/dc (default inception), of fd_dinov2 (dinov2 = ViT-L/14), clip (clip = ViT-L/14) and "
                        "cmmd (clip-vitl14-336), and DINOv2's image convention (pil-bicubic or edm2-torch)")
    p.add_argument("--guidance", type=csv_of(guidance_scale), default=None, help="CFG scales, e.g. 1,1.5,2")
    p.add_argument("--sampler", type=csv_of(sampler_spec), default=None, help="comma-separated: " + SAMPLER_HELP)
    p.add_argument("--steps", type=csv_of(positive_int), default=None, help="diffusion sampler steps, e.g. 8,18")
    p.add_argument("--estimator", type=estimators_arg, default=Estimators(),
                   help="estimator parameters, e.g. kid_subset=1000,kid_subsets=100,is_splits=10,is_style=adm,pr_k=3,"
                        "dc_k=5,bootstrap=100 (bootstrap rounds of the fid/fd/P-R/D-C CIs; 0 = none)")
    p.add_argument("--per-class", action="store_true",
                   help="also one fid / pr row per class (class-labelled samples, reference with labels)")
    p.add_argument("--prompts", type=prompts_arg, default=None,
                   help="clip: classes:FILE (one class name per line) or captions:FILE (one caption per image)")
    add_common_args(p)
    args = p.parse_args(argv)
    if not args.ckpt and not args.images:
        p.error("give at least one --ckpt or --images")
    check_rows_output(args.out)
    apply_offline(args)
    if args.per_class and not set(PER_CLASS) & set(args.metrics):
        p.error("--per-class applies to fid and pr: add one of them to --metrics")
    if not args.ckpt:
        refuse_checkpoint_options(args, "--images")
    from eval.api import Evaluator
    roles, resize = args.extractor
    kind, lines = args.prompts or (None, None)
    ev = Evaluator(args.ref, args.metrics, extractor=roles, resize=resize, estimator=args.estimator,
                   per_class=args.per_class, class_names=lines if kind == "classes" else None,
                   captions=lines if kind == "captions" else None, batch=args.batch, allow_small=args.allow_small,
                   weights_dir=args.weights_dir, cache=not args.no_cache)
    rows = run(ev, ckpts=args.ckpt, images=args.images, num_samples=args.num_samples, seed=args.seed or 0,
               labels=args.labels or "seed", guidance=args.guidance or [None], samplers=args.sampler or [None],
               steps=args.steps or [None])
    if is_main():
        append_rows(args.out, rows)
        print(format_table([r for r in rows if not r["metric"].endswith("_class")]))
        if args.per_class:
            print(f"\nworst 5 classes per metric (all classes in {args.out}):")
            print(format_table(worst_classes(rows)))
        print(f"{len(rows)} rows -> {args.out}")
    return 0


def run(ev, *, ckpts: list[str], images: list[str], num_samples: int | None, seed: int, labels: str,
        guidance: list, samplers: list, steps: list, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Check every cell with the Evaluator `ev` (eval.api), then measure them in order; the rows of all cells.
    Each checkpoint is loaded once to plan and check its cells (the sampler and steps of a cell change nothing
    that is checked) and once per cell to measure it; each sample set is opened once. dtype: the checkpoints'
    sampling dtype (autocast)."""
    from pagoda.generator import load_generator

    def generator_source(gen, cell: Cell) -> GeneratorSource:
        return GeneratorSource(gen, num_samples or DEFAULT_SAMPLES, seed=seed, labels=labels, guidance=cell.guidance,
                               name=cell.spec)

    cells, image_sources = [], {}
    for ckpt in ckpts:
        gen = load_generator(ckpt, device=ev.device)
        for cell in cells_of(ckpt, gen, guidance, samplers, steps):  # every refusal before any image is made
            gen.check_guidance(cell.guidance)  # e.g. a w outside a guidance-conditioned G's trained range
            with generator_source(gen, cell) as source:
                ev.check(source, what=ckpt, option="--num-samples")
            cells.append(cell)
    for spec in images:
        source = open_source(spec, num_samples=num_samples)
        ev.check(source, what=spec, option="--num-samples (or more images)")
        image_sources[spec] = source
        cells.append(Cell(spec, images=True))
    rows = []
    for cell in cells:
        if cell.images:  # every cell was checked above
            rows += ev.measure(image_sources[cell.spec], check=False)
            continue
        gen = load_generator(cell.spec, sampler=cell.sampler, steps=cell.steps, device=ev.device, dtype=dtype)
        rows += ev.measure(generator_source(gen, cell), seed=seed, check=False)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
