"""Feature statistics: streaming float64 sums, a bounded per-sample store, and reference statistics files.

Statistics are reduced across ranks as float64 sums (n, sum x, sum x x^T), never by gathering features;
only the bounded FeatureStore (KID, P/R, bootstrap) is gathered. Reference files are read from four
formats without ever executing code from them: our own npz (with provenance), ADM reference npz,
clean-fid / pytorch-fid npz, and EDM2 stats pkl through a restricted unpickler.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pagoda.data import open_npz, write_npz
from pagoda.errors import UserError

# ----------------------------------------------------------------------------
# Distributed helpers (no-ops in one process).


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_rows(x, dim: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A [N, dim] CPU tensor of `dtype` from a tensor or array; ValueError on a wrong shape."""
    x = torch.as_tensor(x).detach().to("cpu", dtype)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected features of shape [N, {dim}], got {list(x.shape)}")
    return x


# ----------------------------------------------------------------------------
# Streaming mean and covariance (EDM2 calculate_metrics style).


class FeatureStats:
    """Running float64 sums n, sum_i x_i and sum_i x_i x_i^T of D-dim features; mean and covariance from them."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, feats) -> None:
        x = _as_rows(feats, self.dim, torch.float64, "FeatureStats.update")
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x  # all outer products as one float64 matmul

    def merge(self, other: FeatureStats) -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d statistics")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("FeatureStats.mean: no features were added")
        return (self.sum / self.n).numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance (ddof = 1): (sum x x^T - n mu mu^T) / (n - 1)."""
        if self.n < 2:
            raise ValueError(f"FeatureStats.cov: needs at least 2 features, got {self.n}")
        mu = self.sum / self.n
        return ((self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()

    def all_reduce(self) -> None:
        """Sum n and the two float64 sums over all ranks (no-op without a process group); once, after the last update."""
        if not _distributed():
            return
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.sum_outer.flatten()])
        flat = flat.to(_comm_device())
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        self.n = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()


# ----------------------------------------------------------------------------
# Bounded per-sample store.


class FeatureStore:
    """float32 features of the samples with global index < capacity, returned in sample-index order.

    Which rows are kept depends only on the sample index, never on batch size or rank count: with
    `index` given (the sources put sample i on rank i % world), rows with index >= capacity are
    dropped; without it a running counter numbers the rows in arrival order (one process only).
    Memory is bounded by `capacity` rows.
    """

    def __init__(self, dim: int, capacity: int):
        if capacity < 0:
            raise ValueError(f"FeatureStore: capacity must be >= 0, got {capacity}")
        self.dim, self.capacity = int(dim), int(capacity)
        self._rows: list[torch.Tensor] = []
        self._index: list[torch.Tensor] = []
        self._seen = 0

    def __len__(self) -> int:
        return sum(len(i) for i in self._index)

    def update(self, feats, index=None) -> None:
        x = _as_rows(feats, self.dim, torch.float32, "FeatureStore.update")
        if index is None:
            index = torch.arange(self._seen, self._seen + len(x))
        index = torch.as_tensor(index, dtype=torch.int64).cpu().reshape(-1)
        if len(index) != len(x):
            raise ValueError(f"FeatureStore.update: {len(x)} rows but {len(index)} sample indices")
        self._seen += len(x)
        keep = index < self.capacity
        if keep.any():
            self._rows.append(x[keep])  # boolean indexing copies
            self._index.append(index[keep])

    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._rows:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        rows, index = torch.cat(self._rows), torch.cat(self._index)
        order = torch.argsort(index, stable=True)
        return rows[order], index[order]

    def features(self) -> np.ndarray:
        """The kept rows, [M, dim] float32, ordered by sample index."""
        return self._sorted()[0].numpy()

    def indices(self) -> np.ndarray:
        """The sample index of each row of features()."""
        return self._sorted()[1].numpy()

    def gather(self) -> None:
        """Replace this rank's rows by all ranks' rows in global sample order (no-op without a process group)."""
        rows, index = self._sorted()
        if _distributed():
            rows, index = _all_gather_rows(rows, index)
            order = torch.argsort(index, stable=True)
            rows, index = rows[order], index[order]
        self._rows, self._index = [rows], [index]


def _all_gather_rows(rows: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (rows, index); ranks may hold different counts, so pad to the largest."""
    device, world = _comm_device(), torch.distributed.get_world_size()
    count = torch.tensor([len(index)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    size = max(counts)
    pad_rows = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=device)
    pad_index = torch.full((size,), -1, dtype=torch.int64, device=device)
    pad_rows[:len(rows)], pad_index[:len(index)] = rows.to(device), index.to(device)
    all_rows = [torch.zeros_like(pad_rows) for _ in range(world)]
    all_index = [torch.zeros_like(pad_index) for _ in range(world)]
    torch.distributed.all_gather(all_rows, pad_rows)
    torch.distributed.all_gather(all_index, pad_index)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)]).cpu()
    index = torch.cat([i[:c] for i, c in zip(all_index, counts)]).cpu()
    return rows, index


# ----------------------------------------------------------------------------
# Reference statistics.


@dataclass
class Reference:
    """Gaussian statistics of a reference set; features / images only where the file holds them.

    `provenance` is empty for files made outside pagoda (ADM, clean-fid, pytorch-fid, EDM2): for those
    only the feature dimension can be checked. `images` is set for ADM npz files whose `arr_0` holds
    the reference images (uint8 NHWC) so a caller can extract features from them itself, and
    `image_labels` their classes when the file has an integer `arr_1`. `labels` (int64 [N]) is the class
    of each stored feature row, for per-class metrics; None when the source had none.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    features: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    images: np.ndarray | None = None
    format: str = "pagoda"
    labels: np.ndarray | None = None
    image_labels: np.ndarray | None = None  # ADM `arr_1`: the class of each of `images` (read with them)
    image_size: int | None = None  # ADM `arr_0`: side of its square images, from the header (no loading)
    mu_s: np.ndarray | None = None  # sFID statistics (Inception mixed_6/conv[..., :7], 2023-d): ADM `mu_s`,
    sigma_s: np.ndarray | None = None  # `sigma_s`, or ours when the extractor has spatial features

    def stats_sha256(self) -> str:
        """SHA-256 of the statistics a Frechet distance reads: mu then sigma as little-endian float64, C order.
        The same numbers give the same digest in any file format (our npz, an ADM npz, an EDM2 pkl)."""
        h = hashlib.sha256()
        for a in (self.mu, self.sigma):
            h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
        return h.hexdigest()


def _validate(ref: Reference, path) -> Reference:
    """UserError unless mu is [D], sigma is [D, D], features (if any) are [N, D], all finite."""
    mu, sigma = np.asarray(ref.mu), np.asarray(ref.sigma)
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise UserError(f"{path}: mu / sigma are not numeric arrays ({mu.dtype}, {sigma.dtype}); "
                        "rebuild the reference with `python -m eval.ref`")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu has shape {list(mu.shape)} but sigma has shape {list(sigma.shape)} "
                        "(expected [D] and [D, D]); the file is damaged: rebuild it with `python -m eval.ref`")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu / sigma contain NaN or inf; rebuild the reference with `python -m eval.ref` "
                        "(check the images and the extractor)")
    ref.mu, ref.sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if ref.features is not None:
        f = np.asarray(ref.features)
        if f.ndim != 2 or f.shape[1] != mu.shape[0]:
            raise UserError(f"{path}: stored features have shape {list(f.shape)}, expected [N, {mu.shape[0]}]; "
                            "rebuild the reference with `python -m eval.ref`")
        ref.features = f
    if ref.labels is not None:
        ref.labels = _checked_labels(ref.labels, ref.features, path)
    if (ref.mu_s is None) != (ref.sigma_s is None):
        raise UserError(f"{path}: holds only one of mu_s / sigma_s (sFID statistics): rebuild it with `python -m eval.ref`")
    if ref.mu_s is not None:
        mu_s, sigma_s = np.asarray(ref.mu_s, dtype=np.float64), np.asarray(ref.sigma_s, dtype=np.float64)
        if mu_s.ndim != 1 or sigma_s.shape != (len(mu_s), len(mu_s)) or not np.isfinite(sigma_s).all():
            raise UserError(f"{path}: mu_s {list(mu_s.shape)} / sigma_s {list(sigma_s.shape)} are not finite [D] / "
                            "[D, D] sFID statistics: rebuild the reference with `python -m eval.ref`")
        ref.mu_s, ref.sigma_s = mu_s, sigma_s
    return ref


def _checked_labels(labels, features, path) -> np.ndarray:
    """int64 [N] labels, one per stored feature row; UserError otherwise."""
    y = np.asarray(labels)
    n = None if features is None else len(features)
    if y.dtype.kind not in "iu" or y.ndim != 1 or y.shape[0] != n or (n and y.min() < 0):
        expect = "no labels (no features are stored)" if n is None else f"non-negative integers of shape [{n}]"
        raise UserError(f"{path}: 'labels' is {y.dtype} {list(y.shape)} but the file needs {expect}; rebuild "
                        "the reference with `python -m eval.ref DATASET -o REF.npz --force`")
    return y.astype(np.int64)


def save_reference(path: str | os.PathLike, ref: Reference) -> None:
    """Write `ref` as our npz (mu, sigma, n, optional features and labels, provenance as JSON), atomically."""
    path = Path(path)
    ref = _validate(ref, path)
    arrays = dict(mu=ref.mu, sigma=ref.sigma, provenance=np.array(json.dumps(ref.provenance, sort_keys=True)))
    if ref.n is not None:
        arrays["n"] = np.array(int(ref.n), dtype=np.int64)
    if ref.features is not None:
        arrays["features"] = np.asarray(ref.features, dtype=np.float32)
    if ref.labels is not None:
        arrays["labels"] = ref.labels
    if ref.mu_s is not None:
        arrays["mu_s"], arrays["sigma_s"] = ref.mu_s, ref.sigma_s

    write_npz(path, arrays)


def _npy_header(z, key: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one npz member, read from its .npy header without loading the data."""
    with z.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _load_npz(path: Path, load_images: bool) -> Reference:
    """Our npz, ADM npz (mu, sigma, mu_s, sigma_s, arr_0) or clean-fid / pytorch-fid npz (mu, sigma)."""
    with open_npz(path, "reference") as z:
        keys = set(z.files)
        data = {k: z[k] for k in keys if k != "arr_0"}
        if "arr_0" in keys:
            shape, dtype = _npy_header(z, "arr_0")
            is_images = dtype == np.uint8 and len(shape) == 4
            if not is_images or load_images:
                data["arr_0"] = z["arr_0"]
    if "mu" not in data or "sigma" not in data:
        hint = ("it holds images (arr_0) but no statistics: build a reference from it with "
                f"`python -m eval.ref {path} -o REF.npz`") if "arr_0" in keys else \
            "pass a reference made by `python -m eval.ref`"
        raise UserError(f"{path}: no 'mu' / 'sigma' arrays (keys: {sorted(keys)}); {hint}")
    if "provenance" in data:
        try:
            provenance = json.loads(str(data["provenance"]))
        except json.JSONDecodeError:
            raise UserError(f"{path}: its 'provenance' is not valid JSON; rebuild it with `python -m eval.ref`") from None
        return Reference(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]) if "n" in data else None,
                         features=data.get("features"), provenance=provenance, labels=data.get("labels"),
                         mu_s=data.get("mu_s"), sigma_s=data.get("sigma_s"))
    ref = Reference(mu=data["mu"], sigma=data["sigma"], format="adm" if keys & {"arr_0", "mu_s"} else "npz",
                    mu_s=data.get("mu_s"), sigma_s=data.get("sigma_s"))
    if "arr_0" in keys and is_images:
        ref.n, ref.images = shape[0], data.get("arr_0")  # ADM reference batches store images, not features
        ref.image_size = shape[1] if shape[1] == shape[2] else None
        y = data.get("arr_1")
        if y is not None and y.dtype.kind in "iu" and y.shape == (shape[0],) and (y.size == 0 or y.min() >= 0):
            ref.image_labels = y.astype(np.int64)  # e.g. VIRTUAL_imagenet64_labeled.npz
    elif "arr_0" in keys and len(shape) == 2 and dtype.kind == "f":
        ref.n, ref.features = shape[0], data["arr_0"]
    return ref


class _StatsUnpickler(pickle.Unpickler):
    """Admits only what a pickle of dicts of numpy arrays needs; refuses every other global."""

    SAFE = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol 2 spells bytes as encode(str, 'latin1'); it only builds bytes
    }

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.SAFE:
            raise UserError(f"refusing to unpickle {module}.{name} from {self.path}: a stats pkl may hold only "
                            "dicts of numpy arrays; use a trusted EDM2 stats file or build one with `python -m eval.ref`")
        return super().find_class(module, name)


EDM2_METRICS = {"inception": "fid", "dinov2": "fd_dinov2"}  # our extractor name -> EDM2 stats key


def _load_pkl(path: Path, metric: str | None, expect_extractor: str | None) -> Reference:
    """EDM2 stats pkl: {'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}."""
    try:
        stats = _StatsUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read it as a stats pkl ({type(e).__name__}: {e}); pass an EDM2 stats pkl "
                        "or a reference made by `python -m eval.ref`") from None
    if not isinstance(stats, dict):
        raise UserError(f"{path}: holds a {type(stats).__name__}, not an EDM2 stats dict; pass an EDM2 stats pkl")
    implied = EDM2_METRICS.get(expect_extractor)
    if metric is None:  # the extractor's statistics, else fid, else the first present (e.g. only fd_dinov2)
        present = [k for k, v in stats.items() if isinstance(v, dict) and "mu" in v]
        metric = implied or ("fid" if "fid" in present or not present else present[0])
    elif implied is not None and metric != implied:
        raise UserError(f"{path}: metric '{metric}' statistics were made with another network than extractor "
                        f"'{expect_extractor}' (which uses '{implied}'); pick the matching metric or extractor")
    entry = stats.get(metric)
    if not isinstance(entry, dict) or "mu" not in entry or "sigma" not in entry:
        present = sorted(k for k, v in stats.items() if isinstance(v, dict))
        raise UserError(f"{path}: no '{metric}' statistics with mu / sigma (present: {present}); "
                        "choose one of those metrics or another reference file")
    n = stats.get("num_images")
    return Reference(mu=entry["mu"], sigma=entry["sigma"], n=int(n) if isinstance(n, int) else None,
                     format=f"edm2:{metric}")


def _kind(path: Path) -> str:
    """'npz' or 'pkl', from the suffix or else the first bytes."""
    if path.suffix == ".npz":
        return "npz"
    if path.suffix in (".pkl", ".pickle"):
        return "pkl"
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        return "npz"
    if head[:1] == b"\x80":
        return "pkl"
    raise UserError(f"{path}: neither an npz nor a pkl; pass a reference made by `python -m eval.ref`, "
                    "an ADM / clean-fid npz or an EDM2 stats pkl")


def load_reference(path: str | os.PathLike, *, expect_extractor: str | None = None, expect_dim: int | None = None,
                   expect_resize: str | None = None, expect_sha256: str | None = None, metric: str | None = None,
                   load_images: bool = False) -> Reference:
    """Read reference statistics from any supported format; check extractor and dimension if asked.

    An ADM npz whose `arr_0` holds the reference images (uint8 NHWC) sets `n` from its header; the
    images themselves (up to GBs) are read into `images` only with load_images=True.

    The extractor can be checked only for our own files (the others carry no provenance); for an EDM2
    pkl it picks the statistics (`inception` -> 'fid', `dinov2` -> 'fd_dinov2') unless `metric` says.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a reference file: give the .npz / .pkl inside it, or build one "
                        f"with `python -m eval.ref {path} -o REF.npz`")
    if not path.is_file():
        raise UserError(f"{path}: reference file not found; build it with `python -m eval.ref DATASET -o {path}`")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the reference file is empty (0 bytes); rebuild it with "
                        f"`python -m eval.ref DATASET -o {path} --force`")
    ref = _load_npz(path, load_images) if _kind(path) == "npz" else _load_pkl(path, metric, expect_extractor)
    ref = _validate(ref, path)
    made_by = ref.provenance.get("extractor")
    if expect_extractor is not None and made_by is not None and made_by != expect_extractor:
        raise UserError(f"{path}: made with extractor '{made_by}', not '{expect_extractor}'; rebuild it with "
                        f"`python -m eval.ref DATASET -o {path} --extractor {expect_extractor} --force`")
    _check_resize(ref, path, expect_resize)
    made_sha = ref.provenance.get("extractor_sha256")
    if expect_sha256 and made_sha and made_sha != expect_sha256:
        raise UserError(f"{path}: made with {made_by} weights of SHA-256 {made_sha[:16]}..., but the extractor now "
                        f"loads {expect_sha256[:16]}...: features of other weights are not comparable; rebuild it "
                        f"with `python -m eval.ref DATASET -o {path} --force`, or pass the weights it was made with")
    dim = ref.mu.shape[0]
    if expect_dim is not None and dim != expect_dim:
        raise UserError(f"{path}: holds {dim}-d statistics but extractor '{expect_extractor or '?'}' gives "
                        f"{expect_dim}-d features; use a reference made with that extractor")
    return ref


# The image conventions that published statistics were made with: EDM2's `fd_dinov2` statistics come from
# its DINOv2Detector with the default resize_mode='torch' (see eval.extractors: resize "edm2-torch").
EDM2_RESIZE = {"fd_dinov2": "edm2-torch"}


def _check_resize(ref: Reference, path, expect_resize: str | None) -> None:
    """UserError when the reference's image convention (resize) differs from the extractor's."""
    made = ref.provenance.get("resize") or EDM2_RESIZE.get(ref.format.removeprefix("edm2:"))
    if expect_resize is None or made is None or made == expect_resize:
        return
    raise UserError(f"{path}: its features were made with resize '{made}' but the extractor uses '{expect_resize}'; "
                    f"features of two image conventions are not comparable: pass --resize {made} (eval.run: --extractor "
                    f"...,resize={made}) (or rebuild the "
                    "reference with the other convention)")


_MISSING = "<missing>"


def check_fresh(ref: Reference, **provenance_now) -> None:
    """UserError if any given provenance value differs from the one stored in `ref` (a stale cache)."""
    for key, now in provenance_now.items():
        now = json.loads(json.dumps(now))  # compare as stored: tuples become lists
        old = ref.provenance.get(key, _MISSING)
        if old != now:
            raise UserError(f"reference is stale: provenance '{key}' was {old!r}, now {now!r}; rebuild it with "
                            "`python -m eval.ref ... --force`")
