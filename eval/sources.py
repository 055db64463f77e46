"""Image sources for evaluation: a checkpoint (via Generator), an image folder, an ADM npz, a data set.

Every source is random access over samples 0..num_samples-1 and yields batches
`(images uint8 [B,3,H,W], labels int64 [B] or None, index int64 [B])` of this rank's shard
(sample i lives on rank i % world), in increasing index order. What a sample looks like depends on
its index only, never on the batch size or the number of processes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pagoda import dist
from pagoda.data import IMAGE_EXTENSIONS, check_npz_arrays, read_npz, save_npz, scan_folder
from pagoda.errors import UserError
from pagoda.weights import sha256_file, update_sha256

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    return dist.rank(), dist.world_size()


def check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    """`x` if it is a uint8 tensor [N, 3, H, W]; else a UserError naming `what` and the fix."""
    if not torch.is_tensor(x) or x.dtype != torch.uint8:
        desc = f"a {x.dtype} tensor" if torch.is_tensor(x) else f"a {type(x).__name__}"
        raise UserError(f"{what} got {desc}, not uint8 RGB images: convert (float in [-1, 1] -> uint8 by "
                        "(x + 1) * 127.5, rounded)")
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"{what} got shape {tuple(x.shape)}, not uint8 images [N, 3, H, W]: give RGB images "
                        "(repeat grey channels)")
    return x


class Source:
    """Random-access images; subclasses define `load(index) -> (uint8 NCHW, labels or None)`."""

    name: str = "source"
    num_samples: int = 0
    resolution: int | None = None
    num_classes: int = 0
    class_names: list[str] | None = None  # where known (photos, class folders)
    image_resize: str | None = None  # how images were brought to `resolution` (Resized), None = as stored
    dtype: str = "float32"  # the dtype the images were made in (a generator's; stored images: float32, as rows say)
    offset: int = 0  # index of sample 0 in the store it was cut from (Window), for the rows' `seeds`
    feature_nets: tuple[str, ...] | None = None  # the feature networks the model was trained on (None: unknown)

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of what this source produces (content of its inputs), for reference provenance."""
        raise NotImplementedError

    def cache_key(self) -> str | None:
        """What sample i's pixels depend on, for the feature cache (eval.cache); None = not cached (generated
        samples, iterables). Stores with content answer with their fingerprint."""
        return None

    def row_fields(self) -> dict:
        """The result-row fields that say what was measured: a sample set is named by its path."""
        return dict(model=self.name, method="samples", resolution=self.resolution, num_samples=self.num_samples)

    def row_extra(self) -> dict:
        """Entries of a row's `extra` that say how the samples were made (pagoda.rows.PROTOCOL): stored uint8
        images, which of them (indices, first-last), and their labels when they have any."""
        extra = {"uint8": "stored", "seeds": seed_range(self.offset, self.num_samples)}
        return {**extra, "labels": "given"} if self.num_classes else extra

    def close(self) -> None:
        """Release what the source holds (hooks, files); the default holds nothing."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def limit(self, num_samples: int | None, option: str = "--num-samples") -> Source:
        """Use only the first `num_samples` samples (None = all); `option` names what set the count in messages."""
        if num_samples is not None:
            if num_samples > self.num_samples:
                raise UserError(f"{self.name} holds {self.num_samples} images, fewer than the {num_samples} "
                                f"asked for: lower {option} or add images")
            self.num_samples = num_samples
        return self

    def batches(self, batch: int, *, rank: int | None = None, world: int | None = None) -> Iterator[Batch]:
        """This rank's samples (i % world == rank) in batches of at most `batch`."""
        if rank is None or world is None:
            rank, world = dist_info()
        for start in range(rank, self.num_samples, batch * world):  # chunks made lazily: no [N] index tensor
            chunk = torch.arange(start, min(start + batch * world, self.num_samples), world, dtype=torch.int64)
            x, y = self.load(chunk)
            yield check_images(x, self.name), y, chunk


def seed_range(start: int, n: int) -> str:
    """`first-last` (inclusive), the seed notation of EDM2's generate.py (--seeds=0-49999)."""
    return f"{start}-{start + n - 1}"


class Window(Source):
    """Samples start .. start + num_samples - 1 of a stored source (eval.run --repeat's disjoint ranges)."""

    def __init__(self, base: Source, start: int, num_samples: int):
        if start + num_samples > base.num_samples:
            raise UserError(f"{base.name} holds {base.num_samples} images, fewer than the {start + num_samples} that "
                            "--repeat needs: lower --num-samples or --repeat, or add images")
        self.base, self.offset, self.num_samples = base, int(start), int(num_samples)
        self.name, self.resolution, self.image_resize = base.name, base.resolution, base.image_resize
        self.num_classes, self.class_names, self.dtype = base.num_classes, base.class_names, base.dtype

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base.load(index + self.offset)

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}|[{self.offset}:{self.offset + self.num_samples}]"

    def cache_key(self) -> str | None:
        base = self.base.cache_key()
        return None if base is None else f"{base}|from({self.offset})"

    def close(self) -> None:
        self.base.close()


class RandomOrder(Source):
    """Another source read in a fixed random order (seeded), so that its first N samples — what
    limit(N) keeps and what a FeatureStore of capacity N holds — are a uniform random subset rather
    than, say, the first classes of a class-sorted folder. Labels and class names follow their images."""

    def __init__(self, base: Source, seed: int = 0):
        self.base, self.seed = base, int(seed)
        self.perm = torch.randperm(base.num_samples, generator=torch.Generator().manual_seed(self.seed))
        self.name, self.num_samples, self.resolution = base.name, base.num_samples, base.resolution
        self.num_classes, self.class_names, self.image_resize = base.num_classes, base.class_names, base.image_resize

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.base.load(self.perm[index])

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def cache_key(self) -> str | None:
        base = self.base.cache_key()
        return None if base is None else f"{base}|random({self.seed})"


class GeneratorSource(Source):
    """Samples of a Generator: seed of sample i = seed + i. Labels of a class-conditional model:
    "seed" (default) = the generator's own per-seed draw, as EDM and ADM sample (a random label per
    sample); "balanced" = exactly equal class counts, label_i = perm[i] mod C with perm a permutation of
    0..N-1 seeded by `seed`, so contiguous runs of samples are not class-sorted; or a LongTensor [N].
    No label scheme makes sample i depend on the batch, the rank or the generation order."""

    LABELS = ("seed", "balanced")

    def __init__(self, generator, num_samples: int, *, seed: int = 0, labels="seed", guidance: float | None = None,
                 name: str | None = None):
        self.generator, self.seed, self.guidance = generator, int(seed), guidance
        self.dtype = str(generator.dtype).removeprefix("torch.")
        self.num_samples, self.resolution = int(num_samples), int(generator.resolution)
        self.num_classes = int(generator.num_classes or 0)
        self.name = name or generator.name
        if isinstance(labels, str) and labels not in self.LABELS:
            raise UserError(f"labels={labels!r} is unknown: use 'seed', 'balanced' or a tensor of class ids")
        if labels is not None and self.num_classes == 0:
            labels = None  # an unconditional model takes no labels
        self.labels = labels
        if isinstance(labels, str) and labels == "balanced":
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed))
            self._balanced = perm % self.num_classes
        self._bad: list[int] = []  # positions in the current batch with non-finite network output
        network = generator.network  # its outputs are watched for NaN / inf, which uint8 images no longer show
        self._hooks = [network.register_forward_hook(self._watch)] if isinstance(network, torch.nn.Module) else []

    def close(self) -> None:
        """Remove the NaN watch hooks from the generator's modules."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def row_extra(self) -> dict:
        g, extra = self.generator, {}
        if self.labels is not None:
            extra["labels"] = self.labels if isinstance(self.labels, str) else "given"
        if g.grid:
            extra["grid"] = g.grid  # the sampler's sigma grid: "karras rho=7", "loguniform", "given" (a PD student)
        w = self.guidance if self.guidance is not None else g.guidance
        if g.sampler is not None and w not in (None, 1, 1.0) and g.num_classes > 0:
            extra["cfg_calls"] = "batched"  # cond + uncond rows in one call of 2N rows: nfe counts both
        if g.guidance_range:
            extra["guidance_range"] = list(g.guidance_range)  # w is an input of the network (one call, nfe 1)
        extra.update(g.training)  # its budget: steps, images seen, displacement in lr units
        extra.update(seeds=seed_range(self.seed, self.num_samples), guidance_cost=guidance_cost(g, w))
        return {**extra, **{k: v for k, v in (("uint8", g.uint8), ("space", g.space)) if v is not None}}

    @property
    def feature_nets(self) -> tuple[str, ...] | None:
        return self.generator.feature_nets

    def _watch(self, module, inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not self._bad:
            bad = ~torch.isfinite(out.detach()).reshape(out.shape[0], -1).all(dim=1)
            self._bad = bad.nonzero().flatten().tolist()

    def labels_of(self, index: torch.Tensor) -> torch.Tensor | None:
        if self.labels is None:
            return None
        if isinstance(self.labels, torch.Tensor):
            return self.labels[index].to(torch.int64)
        if self.labels == "balanced":
            return self._balanced[index]
        return self.generator.seed_labels(self.seed + index)  # the generator's own per-seed draw

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        seeds, y = self.seed + index, self.labels_of(index)
        self._bad = []
        with torch.no_grad():
            x = self.generator.sample(seeds, labels=y, guidance=self.guidance)
        if self._bad:  # with CFG the network may see the batch twice: position mod batch is the sample
            raise UserError(f"{self.name}: the model produced NaN/inf at seed {int(seeds[self._bad[0] % len(seeds)])}"
                            ": the checkpoint is broken (diverged training?); evaluate an earlier snapshot")
        return check_images(x.cpu(), self.name), y

    def row_fields(self) -> dict:
        g = self.generator
        return dict(model=self.name, method=g.method, resolution=self.resolution, sampler=g.sampler,
                    guidance=self.guidance if self.guidance is not None else g.guidance, steps=g.steps,
                    nfe=g.nfe_for(self.guidance), seed=self.seed, num_samples=self.num_samples)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}|{self.seed}|{self.num_samples}|{self.guidance}".encode()).hexdigest()


def guidance_cost(g, w: float | None) -> str:
    """How a generator pays for guidance scale `w`: "none" (w = 1, or no guidance), "in-1" (w is an input of
    its one network call) or "x2" (classifier-free guidance: a conditional and an unconditional row per step)."""
    if w in (None, 1, 1.0) or not g.num_classes:
        return "none"
    return "in-1" if g.guidance_range else "x2" if g.sampler is not None else "none"


class Resized(Source):
    """Another source's images at `resolution` by ADM's centre crop (pagoda.data.adm_center_crop: BOX halving while
    the short side is >= 2R, BICUBIC to short side R, centre crop; openai/guided-diffusion `center_crop_arr`, as
    the ADM reference batches and pagoda's training data are made). Images already R x R pass unchanged."""

    def __init__(self, base: Source, resolution: int):
        self.base, self.resolution, self.image_resize = base, int(resolution), "adm-center-crop"
        self.name, self.num_samples = base.name, base.num_samples
        self.num_classes, self.class_names = base.num_classes, base.class_names

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        from pagoda.data import adm_center_crop
        x, y = self.base.load(index)
        if x.shape[-2:] == (self.resolution, self.resolution):
            return x, y
        crops = [np.asarray(adm_center_crop(Image.fromarray(img.permute(1, 2, 0).numpy()), self.resolution))
                 for img in x]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), y

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def cache_key(self) -> str | None:
        base = self.base.cache_key()
        return None if base is None else f"{base}|{self.image_resize}({self.resolution})"


class FolderSource(Source):
    """The images of a folder, listed as pagoda.data.scan_folder lists training data; one size for all.

    In ImageNet layout (images in class subfolders) an image's label is the index of its subfolder
    among the sorted ones (hidden entries skipped, symlinks followed), the class ids that
    pagoda.data.ImageFolderDataset trains with; a flat folder is unlabelled (num_classes = 0), and so is
    EDM2's nested seed layout (eval.stores.edm2_seed_files: read in seed order, `layout` says so).
    """

    def __init__(self, path: str | os.PathLike):
        from eval.stores import edm2_seed_files
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist: check the path")
        seeds = edm2_seed_files(root)
        self.layout = "edm2-seed-folders" if seeds else None
        self.class_names, self.files, labels = ([], seeds, [0] * len(seeds)) if seeds else scan_folder(root)
        if not self.files:
            raise UserError(f"image folder {root} holds no images ({' '.join(IMAGE_EXTENSIONS)}): check the path")
        self.name, self.root, self.num_samples, self._fingerprint = str(root), root, len(self.files), None
        size0 = _image_size(self.files[0])
        for f in self.files[1:]:
            if _image_size(f) != size0:
                raise UserError(f"image {f} is {_image_size(f)[0]}x{_image_size(f)[1]} but {self.files[0]} is "
                                f"{size0[0]}x{size0[1]}: all images of {root} must have one size (resize them)")
        self.resolution = size0[0] if size0[0] == size0[1] else None
        self.labels = torch.tensor(labels, dtype=torch.int64) if self.class_names else None
        self.num_classes = len(self.class_names)

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = torch.stack([_read_image(self.files[int(i)]) for i in index])
        return images, None if self.labels is None else self.labels[index]

    def fingerprint(self) -> str:
        """SHA-256 over every file's relative path and bytes, computed once per source (eval.ref's provenance and
        the feature cache's key both ask for it)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        for f in self.files:
            h.update(str(f.relative_to(self.root)).encode() + b"\0")
            update_sha256(h, f)
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def cache_key(self) -> str:
        return f"folder:{self.fingerprint()}"


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError(f"image {path} is corrupt or not an image: delete or replace it") from None


def _read_image(path: Path) -> torch.Tensor:
    """uint8 [3,H,W] RGB, decoded by pagoda.data.load_image (its rules for grey, palette, alpha)."""
    from pagoda.data import load_image
    return torch.from_numpy(np.array(load_image(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class NpzSource(Source):
    """An ADM sample batch: `arr_0` uint8 NHWC images, optional `arr_1` labels."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.images, labels = read_npz(self.path)
        check_npz_arrays(self.path, self.images, labels)  # the checks training applies to the same file
        self.labels = None if labels is None else torch.from_numpy(labels.astype(np.int64))
        self.name, self.num_samples = str(self.path), len(self.images)
        h, w = self.images.shape[1:3]
        self.resolution = h if h == w else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(self.images[index.numpy()]).permute(0, 3, 1, 2).contiguous()
        return x, None if self.labels is None else self.labels[index]

    def fingerprint(self) -> str:
        return sha256_file(self.path)

    def cache_key(self) -> str:
        return f"npz:{self.fingerprint()}"


class DatasetSource(Source):
    """A pagoda data set ("photos", an image folder or an ADM npz) at a resolution, via build_dataset."""

    def __init__(self, spec: str, resolution: int, split: str = "train"):
        from pagoda.data import build_dataset
        self.dataset = build_dataset(spec, resolution, xflip=False, split=split)
        self.name, self.num_samples = f"{spec}:{split}:{resolution}", len(self.dataset)
        self.resolution, self.num_classes = resolution, int(getattr(self.dataset, "num_classes", 0) or 0)
        self.class_names = getattr(self.dataset, "class_names", None)

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(i)] for i in index]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)

    def fingerprint(self) -> str:
        return str(self.dataset.fingerprint())

    def cache_key(self) -> str:
        return f"dataset:{self.name}:{self.fingerprint()}"


class TensorSource(Source):
    """Library use: a uint8 NCHW tensor, or an iterable of such batches or of (images, labels) pairs; an iterable
    says how many images it yields (`num_samples`), and yields exactly that many (UserError otherwise)."""

    def __init__(self, data: torch.Tensor | Iterable, name: str = "tensors", num_samples: int | None = None):
        self.data, self.name = data, name
        if isinstance(data, torch.Tensor):
            check_images(data, name)
            self.num_samples, self.resolution = len(data), data.shape[-1]
        else:
            self.num_samples = int(num_samples or 0)
            items = iter(data)
            first = next(items, None)
            if first is None:
                raise UserError(f"{name} yields no batches: give it images")
            x = first[0] if isinstance(first, (tuple, list)) else first
            check_images(x, name)
            self.resolution = x.shape[-1] if x.shape[-1] == x.shape[-2] else None
            self.data = itertools.chain([first], items)

    def batches(self, batch: int, *, rank: int | None = None, world: int | None = None) -> Iterator[Batch]:
        if rank is None or world is None:
            rank, world = dist_info()
        chunks = self.data.split(batch) if isinstance(self.data, torch.Tensor) else self.data
        start = 0
        for item in chunks:
            x, y = item if isinstance(item, (tuple, list)) else (item, None)
            x = x[: max(self.num_samples - start, 0)] if self.num_samples else x
            if not len(x):
                break
            index = torch.arange(start, start + len(x), dtype=torch.int64)
            start += len(x)
            keep = index % world == rank
            yield check_images(x[keep], self.name), None if y is None else y[:len(x)][keep], index[keep]
        if self.num_samples and start < self.num_samples:
            raise UserError(f"{self.name} yielded {start} images, fewer than the num_samples={self.num_samples} "
                            "it was given: lower num_samples or give more batches")
        self.num_samples = start

    def fingerprint(self) -> str:
        if not isinstance(self.data, torch.Tensor):
            raise UserError("a TensorSource over an iterable has no fingerprint: pass one tensor")
        return hashlib.sha256(self.data.contiguous().numpy().tobytes()).hexdigest()


def parse_dataset_spec(spec: str) -> tuple[str, str, int | None]:
    """`photos[:split[:res]]` -> ("photos", split, res)."""
    parts = spec.split(":")
    if len(parts) > 3 or (len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) >= 4)):
        raise UserError(f"data set {spec!r} must look like photos[:split[:resolution]] with a resolution >= 4 "
                        "(e.g. photos:train:16)")
    return parts[0], (parts[1] if len(parts) > 1 and parts[1] else "train"), \
        (int(parts[2]) if len(parts) == 3 else None)


def open_source(spec: str, *, num_samples: int | None = None, resolution: int | None = None, split: str = "train",
                seed: int = 0, labels="seed", guidance: float | None = None, sampler: str | None = None,
                steps: int | None = None, device: str | torch.device = "cpu") -> Source:
    """A checkpoint (.safetensors), an image folder, an ADM .npz, a zip / tar / webdataset shards (eval.stores), or the
    bundled `photos[:split[:res]]`; a store with `resolution` is brought to it by ADM's centre crop (Resized)."""
    from eval.stores import ArchiveSource, is_archive_spec
    path = Path(spec)
    if is_archive_spec(spec):
        store = ArchiveSource(spec)
        return (Resized(store, resolution) if resolution else store).limit(num_samples)
    if spec.endswith(".safetensors"):
        from pagoda.generator import load_generator
        if num_samples is None:
            raise UserError(f"{spec} is a checkpoint: say how many samples to generate (--num-samples)")
        gen = load_generator(spec, sampler=sampler, steps=steps, device=device)
        return GeneratorSource(gen, num_samples, seed=seed, labels=labels, guidance=guidance,
                               name=getattr(gen, "name", None) or path.stem)
    if path.is_dir():  # a class-sorted folder is read in a fixed random order: no class-sorted runs or subsets
        folder = FolderSource(path)
        folder = Resized(folder, resolution) if resolution else folder
        return (RandomOrder(folder, seed=0) if folder.num_classes else folder).limit(num_samples)
    if spec.endswith(".npz"):
        npz = NpzSource(path)
        return (Resized(npz, resolution) if resolution else npz).limit(num_samples)
    if spec.split(":")[0] == "photos":
        name, split_, res = parse_dataset_spec(spec)
        res = res or resolution
        if res is None:
            raise UserError(f"data set {spec!r} needs a resolution: write {name}:{split_}:16 or pass --resolution")
        return DatasetSource(name, res, split_).limit(num_samples)
    if not path.exists():
        raise UserError(f"{spec} does not exist: give a .safetensors checkpoint, an image folder, an .npz, a .zip / "
                        ".tar or photos")
    raise UserError(f"{spec} is not a .safetensors checkpoint, an image folder, an .npz, a .zip / .tar (webdataset "
                    "shards: a {000..009} range or a glob) or photos[:split[:res]]")


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write an ADM sample npz (arr_0 uint8 NHWC, arr_1 labels) atomically."""
    save_npz(path, images, labels)
