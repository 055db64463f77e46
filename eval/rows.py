"""Making result rows: the schema's environment fields (run id, torch version, commit, time) filled in.

The schema itself, its check, row I/O and what a row measures are declared once in pagoda.rows (no torch), which
reports/ shares.
"""

from __future__ import annotations

import functools
import socket
import time
from importlib import metadata
from typing import Any

import torch

from pagoda.rows import ROW_KEYS
from pagoda.version import git_commit


def run_id() -> str:
    """One id per process (start time + host) so the rows of one invocation can be grouped."""
    return _RUN_ID


_RUN_ID = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + socket.gethostname()


# The packages whose versions decide a measurement's numbers (resizes, kernels, the Frechet distance's eigenvalues,
# the extractors' code), for the rows' protocol.
PACKAGES = ("pagoda", "torch", "torchvision", "numpy", "scipy", "pillow", "timm", "open_clip_torch")


@functools.cache
def versions() -> dict[str, str]:
    """{package: version} of PACKAGES installed here (a missing one is left out)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_row(*, model: str, metric: str, value: float, **fields: Any) -> dict:
    """A complete row: the given fields, environment fields filled in, every schema key present."""
    unknown = set(fields) - set(ROW_KEYS) - {"extra"}
    if unknown:
        raise TypeError(f"make_row: unknown row field(s) {sorted(unknown)}")
    row = dict.fromkeys(ROW_KEYS)
    row.update(run=run_id(), torch=torch.__version__, commit=git_commit(),
               time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    row.update(fields, model=model, metric=metric, value=float(value))
    row["extra"] = dict(fields.get("extra") or {})
    return row
