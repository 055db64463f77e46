"""One measurement of a sample set, the library under eval.run and eval.api: what is measured (Plan), the
references by metric (References), the cells a checkpoint is swept over (Cell), the checks every request passes
before any image is generated, and the scoring of one cell into rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.catalog import refetch_hint, resolve_ref
from eval.fdr import FDR, check_fdr, fdr_row
from eval.pipeline import Want, check_sample_count, extract
from eval.registry import (
    METRICS,
    PER_CLASS,
    STORE_LIMIT,
    Estimators,
    check_extractor,
    check_reference,
    check_request,
    class_rows,
    role_option,
    score,
    wants,
)
from eval.rows import make_row, versions
from eval.sources import TensorSource
from eval.stats import load_reference
from pagoda.errors import UserError

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
    fdr: tuple[str, ...] = ()  # the extractors FDr_k averages over (eval.fdr); () = no fdr row

    def extractor_of(self, metric: str) -> str:
        return self.roles[METRICS[metric].role]


class References:
    """The --ref files, each found by the extractor, resize and resolution its provenance records. A --ref may
    name a published reference (eval.catalog: fetched on first use into `weights_dir`, else the cache); rows
    and messages name it as given."""

    def __init__(self, paths: list[str], weights_dir=None, option: str = "--ref"):
        self.paths, self.prov, self.files, self.trust = list(paths), {}, {}, {}
        self.option = option  # how messages name these files: --ref, --train-ref or --val-ref
        self.digests = {}  # id(Reference) -> (Reference, stats_sha256): each loaded reference hashed once
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

    def name(self, path: str | None) -> str | None:
        """The name rows give the reference `path` (as given), never a path of the machine that made it: a catalog
        name as is, the data-set spec it was built from (photos:heldout:16), else its file's name."""
        if path is None or self.trust[path] is not None:
            return path
        source = str(self.prov[path].get("source") or "")
        return source if source.split(":")[0] == "photos" else Path(path).name

    def about(self, path: str | None, ref) -> dict:
        """Row `extra` of the reference `path` (as given) as loaded (`ref`): the SHA-256 of its statistics (mu,
        sigma: eval.stats.Reference.stats_sha256), and how a named one is trusted."""
        if path is None:
            return {}
        if id(ref) not in self.digests:
            self.digests[id(ref)] = (ref, ref.stats_sha256())  # holding ref keeps its id from being reused
        out = {"reference_sha256": self.digests[id(ref)][1]}
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

    def find(self, ex, resolution: int | None, metric: str, est: Estimators, *, labels: bool = False,
             what: str | None = None):
        """(path, Reference) holding what `metric` needs; labels=True (--per-class) also needs stored labels.
        A reference with provenance (extractor, resolution) is preferred to one without; two equally good
        ones are refused as ambiguous. `what` names the metric in messages (default `metric`: fdr finds its
        statistics as fid does)."""
        what, opt = what or metric, self.option
        ok = [p for p in self.paths if self.prov[p].get("extractor") in (None, ex.name)
              and self.prov[p].get("resolution") in (None, resolution)]
        # refs of both image conventions may be given (eval.diff --measure): take the extractor's; with none of
        # it, load_reference below names the mismatch
        ok = [p for p in ok if self.prov[p].get("resize") in (None, str(ex.resize))] or ok

        def rank(p):
            return (self.prov[p].get("extractor") is None, self.prov[p].get("resolution") is None)
        ok.sort(key=rank)
        if not ok:
            given = "; ".join(f"{p} ({self.prov[p].get('extractor') or 'any extractor'}, "
                              f"{self.prov[p].get('resolution') or 'any'} px)" for p in self.paths) or "none"
            raise UserError(f"no {opt} for {what} at resolution {resolution} with extractor {ex.name} (given: "
                            f"{given}): build one with python -m eval.ref DATA -o REF.npz --extractor {ex.name}")
        if len(ok) > 1 and rank(ok[0]) == rank(ok[1]):
            raise UserError(f"{opt} {ok[0]} and {opt} {ok[1]} both fit {what} at resolution {resolution} with "
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
                stored = "sFID statistics" if need == "spatial" else "features"
                raise UserError(f"reference {path} stores no {stored}, needed by {metric}: rebuild it with "
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
    given = [o for o, v in (("--sampler", samplers), ("--steps", steps)) if any(x is not None for x in v)]
    if given and not diffusion:  # a sweep may hold a teacher they apply to: said, not refused
        print(f"note: {ckpt} samples in one network call: {' and '.join(given)} do not apply to it", file=sys.stderr)
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


def check_cell(plan: Plan, source, extractors: dict, refs: References, what: str, option: str,
               fdr_refs: tuple[References, References] | None = None) -> None:
    """Every refusal that does not need the images: extractors, references, counts, labels, prompts. fdr_refs:
    the training and validation references of metric fdr."""
    if plan.fdr:
        check_fdr(plan.fdr, extractors, source.resolution, *fdr_refs, plan.est)
        for name in plan.fdr:
            check_sample_count(source.num_samples, extractors[name].feature_dim, allow_small=plan.allow_small,
                               what=what, option=option, metric="FDR")
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
               on_batch=None, fdr_refs: tuple[References, References] | None = None) -> list[dict]:
    """Stream the source once through every needed extractor and turn the outputs into rows (fdr's last, against
    fdr_refs: its training and validation references)."""
    need = wants(list(plan.metrics), plan.roles, plan.est, num_samples=source.num_samples,
                 per_class=plan.per_class, prompts=prompts_of(plan, source))
    for name in plan.fdr:  # its spaces need the mean / covariance sums only, which every extraction keeps
        need.setdefault(name, Want())
    outs = extract(source, {n: extractors[n] for n in need}, need, batch=plan.batch, device=device,
                   on_batch=on_batch, cache=plan.cache)
    base = dict(source.row_fields(), batch=plan.batch, dtype=source.dtype, device=str(device), seed=seed)
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
            extra = dict(extra, **protocol_extra(source, ex), **refs.about(path, ref), **source.row_extra())
            rows.append(make_row(metric=name, value=value, ci_low=lo, ci_high=hi, reference=refs.name(path),
                                 extractor=ex.name, extractor_sha256=ex.weights_sha256, extra=extra, **base))
    if plan.fdr:
        value, fields, extra = fdr_row(plan.fdr, outs, extractors, source.resolution, *fdr_refs, plan.est)
        extra = {**protocol_extra(source, extractors[plan.fdr[0]], plan.fdr), **source.row_extra(), **extra}
        rows.append(make_row(metric=FDR, value=value, **fields, extra=extra, **base))
    return rows


def protocol_extra(source, ex, spaces: tuple[str, ...] = ()) -> dict:
    """The protocol entries (pagoda.rows.PROTOCOL) a row gets from its extractor and the model behind the samples:
    image convention, feature dtype, how far the weights are trusted, the selection (one run: single; eval.run
    --repeat writes the others), whether the model trained on these features (on any of `spaces` for FDr; unknown
    for stored samples), and the package versions."""
    extra = dict(resize=ex.resize, feature_dtype=ex.feature_dtype, weights_trust=ex.weights_trust,
                 selection="single", versions=versions())
    if source.feature_nets is not None:
        extra["trained_on_evaluator"] = any(name in source.feature_nets for name in spaces or (ex.name,))
    return extra


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
