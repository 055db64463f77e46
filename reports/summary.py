"""The demo's summary: up to nine lines of claims, each a like-for-like comparison or saying what differs.

Read from result rows only (the models named by their file's stem: rows name them `G16.safetensors`) and a few
facts of the plan that made them (`Facts`: the budgets, which no row holds whole). bench.demo prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Facts:
    """What the summary knows of the pipeline beyond its rows."""

    base: int  # the base resolution (px); G{base} is the one-step G
    resolutions: tuple[int, ...]  # base, then each grown G's
    g_steps: int  # G's updates
    g_batch: int  # G's batch
    pd_rounds: int  # progressive-distillation rounds
    pd_steps: int  # updates per PD round
    pd_batch: int
    pairs_items: int  # inverted items G trained on (photos and their mirrors)
    guided_steps: int  # updates of the guided G from G
    guidance: str  # the guidance curves' CFG scales, comma list
    guidance_cell: tuple[str, int]  # the teacher's sampler and steps of its guidance curve
    moves_seeds: int  # seeds of bench.moves
    domain_resolution: int  # the px at which the domain features see every image


def _pick(rows: list[dict], **want) -> dict | None:
    """The last row with every `want` field equal, or None."""
    hit = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    return hit[-1] if hit else None


def _stems(rows: list[dict]) -> list[dict]:
    return [dict(r, model=Path(str(r.get("model"))).stem) for r in rows]


def summary(rows: list[dict], facts: Facts) -> list[str]:
    """Up to nine lines: one-step G vs the teacher at NFE 1 and at its best, vs PD-1 at an equal training budget,
    growth (with the drift, and without L_rec), FDr of each G, the teacher's best cell and PD-1, guidance curves of
    the guided G and the teacher's CFG, how far w moves each (bench.moves), how far each model's training moved it
    (lr units), cost ratio."""
    rows = _stems(rows)
    fid = [r for r in rows if r.get("metric") == "fid" and r.get("guidance") in (1, 1.0, None)]
    g = f"G{facts.base}"
    gq = _pick(fid, model=g)
    best = min((r for r in fid if r["model"] == "teacher"), key=lambda r: r["value"], default=None)
    lines = _onestep_lines(fid, facts, gq, best) + _growth_lines(rows, fid, facts) + _fdr_lines(rows, facts, best) \
        + _guidance_lines(rows, facts)
    moved = [(r["model"], r["extra"]["displacement_lr"], r["extra"].get("train_step")) for r in fid
             if r["model"] != "teacher" and isinstance((r.get("extra") or {}).get("displacement_lr"), (int, float))]
    if moved:  # one entry per model (a model's rows at several resolutions carry the same budget)
        text = {m: f"{m} {d:.1f} ({n} steps)" for m, d, n in moved}
        lines.append("trained (RMS weight change from the start, in lr units; <~5: barely trained): "
                     + ", ".join(text.values()))
    lat = {(r["model"], r.get("sampler"), r.get("steps")): r["value"] for r in rows
           if r.get("metric") == "latency_ms" and r.get("batch") == 1}
    if gq and best and (g, None, None) in lat and ("teacher", best["sampler"], best["steps"]) in lat:
        ratio = lat[("teacher", best["sampler"], best["steps"])] / lat[(g, None, None)]
        lines.append(f"cost: {g} {lat[(g, None, None)]:.1f} ms per image at batch 1, {ratio:.1f}x faster than "
                     f"the teacher's best cell ({best['sampler']}-{best['steps']})")
    return lines


def _onestep_lines(fid: list[dict], facts: Facts, gq: dict | None, best: dict | None) -> list[str]:
    """G against the teacher at NFE 1, at its best, and against PD-1 at an equal budget."""
    g, lines = f"G{facts.base}", []
    t1 = min((r for r in fid if r["model"] == "teacher" and r.get("nfe") == 1), key=lambda r: r["value"], default=None)
    pd1 = _pick(fid, model="PD-1")
    if gq and t1:
        lines.append(f"one-step {g}: FD {gq['value']:.2f} vs the teacher at NFE 1 ({t1['sampler']}-1): "
                     f"FD {t1['value']:.2f}")
    if gq and best:
        lines.append(f"teacher's best FD {best['value']:.2f} ({best['sampler']}-{best['steps']}, NFE "
                     f"{best.get('nfe'):g}); {g} is {gq['value'] - best['value']:+.2f} from it at NFE 1")
    if gq and pd1:
        lines.append(f"at NFE 1 and an equal budget ({facts.g_steps} updates of {facts.g_batch} images for G, "
                     f"{facts.pd_rounds} rounds x {facts.pd_steps} of {facts.pd_batch} for PD; G also needs the "
                     f"inversion of its {facts.pairs_items} items): PaGoDA {g} FD {gq['value']:.2f} vs progressive "
                     f"distillation PD-1 FD {pd1['value']:.2f}")
    return lines


def _growth_lines(rows: list[dict], fid: list[dict], facts: Facts) -> list[str]:
    """FD and drift of each grown G, and of the no-L_rec ablation where there is one."""
    grown = [(r, _pick(fid, model=f"G{r}")) for r in facts.resolutions[1:]]
    if not grown or not all(q for _, q in grown):
        return []

    def text(r: int, q: dict) -> str:
        drift = _pick(rows, metric="drift_rms", model=f"G{r}")
        nq, nd = _pick(fid, model=f"G{r}-norec"), _pick(rows, metric="drift_rms", model=f"G{r}-norec")
        return f"G{r} FD {q['value']:.2f}" + (f" (drift {drift['value']:.1f} levels)" if drift else "") + (
            f"; without L_rec FD {nq['value']:.2f} (drift {nd['value']:.1f})" if nq and nd else "")
    scored = grown[0][1].get("extractor")
    return ["grown: " + ", ".join(text(r, q) for r, q in grown) + (
        f" (each FD against held-out photos of its own size; the {scored} features see every size at "
        f"{facts.domain_resolution} px)" if scored == "domain" else "")]


def _fdr_lines(rows: list[dict], facts: Facts, best: dict | None) -> list[str]:
    """FDr of every G, the teacher's best FD cell and PD-1 (without CFG), and the validation photos' own."""
    fdr = [r for r in rows if r.get("metric") == "fdr" and r.get("guidance") in (1, 1.0, None)]
    picks = [(f"G{r}", _pick(fdr, model=f"G{r}")) for r in facts.resolutions] + [("PD-1", _pick(fdr, model="PD-1"))]
    if best:
        cell = f"teacher {best['sampler']}-{best['steps']}"
        picks.append((cell, _pick(fdr, model="teacher", sampler=best["sampler"], steps=best["steps"])))
    shown = [f"{name} {r['value']:.2f}" for name, r in picks if r]
    val = sorted({round(r["value"], 6) for r in fdr if r.get("method") == "samples"})
    if not shown:
        return []
    space = "+".join(sorted({r["extractor"] for name, r in picks if r}))
    return [f"FDr ({space} features: FD to the training photos in units of the held-out photos' own"
            + (f", which score {' / '.join(f'{v:g}' for v in val)}" if val else "") + "): " + ", ".join(shown)]


def _guidance_lines(rows: list[dict], facts: Facts) -> list[str]:
    """The guided G's FD at every w beside the teacher's CFG in the plan's cell, and how far w moves each."""
    g, (sampler, nsteps) = f"G{facts.base}-cfg", facts.guidance_cell
    ws, lines = [float(w) for w in facts.guidance.split(",")], []
    curve = {(r["model"], r["guidance"]): r for r in rows if r.get("metric") == "fid" and r.get("guidance") in ws and (
        r["model"] == g or (r["model"] == "teacher" and (r.get("sampler"), r.get("steps")) == (sampler, nsteps)))}
    if all((name, w) in curve for name in ("teacher", g) for w in ws):
        fds = {name: " / ".join(f"{curve[(name, w)]['value']:.2f}" for w in ws) for name in ("teacher", g)}
        lines.append(f"guidance w = {' / '.join(f'{w:g}' for w in ws)}: guided {g} (NFE 1, {facts.guided_steps} "
                     f"updates from G{facts.base}) FD {fds[g]}; teacher CFG ({sampler}-{nsteps}, NFE "
                     f"{curve[('teacher', ws[-1])].get('nfe'):g} at w != 1) FD {fds['teacher']} (FD against the "
                     "photos, which CFG moves away from)")
    moves = {(r["model"], r["metric"], r.get("guidance")): r["value"] for r in rows
             if r.get("metric") in ("guidance_move", "guidance_move_cosine")}
    mw = sorted({w for _, _, w in moves if w is not None})
    if mw and all((k, "guidance_move", w) in moves for k in (g, "teacher") for w in mw):
        text = {k: " / ".join(f"{moves[(k, 'guidance_move', w)]:.1f}" for w in mw) for k in (g, "teacher")}
        cos = " / ".join(f"{moves.get((g, 'guidance_move_cosine', w), float('nan')):.2f}" for w in mw)
        lines.append(f"what w does (RMS uint8 levels of X(w) - X(1), {facts.moves_seeds} seeds) at w = "
                     f"{' / '.join(f'{w:g}' for w in mw)}: {g} {text[g]}, teacher {sampler}-{nsteps} "
                     f"{text['teacher']}; cosine of G's move with the teacher's {cos}")
    return lines
