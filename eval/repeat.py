"""eval.run --repeat K: K disjoint seed ranges measured one after another, and the rows that aggregate them
(mean-of-K with the sample std, min-of-K / max-of-K), each labelled with its selection rule (pagoda.rows.PROTOCOL)
so that an EDM2-style "minimum of 3 seed ranges" or a SiD-style "mean of 10 trials" is reproduced and named."""

from __future__ import annotations

import numpy as np

from pagoda.rows import known_direction


def repeat_rows(runs: list[list[dict]]) -> list[dict]:
    """eval.run --repeat K: the rows of K disjoint seed ranges (`runs`, one list of rows per range, in range order,
    each from score_cell), each marked with its range (extra.repeat), then per metric of the cell a mean-of-K row
    (extra.repeat_std: sample std, ddof 1; extra.repeat_values) and a min-of-K row (max-of-K where higher is
    better), labelled by extra.selection, as EDM2 reports the minimum over 3 seed ranges and SiD the mean of 10
    trials. Per-class rows stay in their range's rows only. A metric of unknown direction gets no min row.

    An `extra` entry measured per range (fdr's fdr_spaces and fd_train, say) is the mean over the ranges in the
    mean-of-K row (per key for a dict of numbers) and the selected range's in the min-of-K row (extra.repeat_best:
    its index); one that differs otherwise is left out of both. Entries equal in every range are kept."""
    k, out = len(runs), []
    for i, rows in enumerate(runs):
        out += [dict(r, extra=dict(r["extra"], repeat=i)) for r in rows]
    for group in zip(*([r for r in rows if "class" not in r["extra"]] for rows in runs)):
        first, values = group[0], [r["value"] for r in group]
        if len({(r["metric"], r["extractor"]) for r in group}) != 1:
            raise AssertionError("--repeat ranges made different rows")  # score_cell makes one order
        same, mean, varies = {}, {}, []  # varies: a list, so the rows' keys keep one order
        for key, v in first["extra"].items():
            if key in ("std", "repeat", "seeds"):
                continue
            each = [r["extra"].get(key) for r in group]
            if all(e == v for e in each):
                same[key] = v
            else:
                varies.append(key)
                avg = _mean_of(each)
                if avg is not None:
                    mean[key] = avg
        same.update(seeds=f"{first['extra']['seeds'].split('-')[0]}-{group[-1]['extra']['seeds'].split('-')[1]}",
                    repeat_values=values, repeat_std=float(np.std(values, ddof=1)) if k > 1 else 0.0)
        base = dict(first, ci_low=None, ci_high=None)
        out.append(dict(base, value=float(np.mean(values)), extra=dict(same, **mean, selection=f"mean-of-{k}")))
        direction = known_direction(first["metric"])
        if direction is not None:
            best = int(np.argmin(values) if direction > 0 else np.argmax(values))
            chosen = {key: group[best]["extra"][key] for key in varies if key in group[best]["extra"]}
            out.append(dict(base, value=values[best], extra=dict(same, **chosen, repeat_best=best,
                                                                 selection=f"{'min' if direction > 0 else 'max'}-of-{k}")))
    return out


def _mean_of(values: list):
    """The mean of a list of numbers, or per key of a list of dicts of numbers with the same keys; else None."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if all(number(v) for v in values):
        return float(np.mean(values))
    if all(isinstance(v, dict) for v in values) and len({tuple(sorted(v)) for v in values}) == 1 \
            and all(number(x) for v in values for x in v.values()):
        return {key: float(np.mean([v[key] for v in values])) for key in values[0]}
    return None
