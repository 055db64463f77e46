"""Resumable pipeline steps whose commands are typed calls of the project's tools (bench.demo runs them).

A `Tool` is one of the project's command lines: the module `python -m` runs, its subcommand, and the function
that builds its argparse parser. `Tool.command(*positional, **options)` turns Python values into that tool's
argv through the parser itself: each keyword is the `dest` of one of its options (a renamed or removed option
is an error when the pipeline is built, in `--dry-run` and in the tests, not when the step runs), lists become
repeated options or comma lists as the option takes them, and the argv is parsed once by the tool's parser, so
a value its type refuses is refused then too. No command line is written as a string.

A `Step` holds a list of commands, each run as its own process (memory and threads are the step's alone; its
output goes to OUT/logs/NAME.log), or in this process where a step asks for it, and an in-process `after`
(links, small files). A step is skipped when its stamp (OUT/.steps/NAME.json: its commands and the SHA-256 of
its inputs) matches and its outputs exist; a step whose inputs or commands changed starts afresh (its `fresh`
paths removed); an interrupted training step resumes from its run directory (the stages' own resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pagoda.errors import UserError
from pagoda.weights import sha256_file

STAMP_FORMAT = "pagoda-demo-step-2"  # 2: a step's stamp lists its commands (1: one argv)


@dataclass(frozen=True)
class Command:
    """One call of a tool: `python -m MODULE *argv` (argv includes the subcommand)."""

    module: str
    argv: tuple[str, ...]
    main: Callable[[list[str]], int] | None = field(default=None, compare=False, repr=False)  # set: run in process

    def __str__(self) -> str:
        return f"python -m {self.module} {' '.join(self.argv)}"


@dataclass(frozen=True)
class Tool:
    """A project command line: the module `python -m` runs, its subcommand (pagoda's), its parser, its main."""

    module: str
    subcommand: str | None
    parser: Callable[[], argparse.ArgumentParser]
    main: Callable[[list[str]], int]

    def command(self, *positional, in_process: bool = False, **options) -> Command:
        """The call of this tool with `positional` arguments and `options` by their parser `dest` (True for a
        flag; a list for a repeatable option, or for one that takes a comma list); `in_process` runs it by its
        main() in the pipeline's process. UserError for an option the tool does not have, or a value its parser
        refuses."""
        parser = self.parser()
        actions = {a.dest: a for a in parser._actions if a.option_strings}
        argv = [str(v) for v in positional]
        for dest, value in options.items():
            if dest not in actions:
                raise UserError(f"python -m {self.module} {self.subcommand or ''}: no option for {dest!r} (renamed "
                                "or removed?): update the pipeline (bench/pipeline.py) to its options")
            argv += _option_argv(actions[dest], value)
        prefix = (self.subcommand,) if self.subcommand else ()
        parser.parse_args(argv)  # the tool's own types and choices check every value now
        return Command(self.module, prefix + tuple(argv), self.main if in_process else None)


def _option_argv(action: argparse.Action, value) -> list[str]:
    """argv of one option: a flag when True (nothing when False or None), repeated for an append option, a comma
    list for a list value of any other option."""
    flag = max(action.option_strings, key=len)
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(action, argparse._AppendAction):
        return [x for v in value for x in (flag, _text(v))]
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(_text(v) for v in value)]
    return [flag, _text(value)]


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Step:
    """One resumable step of a pipeline: its commands, what it writes and what it reads."""

    name: str
    title: str
    commands: list[Command]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    fresh: list[Path] = field(default_factory=list)  # removed before a (re)run whose inputs changed
    after: Callable[[], object] | None = None  # run in this process after the commands (writes extra files)
    cwd: Path | None = None  # where the commands run (the models folder: rows name a model by the path given)


class StepFailed(Exception):
    """A step's command exited non-zero: `code` is its status, the message names the log."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _sha256_of(path: Path) -> str:
    """SHA-256 of a file, of a folder's index.json (pairs), or 'absent'."""
    if path.is_dir():
        path = path / "index.json"
    return sha256_file(path) if path.is_file() else "absent"


def stamp(step: Step) -> dict:
    """What a finished step is recorded as: its commands and its inputs' SHA-256."""
    return {"format": STAMP_FORMAT, "commands": [str(c) for c in step.commands],
            "inputs": {str(p): _sha256_of(p) for p in step.inputs}}


def up_to_date(step: Step, stamp_file: Path) -> bool:
    """The step ran to the end with these commands and inputs, and its outputs are still there."""
    try:
        old = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return False
    return old == stamp(step) and all(p.exists() for p in step.outputs)


def run_command(cmd: Command, log: Path, env: dict, cwd: Path | None) -> None:
    """Run one command with its output appended to `log`; StepFailed (naming the log's last line) on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {cmd}\n")
        f.flush()
        if cmd.main is not None:  # in this process (no interpreter start)
            with contextlib.redirect_stdout(f):
                code = int(cmd.main(list(cmd.argv)) or 0)
        else:
            code = subprocess.call([sys.executable, "-m", cmd.module, *cmd.argv], stdout=f, stderr=subprocess.STDOUT,
                                   env=env, cwd=cwd)
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["?"]
        raise StepFailed(code, f"`python -m {cmd.module} {' '.join(cmd.argv[:1])} ...` exited {code}: "
                               f"{tail[0].strip()} (full output: {log})")


def run_step(step: Step, out: Path, env: dict) -> None:
    """Run a step from scratch: its `fresh` paths removed if it ran before, its commands, its `after`, its stamp."""
    stamp_file = out / ".steps" / f"{step.name}.json"
    if stamp_file.exists():  # it ran before (other inputs, other commands, or --only): start afresh
        for p in step.fresh:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    stamp_file.unlink(missing_ok=True)
    log = out / "logs" / f"{step.name}.log"
    log.unlink(missing_ok=True)
    for cmd in step.commands:
        run_command(cmd, log, env, step.cwd)
    if step.after is not None:
        step.after()
    stamp_file.write_text(json.dumps(stamp(step), indent=1))


def run(steps: list[Step], out: Path, env: dict, *, only: set[str] | None = None) -> list[tuple[str, str, float]]:
    """Run every step that is not up to date (with `only`: those steps, from scratch, and no other); returns
    (name, 'ran' | 'up to date' | 'left', seconds) per step, and prints a progress line for each."""
    (out / ".steps").mkdir(parents=True, exist_ok=True)
    done, t_all = [], time.perf_counter()
    for i, step in enumerate(steps, 1):
        head, skip = f"[{i:2d}/{len(steps)}] {step.name}: {step.title}", _skip(step, out, only)
        print(f"{head} ... {SKIPPED[skip]}" if skip else f"{head} ...", end="\n" if skip else "", flush=True)
        t0 = time.perf_counter()
        if not skip:
            run_step(step, out, env)
            print(f" done in {time.perf_counter() - t0:.0f} s (total {(time.perf_counter() - t_all) / 60:.1f} min)",
                  flush=True)
        done.append((step.name, skip or "ran", 0.0 if skip else time.perf_counter() - t0))
    return done


SKIPPED = {"left": "left as it is (--only)", "up to date": "up to date"}


def _skip(step: Step, out: Path, only: set[str] | None) -> str | None:
    """Why `step` does not run: "left" (--only names others), "up to date" (its stamp matches), or None."""
    if only is not None:
        return None if step.name in only else "left"
    return "up to date" if up_to_date(step, out / ".steps" / f"{step.name}.json") else None


def dry_run(steps: list[Step], out: Path) -> str:
    """Every step's state and every one of its commands (an in-process step without commands says so)."""
    lines = []
    for s in steps:
        state = "up to date" if up_to_date(s, out / ".steps" / f"{s.name}.json") else "to run"
        cmds = [str(c) for c in s.commands] or ["(in process)"]
        lines += [f"{s.name:14s} {state:10s} {cmds[0]}"] + [f"{'':14s} {'':10s} {c}" for c in cmds[1:]]
    return "\n".join(lines)
