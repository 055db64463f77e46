"""`python -m bench.demo`: the whole story on the bundled photographs, one command, resumable.

    python -m bench.demo --preset photos                   # ~25 min on 2 CPU cores -> runs/demo/report/index.html
    python -m bench.demo --preset smoke --out runs/smoke   # the same pipeline in miniature (CI, < 6 min)

The steps and their sizes are bench.pipeline's (README "What the demo shows"; `--dry-run` prints every command of
each); the bookkeeping (stamps, resume, logs) is bench.steps'; the summary printed at the end is reports.summary's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.pipeline import PLANS, Pipeline
from bench.steps import Step, StepFailed, dry_run, run
from pagoda.errors import ArgumentParser, UserError, check_output, run_cli
from pagoda.rundir import refuse_foreign_files
from reports.rows import load
from reports.summary import summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0],
                       epilog="Steps: " + "; ".join(("domain", "teacher", "refs", "pairs (plain, guided)", "G",
                                                     "guided G", "grow + drift", "PD", "eval", "cost", "samples",
                                                     "report")))
    p.add_argument("--preset", choices=sorted(PLANS), default="photos", help="photos (default; ~25 min on 2 CPU "
                   "cores) or smoke (< 6 min: the CI pipeline)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo, runs/smoke for smoke)")
    p.add_argument("--weights-dir", default=None, help="folder of the domain classifier's weights (default "
                   "$PAGODA_WEIGHTS, else ./weights; trained there if absent)")
    p.add_argument("--dry-run", action="store_true", help="print every step's commands and whether it is up to "
                   "date, run nothing")
    p.add_argument("--only", default=None, help="comma list of step names to run again, from scratch (the others "
                   "are left as they are)")
    return p


def _folders(args) -> tuple[Path, Path]:
    """(run folder, weights folder) of the command line, checked: folders that can be written, and a run folder
    that is empty, new, or a demo run's."""
    out = Path(args.out or ("runs/demo" if args.preset == "photos" else f"runs/{args.preset}"))
    weights = Path(args.weights_dir or os.environ.get("PAGODA_WEIGHTS") or "weights")
    for folder, what in ((out, "--out"), (weights, "--weights-dir")):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {folder} is a file: give a folder")
        check_output(folder / "x", what)
    if out.is_dir() and not (out / ".steps").is_dir():  # not a demo run's folder (run() makes .steps first)
        refuse_foreign_files(out, what="a demo run")
    made = out / ".steps" / "preset"
    if made.is_file() and made.read_text().strip() != args.preset:  # its steps would overwrite the other run's
        raise UserError(f"--out {out} holds a demo run of --preset {made.read_text().strip()}: pass another --out "
                        f"for --preset {args.preset}, or delete {out}")
    return out, weights


def _only(text: str | None, steps: list[Step]) -> set[str] | None:
    if text is None:
        return None
    only = {s.strip() for s in text.split(",") if s.strip()}
    if not only:
        raise UserError(f"--only {text!r} names no step: give step names, e.g. --only report")
    unknown = sorted(only - {s.name for s in steps})
    if unknown:
        raise UserError(f"--only {text!r}: unknown step(s) {unknown}; steps: {', '.join(s.name for s in steps)}")
    return only


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = PLANS[args.preset]
    out, weights = _folders(args)
    pipeline = Pipeline(plan, out, weights)
    steps = pipeline.steps()
    only = _only(args.only, steps)
    if args.dry_run:
        print(dry_run(steps, pipeline.out))
        return 0
    weights.mkdir(parents=True, exist_ok=True)
    pipeline.results.mkdir(parents=True, exist_ok=True)
    (out / ".steps").mkdir(exist_ok=True)
    (out / ".steps" / "preset").write_text(plan.preset + "\n")
    print(f"demo {plan.preset}: {len(steps)} steps into {out} (sized for ~{plan.budget_min} min on 2 CPU cores, up to "
          f"~2x on a slow host; logs in {out / 'logs'})", flush=True)
    t0 = time.perf_counter()
    try:
        run(steps, pipeline.out, pipeline.env(), only=only)
    except StepFailed as e:
        print(" failed", flush=True)
        raise UserError(str(e)) if e.code == 2 else SystemExit(f"error: {e}") from None
    report = out / "report" / "index.html"
    print(f"demo {plan.preset}: done in {(time.perf_counter() - t0) / 60:.1f} min; report: "
          f"{report if report.exists() else 'not built yet (run without --only)'}")
    for line in summary(load([str(pipeline.results)])[0], pipeline.facts()):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
