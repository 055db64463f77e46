"""The metric registry: one entry per metric, and the checks and row making that eval.run / eval.fid share.

Each `Metric` declares the extractor role that measures it (`main` = --extractor, or the DINOv2 /
CLIP / CMMD networks), what the streaming pass must keep for it (mean / covariance sums, stored
features, logits, spatial sums, image-text cosines), what it needs of the extractor and of the
reference, the sample counts below which it is undefined, and how it turns an extraction into rows.
The CLIs never branch on metric names: they plan with `wants`, refuse impossible requests with
`check_extractor` / `check_reference` / `check_request` before any image is generated, and call `Metric.score`.

Estimator parameters (KID subsets, IS splits and style, k of P/R and D/C, bootstrap rounds) live in
one frozen `Estimators` and are written into every row's `extra`, so that eval.gate can refuse to
compare rows measured with different estimators. Conventions: METHOD.md §5.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from eval.metrics import (
    clip_score,
    cmmd,
    dc_bootstrap,
    density_coverage,
    fid_bootstrap,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    per_class,
    pr_bootstrap,
    precision_recall,
)
from eval.pipeline import Want, check_sample_count, is_main
from pagoda.errors import UserError

STORE_LIMIT = 50_000  # features kept per set for KID / P-R / D-C / CMMD (memory ~ STORE_LIMIT x D x 4 bytes)


@dataclass(frozen=True)
class Estimators:
    """Parameters of the estimators; defaults are the field's (METHOD.md §5)."""

    kid_subset: int = 1000  # KID: rows per subset (torch-fidelity / clean-fid default)
    kid_subsets: int = 100  # KID: number of subsets
    kid_seed: int = 2020  # KID: RandomState seed of the subset draw (torch-fidelity's)
    is_splits: int = 10  # IS: number of splits
    is_style: str = "adm"  # IS: adm = contiguous splits; torch-fidelity = shuffled with seed 2020
    pr_k: int = 3  # precision / recall: k of the k-NN radii (Kynkaanniemi et al.)
    dc_k: int = 5  # density / coverage: k (Naeem et al.)
    bootstrap: int = 0  # bootstrap rounds of the confidence intervals (0 = none)


def bootstrap_error(rounds: int) -> str | None:
    """Why `rounds` bootstrap rounds cannot give a percentile interval, None when they can (0 = no interval)."""
    if rounds != 0 and rounds < 10:
        return "use 0 (no interval) or at least 10 rounds (100+ for a usable 95% CI)"
    return None


def estimators_arg(text: str) -> Estimators:
    """argparse type: `kid_subset=500,is_splits=5,is_style=torch-fidelity,bootstrap=100` -> Estimators (others
    default); bootstrap is 0 (no interval) or at least 10 rounds."""
    known = {f.name: f.type for f in fields(Estimators)}
    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: write key=value with key one of {', '.join(known)}")
        if key in values:
            raise argparse.ArgumentTypeError(f"{key} is given twice: give each estimator parameter once")
        if key == "is_style":
            if value not in ("adm", "torch-fidelity"):
                raise argparse.ArgumentTypeError(f"is_style={value}: use adm or torch-fidelity")
            values[key] = value
            continue
        try:
            values[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {key} must be an integer") from None
        if key == "bootstrap" and bootstrap_error(values[key]):
            raise argparse.ArgumentTypeError(f"{item!r}: {bootstrap_error(values[key])}")
        if values[key] < (0 if key in ("kid_seed", "bootstrap") else 1):
            raise argparse.ArgumentTypeError(f"{item!r}: {key} must be >= 1")
    return Estimators(**values)


@dataclass
class Scored:
    """What a metric's score function sees: the extraction of its extractor, its reference, the parameters."""

    out: object  # eval.pipeline.Extraction
    ref: object | None  # eval.stats.Reference
    est: Estimators


Row = tuple[str, float, float | None, float | None, dict]  # (row metric, value, ci_low, ci_high, extra)


@dataclass(frozen=True)
class Metric:
    """One metric: which extractor measures it, what it keeps and needs, and how it makes rows."""

    name: str
    role: str  # "main" (--extractor), "dinov2", "clip" or "cmmd"
    keeps: Callable[[Estimators], set[str]]  # subset of {"features", "logits", "spatial", "cos"}
    ref: str | None  # what the reference must hold: "stats", "spatial", "features" or None
    needs: str | None  # the extractor attribute it needs: "num_logits", "spatial_dim", "encode_text" or None
    min_samples: Callable[[Estimators], int]  # fewest generated samples it is defined for
    min_ref: Callable[[Estimators], int]  # fewest stored reference features it is defined for
    option: str  # the option that fixes a count error
    score: Callable[[Scored], list[Row]]
    frechet: bool = False  # a Frechet distance (the covariance check on sample counts applies)
    by_class: Callable[[Estimators], ClassSplit] | None = None  # how --per-class splits it (None: it does not)


@dataclass(frozen=True)
class ClassSplit:
    """How a metric is measured per class: its row names, the fewest samples per class on each side, the function
    of (fake features, real features) and the extra every row carries."""

    names: tuple[str, ...]
    min_count: int
    fn: Callable
    extra: dict


def _frechet(s: Scored, name: str) -> list[Row]:
    """FID / FD-DINOv2 of the streamed sums against the reference statistics, with a bootstrap CI if asked."""
    fd = frechet_distance(s.out.stats.mean(), s.out.stats.cov(), s.ref.mu, s.ref.sigma)
    lo = hi = None
    if s.est.bootstrap:
        _, lo, hi = fid_bootstrap(s.out.store.features(), s.ref.mu, s.ref.sigma, rounds=s.est.bootstrap)
    return [(name, fd, lo, hi, {"bootstrap": s.est.bootstrap})]


def _sfid(s: Scored) -> list[Row]:
    """sFID (ADM evaluator): Frechet distance of the spatial features against the reference mu_s / sigma_s."""
    fd = frechet_distance(s.out.spatial.mean(), s.out.spatial.cov(), s.ref.mu_s, s.ref.sigma_s)
    return [("sfid", fd, None, None, {"layer": "mixed_6/conv[..., :7]", "bootstrap": 0})]


def _kid(s: Scored) -> list[Row]:
    e = s.est
    mean, std = kid(s.ref.features, s.out.store.features(), subsets=e.kid_subsets, subset_size=e.kid_subset,
                    seed=e.kid_seed)
    return [("kid", mean, None, None, {"std": std, "subset_size": e.kid_subset, "subsets": e.kid_subsets,
                                       "kid_seed": e.kid_seed})]


def _pair(names: tuple[str, str], fn, boot, k_of: str, s: Scored) -> list[Row]:
    """Two fidelity / diversity numbers (P/R or D/C; k = est.<k_of>), with membership-bootstrap CIs when asked."""
    k = getattr(s.est, k_of)
    real, fake, extra = s.ref.features, s.out.store.features(), {"k": k, "bootstrap": s.est.bootstrap}
    if s.est.bootstrap:
        return [(n, v, lo, hi, extra) for n, (v, lo, hi) in zip(names, boot(real, fake, k=k, rounds=s.est.bootstrap))]
    return [(n, v, None, None, extra) for n, v in zip(names, fn(real, fake, k=k))]


def _is(s: Scored) -> list[Row]:
    mean, std = inception_score(s.out.logits.features(), splits=s.est.is_splits, style=s.est.is_style)
    return [("is", mean, None, None, {"std": std, "splits": s.est.is_splits, "style": s.est.is_style})]


def _clip(s: Scored) -> list[Row]:
    return [("clip", clip_score(s.out.cos.features().flatten()), None, None, {})]


def _cmmd(s: Scored) -> list[Row]:
    return [("cmmd", cmmd(s.ref.features, s.out.store.features()), None, None, {"sigma": 10.0, "scale": 1000.0})]


def _store_if_bootstrap(e: Estimators) -> set[str]:
    return {"features"} if e.bootstrap else set()


_one = lambda e: 1  # noqa: E731
_two = lambda e: 2  # noqa: E731
_none = lambda e: 0  # noqa: E731

def _fid_by_class(est: Estimators) -> ClassSplit:
    return ClassSplit(("fid_class",), 2, fid_from_features, {})


def _pr_by_class(est: Estimators) -> ClassSplit:
    return ClassSplit(("precision_class", "recall_class"), est.pr_k + 1, partial(precision_recall, k=est.pr_k),
                      {"k": est.pr_k})


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fid", role="main", keeps=_store_if_bootstrap, ref="stats", needs=None, min_samples=_two, min_ref=_none,
           option="--num-samples", score=partial(_frechet, name="fid"), frechet=True, by_class=_fid_by_class),
    Metric("sfid", role="main", keeps=lambda e: {"spatial"}, ref="spatial", needs="spatial_dim", min_samples=_two,
           min_ref=_none, option="--num-samples", score=_sfid, frechet=True),
    Metric("kid", role="main", keeps=lambda e: {"features"}, ref="features", needs=None,
           min_samples=lambda e: e.kid_subset, min_ref=lambda e: e.kid_subset, option="--estimator kid_subset=N",
           score=_kid),
    Metric("is", role="main", keeps=lambda e: {"logits"}, ref=None, needs="num_logits",
           min_samples=lambda e: e.is_splits, min_ref=_none, option="--estimator is_splits=N", score=_is),
    Metric("pr", role="main", keeps=lambda e: {"features"}, ref="features", needs=None,
           min_samples=lambda e: e.pr_k + 1, min_ref=lambda e: e.pr_k + 1, option="--estimator pr_k=K",
           score=partial(_pair, ("precision", "recall"), precision_recall, pr_bootstrap, "pr_k"),
           by_class=_pr_by_class),
    Metric("dc", role="main", keeps=lambda e: {"features"}, ref="features", needs=None, min_samples=_one,
           min_ref=lambda e: e.dc_k + 1, option="--estimator dc_k=K",
           score=partial(_pair, ("density", "coverage"), density_coverage, dc_bootstrap, "dc_k")),
    Metric("fd_dinov2", role="dinov2", keeps=_store_if_bootstrap, ref="stats", needs=None, min_samples=_two,
           min_ref=_none, option="--num-samples", score=partial(_frechet, name="fd_dinov2"), frechet=True),
    Metric("clip", role="clip", keeps=lambda e: {"cos"}, ref=None, needs="encode_text", min_samples=_one,
           min_ref=_none, option="--num-samples", score=_clip),
    Metric("cmmd", role="cmmd", keeps=lambda e: {"features"}, ref="features", needs=None, min_samples=_one,
           min_ref=_one, option="--num-samples", score=_cmmd),
)}
PER_CLASS = tuple(name for name, m in METRICS.items() if m.by_class is not None)  # what --per-class splits by class


def metric_list(text: str) -> list[str]:
    """argparse type: a comma list of registered metric names and `fdr` (eval.fdr: it spans several extractors, so
    it is no single-extractor entry here), unique, in the given order."""
    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in names if m not in METRICS and m != "fdr"]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {bad}: choose from {','.join(METRICS)},fdr")
    return names


def score(metric: str, out, ref, est: Estimators) -> list[Row]:
    """The rows of one metric from its extraction `out` and reference `ref` (None for IS / CLIP)."""
    return METRICS[metric].score(Scored(out, ref, est))


# ---------------------------------------------------------------------------------------------
# Planning: what each extractor keeps.


def wants(metrics: list[str], roles: dict[str, str], est: Estimators, *, num_samples: int, per_class: bool,
          prompts: tuple[list[str], str] | None) -> dict[str, Want]:
    """One Want per extractor name: the union of what its metrics keep. `roles` maps role -> extractor name;
    `prompts` is (texts, "label" | "index") for the CLIP score."""
    keep: dict[str, set[str]] = {}
    for m in metrics:
        keep.setdefault(roles[METRICS[m].role], set()).update(METRICS[m].keeps(est))
    if per_class and set(PER_CLASS) & set(metrics):
        keep[roles["main"]].add("labels")
    store = min(num_samples, STORE_LIMIT)
    out = {}
    for name, k in keep.items():
        texts = prompts if "cos" in k else None
        out[name] = Want(store=store if k & {"features", "labels"} else 0, labels="labels" in k,
                         logits="logits" in k, spatial="spatial" in k,
                         texts=None if texts is None else texts[0], text_by="label" if texts is None else texts[1])
    return out


# ---------------------------------------------------------------------------------------------
# Refusing impossible requests before any sampling.

# The extractor of each role when none is named: main (fid, sfid, kid, is, pr, dc), dinov2, clip, cmmd.
DEFAULT_ROLES = {"main": "inception", "dinov2": "dinov2", "clip": "clip", "cmmd": "clip-vitl14-336"}


def role_option(role: str, name: str) -> str:
    """How a command line picks extractor `name` for `role`: `--extractor NAME` for the main role (fid, sfid, kid,
    is, pr, dc), `--extractor ...,ROLE=NAME` for dinov2 / clip / cmmd (eval.run's extractor spec)."""
    return f"--extractor {name}" if role == "main" else f"--extractor ...,{role}={name}"
CAPABILITY = {"num_logits": "logits", "spatial_dim": "spatial features", "encode_text": "a text encoder"}


def check_extractor(metric: str, ex) -> None:
    """UserError when the extractor picked for `metric` cannot measure it (no logits for IS, say). `ex` is a
    built extractor (its attributes are checked), or a registry name (checked against the metrics its entry
    declares, before any weights are loaded; an unknown name is refused there)."""
    from eval.extractors import EXTRACTORS
    m = METRICS[metric]
    if isinstance(ex, str) and ex not in EXTRACTORS:
        raise UserError(f"unknown extractor {ex!r} for {metric}: choose one of {', '.join(EXTRACTORS)}")
    if not m.needs:
        return
    if isinstance(ex, str):
        name, fits = ex, metric in EXTRACTORS[ex].metrics
    else:
        name, fits = ex.name, bool(getattr(ex, m.needs, None))
    if not fits:
        ok = [n for n, e in EXTRACTORS.items() if metric in e.metrics]
        raise UserError(f"metric {metric} needs an extractor with {CAPABILITY[m.needs]}, which "
                        f"{role_option(m.role, name)} lacks: pass {role_option(m.role, ' or '.join(ok) or '?')} "
                        f"or drop {metric} from --metrics")


def check_request(metrics: list[str], extractors: dict, roles: dict[str, str], est: Estimators, n: int, *,
                  allow_small: bool, what: str, option: str = "--num-samples") -> None:
    """UserError for every metric that is undefined at `n` generated samples; the message names the option to
    change. (Whether the extractor can measure the metric at all is `check_extractor`'s, called first.)"""
    for metric in metrics:
        m, ex = METRICS[metric], extractors[roles[METRICS[metric].role]]
        if m.frechet:
            dim = ex.spatial_dim if m.ref == "spatial" else ex.feature_dim
            check_sample_count(n, dim, allow_small=allow_small, what=what, option=option, metric=metric.upper())
        elif n < m.min_samples(est):
            fix = option if m.option == "--num-samples" else f"{option} >= {m.min_samples(est)} or a smaller {m.option}"
            raise UserError(f"{what}: {metric} needs at least {m.min_samples(est)} samples ({_why(metric, est)}), "
                            f"got {n}: use {fix}")


def _why(metric: str, est: Estimators) -> str:
    return {"kid": f"subset size {est.kid_subset}", "is": f"{est.is_splits} splits",
            "pr": f"more than k = {est.pr_k}", "dc": f"more than k = {est.dc_k}"}.get(metric, "one at least")


def check_reference(metric: str, ref, path: str, est: Estimators) -> None:
    """UserError when the reference lacks what the metric needs or stores too few features for it."""
    m = METRICS[metric]
    if m.ref == "spatial" and ref.mu_s is None and ref.images is None and ref.n is None:
        raise UserError(f"reference {path} has no sFID statistics (mu_s / sigma_s): rebuild it with "
                        "`python -m eval.ref DATASET -o REF.npz --extractor inception --force`, or use an ADM batch")
    if m.ref == "features" and ref.features is not None and len(ref.features) < m.min_ref(est):
        raise UserError(f"reference {path} stores {len(ref.features)} features, too few for {metric} "
                        f"({_why(metric, est)}): use a smaller {m.option} or rebuild the reference with "
                        f"--store-features >= {m.min_ref(est)}")


# ---------------------------------------------------------------------------------------------
# Per-class rows (class-conditional models against a labelled reference).


def class_rows(metric: str, fake, y_fake, ref, num_classes: int, est: Estimators) -> list[Row]:
    """(row metric, value, None, None, extra) for each class with enough samples on both sides; warns about
    the others. A class has fewer samples than dimensions: its FID is biased upwards (compare between models)."""
    split = METRICS[metric].by_class(est)
    names, min_count, fn, extra0 = split.names, split.min_count, split.fn, split.extra
    with warnings.catch_warnings():  # one class has fewer samples than dimensions: documented
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
    rows = []
    for c, vals in sorted(values.items()):
        extra = dict(extra0, **{"class": c, "class_name": class_names[c] if c < len(class_names) else None,
                                "num_fake": int(n_fake[c]), "num_real": int(n_real[c])})
        rows += [(name, float(v), None, None, extra) for name, v in zip(names, np.atleast_1d(vals))]
    return rows
