"""A content-keyed, resumable cache of per-sample extractor outputs for sample stores.

Re-scoring the same images with another metric, reference or estimator reads their features instead of running
the network again, and an interrupted extraction resumes from its last finished shard. A store's outputs live in
`ROOT/KEY/` (ROOT: $PAGODA_FEATURES, else $XDG_CACHE_HOME/pagoda/features, else ~/.cache/pagoda/features), where
KEY is the SHA-256 of everything the outputs depend on:
- the store's content (Source.cache_key: the SHA-256 of its files, plus its read order and any resize on the way in),
- the extractor's name, its weights' SHA-256 and its image convention (`resize`),
- the dtype (float32, what every extractor returns) and this file's format version.
Samples [start, stop) are one shard file `START-STOP.npz` (features, and logits / spatial features where the
extractor has them, and the labels), written to a temporary name and renamed when complete: a killed run leaves
whole shards only. A shard that cannot be read is computed again. Only stores with content (folders, npz, archives,
data sets) are cached: generated samples, iterables, and runs on several processes are extracted as before.
Cost: 4 bytes per output dimension per image (Inception: (2048 + 1008 + 2023) x 4 B = 20 KB; 1 GB per 50k).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pagoda.weights import cache_home

VERSION = 1
SHARD = 1024
ENV = "PAGODA_FEATURES"


def cache_root() -> Path:
    """$PAGODA_FEATURES, else $XDG_CACHE_HOME/pagoda/features, else ~/.cache/pagoda/features."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else cache_home() / "features"


@dataclass(frozen=True)
class FeatureCache:
    """The cache under `root`, in shards of `shard` samples."""

    root: Path
    shard: int = SHARD

    def key(self, source, ex) -> str | None:
        """The content key of `ex`'s outputs on `source`; None when either cannot be keyed (no content hash, or an
        extractor without a weights hash)."""
        store = source.cache_key()
        sha = ex.weights_sha256
        if store is None or not sha:
            return None
        what = dict(store=store, extractor=ex.name, weights_sha256=sha, resize=str(ex.resize),
                    dtype="float32", version=VERSION)
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str, start: int, stop: int) -> Path:
        return self.root / key / f"{start:09d}-{stop:09d}.npz"

    def load(self, key: str, start: int, stop: int) -> dict[str, np.ndarray] | None:
        """The arrays of shard [start, stop), or None when absent or unreadable (it is then computed again)."""
        path = self._path(key, start, stop)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if any(len(v) != stop - start for v in arrays.values()) or "features" not in arrays:
            return None
        return arrays

    def save(self, key: str, start: int, stop: int, arrays: dict[str, np.ndarray], about: dict) -> None:
        """Write shard [start, stop) atomically; the folder's `about.json` says what the key stands for."""
        path = self._path(key, start, stop)
        path.parent.mkdir(parents=True, exist_ok=True)
        about_path = path.parent / "about.json"
        if not about_path.exists():
            tmp = about_path.with_name(f".about.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(about, indent=1, sort_keys=True))
            os.replace(tmp, about_path)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def default_cache(enabled: bool = True) -> FeatureCache | None:
    """The cache the commands and the library use (under cache_root()), None when disabled (--no-cache)."""
    return FeatureCache(cache_root()) if enabled else None


def outputs_of(res: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The float32 arrays of one extractor call's outputs (features, logits, spatial)."""
    return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in res.items()}
