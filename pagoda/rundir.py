"""A training run's directory: config.json checked on resume (settings and input hashes), a run never written into
someone else's folder, log.jsonl cut back to the step a resumed run starts from, text written whole or not at all.

Layout (pagoda.train writes it): config.json, log.jsonl, state.pt, <stage>.safetensors,
snapshots/<stage>-<step>.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from pagoda import checkpoint, dist
from pagoda.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (checkpoint.write_atomic: temp file, fsync, os.replace)."""
    checkpoint.write_atomic(path, lambda tmp: tmp.write_text(text))


def first_difference(old, new, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted key, old value, new value) of the first difference between two JSON trees, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            sub = first_difference(old.get(key, "<missing>"), new.get(key, "<missing>"), f"{prefix}{key}.")
            if sub is not None:
                return sub
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _drop(tree, dotted: str):
    """A copy of a JSON tree without the (dotted) key, where present."""
    head, _, rest = dotted.partition(".")
    if not isinstance(tree, dict) or head not in tree:
        return tree
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _drop(tree[head], rest)}


def refuse_foreign_files(out_dir: Path, ours=lambda entry: False, what: str = "a pagoda run") -> None:
    """UserError when out_dir holds an entry that `ours` does not accept (by default: any entry), so that a run
    never writes into a folder of someone else's files; names up to three of them."""
    stray = sorted(p for p in out_dir.iterdir() if not ours(p))[:3] if out_dir.is_dir() else []
    if stray:
        raise UserError(f"run directory {out_dir} already holds files that are not {what} ("
                        f"{', '.join(p.name for p in stray)}{', ...' if len(stray) == 3 else ''}): pass --out to a "
                        "new or empty directory")


def check_run_config(out_dir: Path, config_dict: dict, *, ignore: tuple[str, ...] = ()) -> None:
    """UserError unless out_dir is (or can become) a run directory whose config.json, if any, equals config_dict
    (the dotted keys in `ignore` left out on both sides)."""
    path = out_dir / "config.json"
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"run directory {out_dir}: {folder} is a file, not a directory; pass --out to a "
                            "directory (it is created)")
    if not path.exists():
        refuse_foreign_files(out_dir)  # config.json is a run's first file: other files and none are not ours
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: delete the run directory {out_dir} or pass --out elsewhere") \
            from None
    new = json.loads(json.dumps(config_dict))  # tuples -> lists, as stored
    for key in ignore:
        old, new = _drop(old, key), _drop(new, key)
    # the settings first; then `inputs` (the SHA-256 of input files, so a file replaced at the same path differs)
    diff = first_difference(_drop(old, "inputs"), _drop(new, "inputs"))
    inputs = first_difference(old.get("inputs", "<missing>") if isinstance(old, dict) else "<missing>",
                              new.get("inputs", "<missing>"), "inputs.")
    if diff is None and inputs is not None:
        raise UserError(f"run directory {out_dir} holds a run made from other inputs ({inputs[0]}: "
                        f"{str(inputs[1])[:16]} there, {str(inputs[2])[:16]} now; an input file was replaced at the "
                        f"same path, or the run predates input hashes): pass --out to another directory or delete "
                        f"{out_dir} to start over")
    if diff is not None:
        raise UserError(f"run directory {out_dir} holds a run with a different config (first difference: "
                        f"{diff[0]} = {diff[1]!r} there, {diff[2]!r} now): pass --out to another directory "
                        f"or delete {out_dir} to start over")


def prepare_run_dir(out_dir: Path, config_dict: dict) -> None:
    """Create the run directory with config.json, or check that the one there matches (resume)."""
    path = out_dir / "config.json"
    config_dict = json.loads(json.dumps(config_dict))  # tuples -> lists, as stored
    check_run_config(out_dir, config_dict)
    dist.barrier()  # every rank has read before rank 0 writes
    if dist.is_main() and not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    dist.barrier()


def truncate_log(path: Path, step: int) -> None:
    """Drop rows of log.jsonl past `step` (written after the snapshot a resumed run starts from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in keep))
