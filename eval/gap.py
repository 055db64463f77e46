"""`python -m eval.diff A B --measure SAMPLES`: each differing protocol field's share of the gap between two rows,
measured by scoring the same samples under A's protocol with that one field set to B's value (eval.diff prints
the fields; this module re-measures them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from eval.diff import MAKER, differing, field_value
from pagoda.errors import UserError
from pagoda.rows import protocol, text_table

# Fields --measure can switch on the same samples (the others are properties of a model or of another run).
MEASURABLE = ("resize", "num_samples", "seeds", "labels", "reference", "dtype", "subset_size", "subsets",
              "kid_seed", "splits", "style", "k", "bootstrap")
# Row `extra` estimator entries -> eval.registry.Estimators fields (k: pr_k or dc_k by the metric).
ESTIMATOR_FIELDS = {"subset_size": "kid_subset", "subsets": "kid_subsets", "kid_seed": "kid_seed",
                    "splits": "is_splits", "style": "is_style", "bootstrap": "bootstrap"}


def setting_of(row: dict) -> dict:
    """What a re-measurement needs of a row's protocol: the metric, extractor, resize, estimators, N, first seed,
    labels, reference name, dtype and the sampling cell."""
    p = protocol(row)
    seeds = p.get("seeds")
    start = int(seeds.split("-")[0]) if isinstance(seeds, str) and seeds.split("-")[0].isdigit() else 0
    return dict(p, start=start, metric=row["metric"], guidance=row.get("guidance"), sampler=row.get("sampler"),
                steps=row.get("steps"))


def _estimators(s: dict):
    from eval.registry import Estimators

    est, maker = Estimators(), MAKER.get(s["metric"], s["metric"])
    values = {ESTIMATOR_FIELDS[k]: s[k] for k in ESTIMATOR_FIELDS if s.get(k) is not None}
    if s.get("k") is not None and maker in ("pr", "dc"):
        values[f"{maker}_k"] = s["k"]
    return replace(est, **values)


def switched(a: dict, b: dict) -> dict[str, dict | None]:
    """{field: A's setting with that field set to B's value} for each protocol field the rows differ in (None where
    it cannot be switched on the same samples); the seeds bring B's first seed."""
    sa, sb = setting_of(a), setting_of(b)
    return {field: dict(sa, **{field: sb[field]}, start=sb["start"] if field == "seeds" else sa["start"])
            if field in MEASURABLE else None for field in differing(a, b)[0]}


def value_of(s: dict, samples: str, refs: dict, val_refs: list[str], *, weights_dir, batch: int) -> float:
    """The row metric of `samples` measured under setting `s` (setting_of, a field possibly switched)."""
    import torch

    from eval.api import Evaluator
    from eval.extractors import EXTRACTORS
    from eval.registry import METRICS
    from eval.run import run
    from eval.sources import Window, open_source

    maker, name = MAKER.get(s["metric"], s["metric"]), s["extractor"]
    files = refs.get(s["reference"]) if s.get("reference") else []
    if files is None:
        raise UserError(f"--measure needs the reference {s['reference']!r} a row names: pass its file with --ref")
    fdr = name.split("+") if maker == "fdr" else None
    offers = fdr is None and s.get("resize") and "resize" in EXTRACTORS[name].options
    ev = Evaluator(files, [maker], extractor=None if fdr else {METRICS[maker].role: name},
                   resize=s["resize"] if offers else None,
                   estimator=_estimators(s), batch=batch, allow_small=True, weights_dir=weights_dir,
                   val_ref=val_refs if fdr else (), fdr_extractors=fdr)
    if samples.endswith(".safetensors"):
        rows = run(ev, ckpts=[samples], images=[], num_samples=s["num_samples"], seed=s["start"],
                   labels=s.get("labels") or "seed", guidance=[s["guidance"]], samplers=[s["sampler"]],
                   steps=[s["steps"]], dtype=getattr(torch, s.get("dtype") or "float32"))
    else:  # check_measure saw that the set holds what every setting asks of it
        store = open_source(samples)
        rows = ev.measure(Window(store, s["start"], s["num_samples"] or store.num_samples))
    return next(r["value"] for r in rows if r["metric"] == s["metric"] and "class" not in r["extra"])


def check_measure(a: dict, b: dict, samples: str, ref_files: list[str], *, weights_dir) -> dict[str, list[str]]:
    """Every refusal of --measure that needs no weights: another resolution, an aggregate A, a reference a row names
    but --ref lacks, a sample set or checkpoint that cannot be the one behind the rows. The --ref files by name."""
    from eval.measure import References

    if None not in (a.get("resolution"), b.get("resolution")) and a["resolution"] != b["resolution"]:
        raise UserError(f"--measure scores A's samples under B's protocol, but B ({b['where']}) is at "
                        f"{b['resolution']} px and A at {a['resolution']} px: B's reference cannot score A's "
                        "samples; compare rows of one resolution")
    refs = References(ref_files, weights_dir=weights_dir)
    by_name: dict[str, list[str]] = {}
    for path in ref_files:
        by_name.setdefault(refs.name(path), []).append(path)
    diff, _ = differing(a, b)
    sa, sb = setting_of(a), setting_of(b)
    if (a.get("extra") or {}).get("selection", "single") != "single":
        raise UserError(f"--measure re-measures one run, but A ({a['where']}) is a {a['extra']['selection']} row: "
                        "compare single rows (extra.selection single, e.g. one --repeat range)")
    for name in {sa.get("reference")} | ({sb.get("reference")} if "reference" in diff else set()):
        if name is not None and name not in by_name:
            raise UserError(f"--measure needs the reference {name!r} a row names: pass its file with --ref (given: "
                            f"{', '.join(sorted(by_name)) or 'none'})")
    if samples.endswith((".safetensors", ".npz")) and not Path(samples).is_file():  # before any weights load
        raise UserError(f"--measure {samples} does not exist: give the checkpoint or sample set both rows scored")
    if not samples.endswith(".safetensors"):  # a sample set must hold what A and B's N and seeds ask of it
        from eval.sources import open_source

        held = open_source(samples).num_samples
        need = {side: s["start"] + s["num_samples"] for side, s in (("A", sa), ("B", sb))
                if s.get("num_samples")}
        short = {side: n for side, n in need.items() if n > held}
        if short:
            raise UserError(f"--measure {samples} holds {held} images, but "
                            + " and ".join(f"{side}'s N and seeds need {n}" for side, n in short.items())
                            + ": give the sample set behind the rows")
        for field, s in switched(a, b).items():  # A's first image with B's N, say, may reach further than either
            if s is not None and s["num_samples"] and s["start"] + s["num_samples"] > held:
                raise UserError(f"--measure {samples} holds {held} images, but A's protocol with B's {field} needs "
                                f"{s['start'] + s['num_samples']}: give a sample set that holds them")
    if samples.endswith(".safetensors") and a.get("resolution") is not None:
        from pagoda.checkpoint import read_meta  # the header only

        made = read_meta(samples).get("resolution")
        if made is not None and made != a["resolution"]:
            raise UserError(f"--measure {samples} makes {made} px images, but A ({a['where']}) is at "
                            f"{a['resolution']} px: give the checkpoint A was measured on")
    return by_name


def measure(a: dict, b: dict, samples: str, ref_files: list[str], val_refs: list[str], *, weights_dir,
            batch: int) -> str:
    """The --measure table: A re-measured, then each switchable differing field set to B's value."""
    by_name = check_measure(a, b, samples, ref_files, weights_dir=weights_dir)
    diff, _ = differing(a, b)
    sa = setting_of(a)
    base = value_of(sa, samples, by_name, val_refs, weights_dir=weights_dir, batch=batch)
    if abs(base - a["value"]) > 1e-6 * max(1.0, abs(a["value"])):
        raise UserError(f"--measure {samples} under A's protocol gives {base:.6g}, but A ({a['where']}) says "
                        f"{a['value']:.6g}: these are not the samples behind A; give the checkpoint or sample set A "
                        "was measured on")
    gap, cells, total = b["value"] - a["value"], [], 0.0
    for field, setting in switched(a, b).items():
        change = f"{field_value(diff[field][0], field)} -> {field_value(diff[field][1], field)}"
        if setting is None:
            cells.append(dict(field=field, change=change, effect="not measurable here", share="-"))
            continue
        value = value_of(setting, samples, by_name, val_refs, weights_dir=weights_dir, batch=batch)
        total += value - base
        cells.append(dict(field=field, change=change, effect=f"{value - base:+.6g}", share=_share(value - base, gap)))
    lines = [f"measured on {samples}: A's protocol gives {base:.6g} (the row says {a['value']:.6g})"]
    if cells:
        lines.append(text_table(cells, ("field", "change", "effect", "share"), str))
    lines.append(f"unexplained by the fields above: {gap - total:+.6g} ({_share(gap - total, gap)} of the gap "
                 f"{gap:+.6g}): the models, fields not measurable here, and interactions")
    return "\n".join(lines)


def _share(effect: float, gap: float) -> str:
    return f"{100 * effect / gap + 0.0:.1f}%" if gap else "- (no gap)"  # + 0.0: no "-0.0%"
