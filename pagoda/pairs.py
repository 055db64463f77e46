"""Stage 2a (METHOD §2): DDIM inversion of a training set into sharded, resumable, checksummed pairs.

Every training image x (uint8 [3, R, R] of `pagoda.data.build_dataset(source, R)`, R = the teacher's
resolution) is encoded twice, as is and mirrored: the clean image is the state at sigma_min, and Heun
integrates the PF-ODE upward along the 40-point Karras grid of the teacher (its sigma_min, sigma_max, rho;
39 steps, 78 NFE) with the teacher's D clamped to [-1, 1], conditioned on the true label (an unconditional
teacher gets no labels). That is `pagoda.samplers.ddim_invert`; nothing here is random.

Items. DESIGN: item j = image j // 2 of the source, horizontally flipped iff j is odd (an image and its
mirror sit side by side; `pagoda.data`'s xflip puts the mirrors at N..2N-1 instead). num_items = 2N.

Guided pairs (METHOD §2, "Guidance"; for a guidance-conditioned G). With `guidance=(lo, hi)` item j is inverted
with the CFG-guided teacher D_w = D_u + w_j (D_c - D_u) (two network rows per step, 156 NFE per item). DESIGN:
w_j = lo + (hi - lo) * frac(j / phi) (phi the golden ratio): a deterministic, equidistributed sequence, so any
prefix of the items, every shard and both mirrors of an image cover the range evenly, and w_j depends on j alone.
The scales are stored per item (`guidance` float32 [n]) and the range in the index; a G trained on them is
refused any w outside it.

Folder layout (`make_pairs(teacher, data, out)` writes it, `load_pairs(out)` reads it):
- `pairs-00000.safetensors`, ...: shard s holds items [s * shard_size, min((s + 1) * shard_size, num_items)):
  `z` float32 or float16 [n, 3, R, R] (the latents, ~ sigma_max * eps), `index` int64 [n] (the item ids),
  `label` int64 [n] (the data labels; stored for an unconditional teacher too, which ignores them), and for
  guided pairs `guidance` float32 [n] (w_j).
- `index.json`: format, teacher {path, sha256, num_classes}, data {source, fingerprint, num_images},
  resolution, sigmas (the ascending grid, float64 values), num_points, num_steps, nfe_per_item, clamp, dtype,
  guidance {range, rule} (guided pairs only),
  batch, num_items, shard_size, items (the rule above in words), complete, and per shard
  {file, start, stop, bytes, sha256}.

Resuming. DESIGN: rank 0 writes index.json with the plan (complete = false, sha256 = null) before any work;
a shard is done iff its file exists. Each is written to a temp name, fsynced and renamed
(`checkpoint.write_atomic`), so a file under a shard's name is always whole; a killed run leaves at most a
hidden temp file, which the next run deletes. When every rank is through, rank 0 checks each shard's
structure, hashes it and rewrites the index with complete = true (one writer: ranks never race on the
index). Running the same command again skips the shards on disk; a finished folder (complete, every shard
present at its recorded size) prints "up to date" and writes nothing; hashes are verified by `load_pairs`.
A shard whose recorded hash no longer matches is refused, never silently re-recorded.

Batch independence. On the CPU a float32 UNet forward gives an image results that differ in the last bits
with the batch it shares (measured on the `photos` teacher: up to 3e-6 between batch 16 and batches of
1..8, with or without oneDNN), and 78 NFE carry that into the latent. DESIGN: items are inverted in fixed
micro-batches aligned to the item index, [kB, (k + 1)B) with B = `batch`, recorded in the index as part of
what the folder is; shard_size must be a multiple of B. So the latent of item j is a function of j alone
(given the teacher, the data and B): not of the shard size, the rank count or where a killed run stopped.
Shards are byte-identical however the work was split, on the same machine and thread count.

Distributed: under `torchrun`, rank r takes the shards s with s % world == r (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from pagoda import dist
from pagoda.checkpoint import check_meta, diffusion_config, load_teacher, read_meta, write_atomic
from pagoda.data import build_dataset, check_native_resolution, to_model
from pagoda.errors import UserError
from pagoda.samplers import MAX_GUIDANCE, ddim_invert, inversion_sigmas
from pagoda.weights import sha256_file

FORMAT = "pagoda-pairs-1"  # bump when the folder layout changes incompatibly
INDEX = "index.json"
NUM_POINTS = 40  # METHOD §2: the 40-point Karras grid, 39 Heun steps, 78 NFE per item
DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULTS = {"dtype": "float32", "shard_size": 1024, "batch": 32}
ITEMS_RULE = "item j = image j // 2 of the data source, horizontally flipped iff j is odd"
# The entries of index.json that define the pairs: a rerun into the same folder must agree on all of them.
PLAN_KEYS = ("format", "teacher.sha256", "data.fingerprint", "resolution", "sigmas", "clamp", "dtype",
             "batch", "num_items", "shard_size", "guidance.range")
GOLDEN = (5 ** 0.5 - 1) / 2  # 1 / phi
GUIDANCE_RULE = "w_j = lo + (hi - lo) * frac(j / phi), phi = (1 + sqrt 5) / 2"


def nfe_per_item(guided: bool) -> int:
    """Network evaluations to invert one item: NUM_POINTS - 1 Heun steps of 2, twice that with CFG's two rows."""
    return 2 * (NUM_POINTS - 1) * (2 if guided else 1)


def pair_guidance(items, lo: float, hi: float) -> torch.Tensor:
    """The CFG scales w_j of items (float32 [n]) of guided pairs over [lo, hi] (GUIDANCE_RULE, in float64)."""
    j = torch.as_tensor(list(items), dtype=torch.float64)
    return (lo + (hi - lo) * torch.frac(j * GOLDEN)).to(torch.float32)


def shard_name(s: int) -> str:
    """File name of shard s."""
    return f"pairs-{s:05d}.safetensors"


# Item j: image j // 2 of the data set, mirrored iff j is odd -> (x uint8 [3, R, R], y int64 []).
def pair_image(dataset, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset[j // 2]
    return (x.flip(-1).contiguous() if j % 2 else x), y


# Items as a batch (each source image read once): x uint8 [n, 3, R, R], y int64 [n].
def pair_batch(dataset, items) -> tuple[torch.Tensor, torch.Tensor]:
    images = {i: dataset[i] for i in sorted({j // 2 for j in items})}
    x = [images[j // 2][0].flip(-1) if j % 2 else images[j // 2][0] for j in items]
    return torch.stack(x).contiguous(), torch.stack([images[j // 2][1] for j in items])


# Stage 2a encoding (METHOD §2): x uint8 [N, 3, R, R] -> z float32 [N, 3, R, R] at sigmas[-1], Heun upward
# from sigmas[0] with D clamped to [-1, 1]; labels int64 [N] or None (unconditional teacher); guidance: the CFG
# scale (a float, or float [N] per image; None = the plain conditional teacher).
@torch.no_grad()
def invert(denoiser, x: torch.Tensor, labels: torch.Tensor | None, sigmas: torch.Tensor,
           guidance: torch.Tensor | float | None = None) -> torch.Tensor:
    return ddim_invert(denoiser, to_model(x), sigmas, labels=labels, guidance=guidance, clamp=True)



def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, "<missing>") if isinstance(tree, dict) else "<missing>"
    return tree


# ---------------------------------------------------------------------------------------------
# The plan.

def _check_classes(teacher, data, teacher_classes: int, data_classes: int) -> None:
    """A conditional teacher needs labelled data whose labels it knows."""
    if teacher_classes > 0 and data_classes == 0:
        raise UserError(f"--teacher {teacher} is class-conditional ({teacher_classes} classes) but data "
                        f"source {data} has no labels: give labelled data (class folders, an npz with arr_1)")
    if data_classes > teacher_classes > 0:
        raise UserError(f"data source {data} has {data_classes} classes but --teacher {teacher} knows "
                        f"{teacher_classes}: give the data the teacher was trained on")


def _source_name(data: str) -> str:
    """'photos' as is; a path made absolute, so later stages find it from any working directory."""
    return data if data == "photos" else str(Path(data).resolve())


def check_guidance_range(guidance, teacher, meta: dict) -> tuple[float, float] | None:
    """(lo, hi) as floats, checked against the teacher (CFG needs labels and label dropout), or None."""
    if guidance is None:
        return None
    lo, hi = (float(v) for v in guidance)
    if not (0 <= lo <= hi <= MAX_GUIDANCE):
        raise UserError(f"--guidance {lo:g}:{hi:g} must be a range LO:HI with 0 <= LO <= HI <= {MAX_GUIDANCE:g} "
                        "(e.g. 1:3)")
    if int(meta.get("num_classes", 0)) < 1 or meta.get("diffusion", {}).get("label_dropout", 0.0) <= 0:
        raise UserError(f"--guidance: teacher {teacher} was not trained for classifier-free guidance "
                        "(unconditional, or no label dropout): drop --guidance")
    return lo, hi


def plan_pairs(teacher, data: str, *, dtype: str, shard_size: int, batch: int,
               guidance: tuple[float, float] | None = None) -> tuple[dict, object]:
    """(index dict with every shard not yet done, the data set): validates the inputs, writes nothing."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown: use {' or '.join(DTYPES)}")
    if shard_size < 1 or batch < 1 or shard_size % batch:
        raise UserError(f"--shard-size {shard_size} must be a positive multiple of --batch {batch} "
                        f"(micro-batches of {batch} items are aligned to item ids and may not straddle "
                        f"shards)")
    meta = read_meta(teacher)
    check_meta(teacher, meta, kind="teacher")
    resolution = int(meta.get("resolution") or meta.get("network", {}).get("resolution"))
    classes = int(meta.get("num_classes", meta.get("network", {}).get("num_classes", 0)))
    diffusion = diffusion_config(teacher, meta)
    guidance = check_guidance_range(guidance, teacher, meta)
    dataset = build_dataset(data, resolution)
    _check_classes(teacher, data, classes, dataset.num_classes)
    sigmas = inversion_sigmas(NUM_POINTS, sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max,
                              rho=diffusion.rho)
    num_items = 2 * len(dataset)
    shards = [dict(file=shard_name(s), start=lo, stop=min(lo + shard_size, num_items), bytes=None,
                   sha256=None) for s, lo in enumerate(range(0, num_items, shard_size))]
    index = dict(format=FORMAT,
                 teacher=dict(path=str(Path(teacher).resolve()), sha256=sha256_file(teacher),
                              num_classes=classes),
                 data=dict(source=_source_name(data), fingerprint=dataset.fingerprint(),
                           num_images=len(dataset)),
                 resolution=resolution, sigmas=sigmas.tolist(), num_points=NUM_POINTS,
                 num_steps=NUM_POINTS - 1, nfe_per_item=nfe_per_item(bool(guidance)), clamp=True,
                 dtype=dtype, batch=batch, num_items=num_items, shard_size=shard_size, items=ITEMS_RULE,
                 complete=False, shards=shards)
    if guidance is not None:
        index["guidance"] = dict(range=list(guidance), rule=GUIDANCE_RULE)
    return index, dataset


def guidance_range(index: dict) -> tuple[float, float] | None:
    """The (lo, hi) CFG range of guided pairs, None for plain ones."""
    g = index.get("guidance")
    return None if g is None else (float(g["range"][0]), float(g["range"][1]))


def rerun_hint(index: dict, folder) -> str:
    """The command that (re)makes the pairs of an index."""
    g = guidance_range(index)
    return (f"`python -m pagoda pairs --teacher {index['teacher']['path']} --data {index['data']['source']} "
            f"--out {folder}{f' --guidance {g[0]:g}:{g[1]:g}' if g else ''}`")


def read_index(folder: str | os.PathLike) -> dict:
    """index.json of a pairs folder, with one-line errors for a missing, damaged or foreign one."""
    folder = Path(folder)
    path = folder / INDEX
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {INDEX}"
        raise UserError(f"pairs folder {folder} {what}: make it with `python -m pagoda pairs --teacher T "
                        f"--data SOURCE --out {folder}`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): delete {folder} and make the pairs again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise UserError(f"{path} has format {found!r}, this pagoda reads {FORMAT!r}: make the pairs again "
                        f"into a new --out")
    return index


def _merge(out: Path, old: dict, new: dict) -> dict:
    """The new plan, refusing a folder made otherwise; keeps the recorded hashes of shards still on disk."""
    for key in PLAN_KEYS:
        if _get(old, key) != _get(new, key):
            there, here = (str(v)[:80] for v in (_get(old, key), _get(new, key)))
            raise UserError(f"{out} holds pairs with {key} = {there}, not {here} as asked now: pass another "
                            f"--out or delete {out} to start over")
    for rec, before in zip(new["shards"], old["shards"]):
        if (out / rec["file"]).is_file():
            rec.update(bytes=before.get("bytes"), sha256=before.get("sha256"))
    new["complete"] = bool(old.get("complete"))
    return new


def _up_to_date(out: Path, index: dict) -> bool:
    files = [(out / r["file"], r["bytes"]) for r in index["shards"]]
    return index["complete"] and all(f.is_file() and f.stat().st_size == size for f, size in files)


def _write_index(out: Path, index: dict) -> None:
    text = json.dumps(index, indent=1) + "\n"
    write_atomic(out / INDEX, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------
# Writing.

def _invert_shard(denoiser, dataset, index: dict, rec: dict, device, bar) -> dict[str, torch.Tensor]:
    """The tensors of one shard, inverted in micro-batches [kB, (k + 1)B) aligned to item ids."""
    B, conditional, g = index["batch"], index["teacher"]["num_classes"] > 0, guidance_range(index)
    sigmas = torch.tensor(index["sigmas"], dtype=torch.float64)
    zs, ys = [], []
    for lo in range(rec["start"], rec["stop"], B):
        items = range(lo, min(lo + B, rec["stop"]))
        x, y = pair_batch(dataset, items)
        w = None if g is None else pair_guidance(items, *g).to(device)
        z = invert(denoiser, x.to(device), y.to(device) if conditional else None, sigmas, w)
        z = z.to(DTYPES[index["dtype"]]).cpu()
        if not torch.isfinite(z).all():
            raise UserError(f"teacher {index['teacher']['path']} gives non-finite {index['dtype']} latents "
                            f"for items {items.start}..{items.stop - 1}: its weights hold NaN/inf or it "
                            f"diverged (or float16 overflowed); use another snapshot or --dtype float32")
        zs.append(z)
        ys.append(y)
        bar.update(len(items))
    ids = torch.arange(rec["start"], rec["stop"], dtype=torch.int64)
    labels = torch.cat(ys).to(torch.int64).contiguous()
    out = {"z": torch.cat(zs).contiguous(), "index": ids, "label": labels}
    if g is not None:
        out["guidance"] = pair_guidance(ids.tolist(), *g)
    return out


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    metadata = {"format": FORMAT}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def _check_shard(out: Path, index: dict, rec: dict) -> None:
    """UserError unless the shard file holds z / index / label of the recorded shapes, dtype and ids."""
    path, R, n = out / rec["file"], index["resolution"], rec["stop"] - rec["start"]
    hint = f"delete it and rerun {rerun_hint(index, out)} to recompute it"
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
            ids = f.get_tensor("index") if "index" in shapes else None
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"pairs shard {path} is not readable ({str(e)[:80]}): {hint}") from None
    want = {"z": ([n, 3, R, R], {"float32": "F32", "float16": "F16"}[index["dtype"]]), "index": ([n], "I64"),
            "label": ([n], "I64")}
    if guidance_range(index) is not None:
        want["guidance"] = ([n], "F32")
    if shapes != want or not torch.equal(ids, torch.arange(rec["start"], rec["stop"])):
        raise UserError(f"pairs shard {path} does not hold items {rec['start']}..{rec['stop'] - 1} as "
                        f"planned ({shapes}): {hint}")


def _finish(out: Path, index: dict) -> None:
    """Rank 0, after every rank: check and hash each shard, then record the index as complete."""
    for rec in index["shards"]:
        path = out / rec["file"]
        if not path.is_file():
            raise UserError(f"pairs shard {path} is missing after the run (a rank failed?): rerun "
                            f"{rerun_hint(index, out)}")
        _check_shard(out, index, rec)
        digest = sha256_file(path)
        if rec["sha256"] not in (None, digest):
            raise UserError(f"pairs shard {path} has SHA-256 {digest[:16]}..., index.json recorded "
                            f"{rec['sha256'][:16]}... (edited or damaged): delete it and rerun "
                            f"{rerun_hint(index, out)} to recompute it")
        rec.update(bytes=path.stat().st_size, sha256=digest)
    index["complete"] = True
    _write_index(out, index)


def _prepare(out: Path, index: dict) -> dict:
    """Merge with an existing folder's index (resume) or refuse a folder that is not a pairs folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the pairs")
    if (out / INDEX).exists():
        return _merge(out, read_index(out), index)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is a non-empty folder without {INDEX}, not a pairs folder: give a new "
                        f"or empty folder")
    return index


def _settings(out: Path, dtype, shard_size, batch, guidance) -> dict:
    """Options not given default to the existing index's (so the same command resumes), else to DEFAULTS
    (no guidance)."""
    old = {}
    if (out / INDEX).is_file():
        old = read_index(out)
    given = dict(dtype=dtype, shard_size=shard_size, batch=batch)
    settings = {k: v if v is not None else old.get(k, DEFAULTS[k]) for k, v in given.items()}
    settings["guidance"] = guidance if guidance is not None else guidance_range(old)
    return settings


def make_pairs(teacher: str | os.PathLike, data: str, out: str | os.PathLike, *, dtype: str | None = None,
               shard_size: int | None = None, batch: int | None = None,
               guidance: tuple[float, float] | None = None, device: str | torch.device = "cpu",
               progress: bool = True) -> Path:
    """Invert every item of `data` with `teacher` into the pairs folder `out`; returns out/index.json.

    dtype ("float32" | "float16"), shard_size (items per file) and batch (items per network call, part of
    the result; see the module docstring) default to the folder's index when it exists, else to DEFAULTS.
    guidance (lo, hi): invert with the CFG-guided teacher at w_j over that range (module docstring).
    Resumes a killed run; a finished folder is left as is ("up to date"). Joins the process group torchrun
    describes (or uses the one already made); rank r takes the shards s with s % world == r.
    Raises UserError for a missing or non-teacher checkpoint, an unknown data source, labels the teacher does
    not know, options that disagree with the folder's index, and non-finite latents.
    """
    out = Path(out)
    with dist.session():
        index, dataset = plan_pairs(teacher, data, **_settings(out, dtype, shard_size, batch, guidance))
        index = _prepare(out, index)
        if _up_to_date(out, index):
            dist.print0(f"{out}: up to date ({index['num_items']} items in {len(index['shards'])} shards)")
            return out / INDEX
        dist.barrier()  # every rank has read the old index before rank 0 rewrites it
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            # Temp files of a run killed while writing (write_atomic names them .NAME.tmpPID).
            for tmp in [*out.glob(".pairs-*.safetensors.tmp*"), *out.glob(f".{INDEX}.tmp*")]:
                tmp.unlink(missing_ok=True)
            index["complete"] = False
            _write_index(out, index)
        dist.barrier()
        _run_shards(teacher, out, index, dataset, device=device, progress=progress)
        dist.barrier()
        if dist.is_main():
            _finish(out, index)
        return out / INDEX


def _run_shards(teacher, out: Path, index: dict, dataset, *, device, progress: bool) -> None:
    """This rank's shards that are not on disk yet, with a tqdm bar in items (img/s) on rank 0."""
    from tqdm import tqdm

    rank, world = dist.rank(), dist.world_size()
    mine = [rec for s, rec in enumerate(index["shards"]) if s % world == rank]
    todo = [rec for rec in mine if not (out / rec["file"]).is_file()]
    denoiser = load_teacher(teacher, device=device).denoiser()
    total = sum(rec["stop"] - rec["start"] for rec in todo)
    bar = tqdm(total=total, unit="img", desc=f"pairs (rank {rank}/{world})", mininterval=2.0,
               disable=None if progress and dist.is_main() else True)
    start = time.perf_counter()
    for rec in todo:
        _write_shard(out / rec["file"], _invert_shard(denoiser, dataset, index, rec, device, bar))
    bar.close()
    seconds = time.perf_counter() - start
    dist.print0(f"{out}: rank 0 of {world} inverted {total} items in {len(todo)} shards in {seconds:.1f} s "
                f"({total / max(seconds, 1e-9):.2f} img/s, {index['nfe_per_item']} NFE each)")


# ---------------------------------------------------------------------------------------------
# Reading.

class Pairs(torch.utils.data.Dataset):
    """Stage 2a pairs as a Dataset: pairs[j] -> (x uint8 [3, S, S], y int64 [], z float32 [3, R, R], w float32 []).

    x is item j of the data source (image j // 2, mirrored iff j is odd) at the image resolution S (R, the
    latents', unless Stage 3 asked for its own: the crop of the same source image at S), y the label the
    teacher was conditioned on, z its latent at sigma_max, w the CFG scale it was inverted with (1 for plain
    pairs). Shards are memory-mapped lazily (per process, so DataLoader workers open their own). Attributes:
    resolution (R), image_resolution (S), num_classes (the teacher's), teacher_sha256, guidance_range, index.
    """

    def __init__(self, folder: Path, index: dict, dataset):
        self.folder, self.index, self.dataset = Path(folder), index, dataset
        self.resolution, self.shard_size = index["resolution"], index["shard_size"]
        self.image_resolution, self.guidance_range = dataset.resolution, guidance_range(index)
        self.num_classes, self.teacher_sha256 = index["teacher"]["num_classes"], index["teacher"]["sha256"]
        self._files = {}

    def __len__(self) -> int:
        return self.index["num_items"]

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}  # open shard handles stay in the process that opened them

    def _shard(self, s: int):
        key = (os.getpid(), s)
        if key not in self._files:
            self._files[key] = safetensors.safe_open(str(self.folder / self.index["shards"][s]["file"]),
                                                     framework="pt")
        return self._files[key]

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        j = int(j)
        if not 0 <= j < len(self):
            raise IndexError(f"item {j} out of range for {len(self)} pairs")
        s, k = divmod(j, self.shard_size)
        f = self._shard(s)
        x, _ = pair_image(self.dataset, j)
        w = f.get_slice("guidance")[k:k + 1][0] if self.guidance_range else torch.tensor(1.0)
        return x, f.get_slice("label")[k:k + 1][0], f.get_slice("z")[k:k + 1][0].to(torch.float32), w


def pairs_sha256(folder: str | os.PathLike) -> str | None:
    """SHA-256 of a pairs folder's index.json (it records every shard's SHA-256, so it names the pairs' content),
    or None when there is none (load_pairs then says what is wrong)."""
    path = Path(folder) / INDEX
    return sha256_file(path) if path.is_file() else None


def load_pairs(folder: str | os.PathLike, *, teacher_sha256: str | None = None, resolution: int | None = None,
               data: str | None = None, image_resolution: int | None = None) -> Pairs:
    """The pairs in `folder`, verified: index complete, every shard's SHA-256 as recorded, data unchanged.

    teacher_sha256 / resolution, when given, must match the index (the teacher and base resolution of the
    stage that uses the pairs). `data` reads the images from another path to the same data (its fingerprint
    must match). image_resolution: the images at another size (Stage 3: the crops of the same source images at
    the stage's resolution). Every failure is a one-line UserError naming the file and the fix.
    """
    folder = Path(folder)
    index = read_index(folder)
    hint = rerun_hint(index, folder)
    if not index.get("complete"):
        raise UserError(f"pairs in {folder} are unfinished (index.json: complete = false): rerun {hint} to "
                        f"finish them")
    if resolution is not None and resolution != index["resolution"]:
        raise UserError(f"pairs in {folder} are at resolution {index['resolution']}, not {resolution}: make "
                        f"pairs with a {resolution} px teacher, or use a {index['resolution']} px stage")
    made_by = index["teacher"]["sha256"]
    if teacher_sha256 is not None and teacher_sha256 != made_by:
        raise UserError(f"pairs in {folder} were made by teacher {index['teacher']['path']} (SHA-256 "
                        f"{made_by[:16]}...), not by this teacher ({teacher_sha256[:16]}...): make pairs "
                        f"with this teacher into a new --out, or use the teacher they were made with")
    for rec in index["shards"]:
        _verify_shard(folder, rec, hint)
    dataset = build_dataset(data or index["data"]["source"], index["resolution"])
    if dataset.fingerprint() != index["data"]["fingerprint"]:
        raise UserError(f"data source {data or index['data']['source']} changed since the pairs in {folder} "
                        f"were made (fingerprint differs): restore it, or make the pairs again into a new "
                        f"--out")
    if image_resolution is not None and image_resolution != index["resolution"]:
        dataset = build_dataset(data or index["data"]["source"], image_resolution)
        check_native_resolution(dataset, data or index["data"]["source"], image_resolution,
                                "images a grown G is trained on")
    return Pairs(folder, index, dataset)


def _verify_shard(folder: Path, rec: dict, hint: str) -> None:
    path = folder / rec["file"]
    if not path.is_file():
        raise UserError(f"pairs shard {path} is missing: rerun {hint} to recompute it")
    digest = sha256_file(path)
    if digest != rec["sha256"]:
        what = "truncated" if path.stat().st_size < rec["bytes"] else "edited or damaged"
        raise UserError(f"pairs shard {path} has SHA-256 {digest[:16]}..., not {rec['sha256'][:16]}... as "
                        f"index.json records ({what}): delete it and rerun {hint} to recompute it")
