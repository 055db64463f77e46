"""Data sets: ImageNet-layout folders, ADM sample npz files and the bundled `photos` set.

Every data set yields `(x, y)`: `x` uint8 [3, R, R] RGB, `y` an int64 scalar (0 when the data
is unconditional). Images of another size are brought to R by the ADM center crop (BOX halving,
BICUBIC, center crop). With `xflip=True` a data set of N images has length 2N and index i >= N
is the mirror of i - N (EDM convention), so a flip depends on the index only. `fingerprint()`
is a sha256 over what defines the content; evaluation stores it as provenance.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import numbers
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from pagoda.errors import UserError
from pagoda.weights import sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# The photographs of the bundled set, one class each, sorted. All ship inside the scikit-image
# and scikit-learn wheels (no download); the grey ones are replicated to RGB.
PHOTO_CLASSES = (
    "astronaut", "brick", "camera", "chelsea", "china", "coffee", "coins", "flower", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket",
)
PHOTOS_VERSION = 1  # bump whenever the crops below change, so fingerprints change with them
PHOTOS_SEED = 20240522
PHOTOS_CROPS = {"train": 256, "heldout": 64}  # crops per photograph
PHOTOS_HELDOUT_FRACTION = 4  # the right-most 1/4 of each photo's columns is held out
PHOTOS_SCALE_RANGE = 2.0  # crop sides are log-uniform in [s_max / 2, s_max]


# ----------------------------------------------------------------------------------------------
# Pixels.

def adm_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """ADM crop: halve with BOX while the short side >= 2R, BICUBIC to short side R, center crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(max(resolution, round(s * scale)) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]: x / 127.5 - 1."""
    return x.to(torch.float32) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 by (x + 1) * 127.5, rounded and clamped (EDM; ADM floors instead)."""
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _check_opaque(img: Image.Image, path) -> None:
    """Reject an image whose alpha channel is not 255 everywhere."""
    if img.getchannel("A").getextrema()[0] < 255:
        raise UserError(f"image {path} has transparent pixels: flatten it onto a background and save it "
                        "without alpha (e.g. as RGB JPEG/PNG)")


def _to_rgb(img: Image.Image, path) -> Image.Image:
    """Convert a decoded image to RGB; see load_image for the rules."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        _check_opaque(img.convert("RGBA") if img.mode != "RGBA" else img, path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: rescale, do not clip
        grey = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(grey / 257), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise UserError(f"image {path} holds floating-point pixels: save it as 8-bit RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Decode an image file (a path, or an open binary file named `name` in messages) fully and return it as RGB.

    RGB is kept; greyscale (1, L, opaque LA), palette (P), CMYK, YCbCr, LAB and HSV go through
    PIL's `convert("RGB")` (grey replicated to three channels); 16-bit greyscale (I;16, I) is
    divided by 257 and rounded; opaque RGBA drops its alpha. Rejected with a one-line UserError
    naming the file: a missing file, a file that is not an image, a truncated or corrupt one
    (the whole image is decoded; PIL's LOAD_TRUNCATED_IMAGES stays False), any image with a
    non-opaque alpha pixel (flatten it yourself: the right background is yours to choose), and
    floating-point images.
    """
    shown = name or path
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img, shown)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist: check the path") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{shown} is not an image PIL can read: delete it or convert it to PNG/JPEG") from None
    except Image.DecompressionBombError:
        raise UserError(f"image {shown} has more pixels than PIL's safety limit allows: downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"image {shown} is truncated or corrupt ({why}): re-download or re-export it") from None


def psnr(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per image [N] of uint8 images [N, 3, H, W] against `ref`: 10 log10(255^2 / MSE), MSE over the
    pixels where mask [N or 1, 1, H, W] is 1 (all without a mask); inf for identical images."""
    err = (x.double() - ref.double()).square()
    if mask is None:
        mse = err.mean(dim=(1, 2, 3))
    else:
        m = mask.double().expand(x.shape[0], 1, *x.shape[-2:])
        mse = (err * m).sum(dim=(1, 2, 3)) / (3 * m.sum(dim=(1, 2, 3))).clamp_min(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


# ----------------------------------------------------------------------------------------------
# Data sets.

def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()




class _FlipDataset(torch.utils.data.Dataset):
    """Shared indexing: N base items, and with xflip the mirrored copies at N..2N-1."""

    resolution: int
    num_classes: int
    class_names: list[str]

    def __init__(self, resolution: int, xflip: bool):
        if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 1:
            raise UserError(f"resolution={resolution!r} must be a positive integer (e.g. 16, 64)")
        self.resolution, self.xflip = int(resolution), bool(xflip)

    def _num_base(self) -> int:
        raise NotImplementedError

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_base() * (2 if self.xflip else 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, index = self._num_base(), int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)}")
        index %= len(self)
        x, y = self._item(index % n)
        if index >= n:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(y, dtype=torch.int64)


def _list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursive, sorted, hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def scan_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class_names, files, labels) of an ImageNet-layout folder, or of a flat folder (no classes)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = sorted(p for p in root.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_EXTENSIONS))
    per_class = [_list_images(d) for d in subdirs]
    if not any(per_class):  # flat folder: one unlabeled class
        return [], top, [0] * len(top)
    if top:
        raise UserError(f"folder {root} mixes images ({top[0].name}, ...) with class subfolders: move the "
                        "images into a class folder or the class folders out")
    for d, files in zip(subdirs, per_class):
        if not files:
            raise UserError(f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)}): add some or remove it")
    files = [f for fs in per_class for f in fs]
    labels = [c for c, fs in enumerate(per_class) for _ in fs]
    return [d.name for d in subdirs], files, labels


class ImageFolderDataset(_FlipDataset):
    """Images in class subfolders (ImageNet layout: class = sorted folder name) or a flat folder."""

    def __init__(self, root: str | os.PathLike, resolution: int, xflip: bool = False):
        super().__init__(resolution, xflip)
        self.root = Path(root)
        if not self.root.exists():
            raise UserError(f"image folder {self.root} does not exist: check the path")
        if not self.root.is_dir():
            raise UserError(f"{self.root} is not a folder: give a folder of images, an .npz file or 'photos'")
        self.class_names, self.files, self.labels = scan_folder(self.root)
        self.num_classes = len(self.class_names)
        if not self.files:
            raise UserError(f"image folder {self.root} holds no images: accepted extensions are "
                            f"{', '.join(IMAGE_EXTENSIONS)}")

    def _num_base(self) -> int:
        return len(self.files)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        img = adm_center_crop(load_image(self.files[i]), self.resolution)
        return _pil_to_tensor(img), self.labels[i]

    def fingerprint(self) -> str:
        """sha256 over sorted relative paths, sizes and mtimes (plus resolution and xflip)."""
        entries = []
        for f in self.files:
            st = f.stat()
            entries.append([f.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns])
        return _sha256_json({"kind": "folder", "files": entries, "resolution": self.resolution, "xflip": self.xflip})


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, what: str = "npz file"):
    """The one npz reader: yields np.load's NpzFile (arrays read lazily, never unpickled).

    Every way a file can fail to be an npz is a one-line UserError naming it: missing, empty, a plain
    .npy array under an .npz name, a damaged zip, a member that needs pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes): regenerate it")
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] != b"PK" and head != b"\x93NUMPY":
        raise UserError(f"{what} {path} is not an npz archive (no zip header): give a file written by np.savez")
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        why = "it holds pickled objects, which are never loaded" if "pickle" in str(e) else str(e)[:120]
        raise UserError(f"{what} {path} is not a readable npz ({why}): regenerate it with np.savez") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{what} {path} holds a plain {getattr(z, 'dtype', '')} array (an np.save file), not an npz: "
                        "save it with np.savez(path, arr_0=...)")
    with z:
        try:
            yield z
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{what} {path} could not be read ({str(e)[:120]}): regenerate it with np.savez") from None


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """arr_0 (and arr_1 when present) of an ADM sample npz, with one-line errors."""
    with open_npz(path) as z:
        if "arr_0" not in z.files:
            raise UserError(f"npz file {path} has no arr_0 (keys: {', '.join(z.files) or 'none'}): "
                            "store the images as the first positional array of np.savez")
        return z["arr_0"], (z["arr_1"] if "arr_1" in z.files else None)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """The one npz writer: np.savez of `arrays` to `path`, atomically (temp file, fsync, rename)."""
    from pagoda.checkpoint import write_atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare path
            np.savez(f, **arrays)
    return write_atomic(path, write)


def check_npz_arrays(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Images must be uint8 NHWC RGB; labels, if present, N non-negative integers."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UserError(f"npz file {path}: arr_0 is {images.dtype} {tuple(images.shape)}, expected uint8 (N, H, W, 3): "
                        "convert the samples to uint8 NHWC RGB")
    if len(images) == 0:
        raise UserError(f"npz file {path}: arr_0 holds no images (shape {tuple(images.shape)}): give an npz whose "
                        "arr_0 holds at least one uint8 (H, W, 3) image, or rewrite the file")
    if labels is None:
        return
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer) \
            or labels.min() < 0:
        raise UserError(f"npz file {path}: arr_1 is {labels.dtype} {tuple(labels.shape)}, expected {len(images)} "
                        "non-negative integer labels: fix or drop arr_1")


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write an ADM sample npz (arr_0 uint8 NHWC, arr_1 int64 labels when given) atomically."""
    arrays = {"arr_0": np.asarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    return write_npz(path, arrays)


class NpzDataset(_FlipDataset):
    """ADM sample npz: arr_0 uint8 (N, H, W, 3), optional arr_1 integer labels.

    num_classes is max(arr_1) + 1 (0 without arr_1); images of another size go through adm_center_crop.
    """

    def __init__(self, path: str | os.PathLike, resolution: int, xflip: bool = False):
        super().__init__(resolution, xflip)
        self.path = Path(path)
        self.images, labels = read_npz(self.path)
        check_npz_arrays(self.path, self.images, labels)
        self.labels = None if labels is None else labels.astype(np.int64)
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.class_names = [str(c) for c in range(self.num_classes)]

    def _num_base(self) -> int:
        return len(self.images)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if img.shape[:2] != (self.resolution, self.resolution):
            img = np.asarray(adm_center_crop(Image.fromarray(img), self.resolution))
        y = 0 if self.labels is None else int(self.labels[i])
        return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1), y

    def fingerprint(self) -> str:
        """sha256 over the file's sha256 (plus resolution and xflip)."""
        return _sha256_json({"kind": "npz", "sha256": sha256_file(self.path), "resolution": self.resolution,
                             "xflip": self.xflip})


# ----------------------------------------------------------------------------------------------
# The bundled photos.

def _load_photo(name: str) -> np.ndarray:
    """One photograph as uint8 (H, W, 3), from the files inside the scikit-image / scikit-learn wheels."""
    import skimage.data
    if name in ("china", "flower"):  # the files behind sklearn's load_sample_image, without its 2 s import
        folder = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"
        arr = np.asarray(Image.open(folder / f"{name}.jpg").convert("RGB"))
    elif name == "motorcycle":  # stereo_motorcycle() would also decode the right view and disparity
        arr = np.asarray(Image.open(Path(skimage.data.data_dir, "motorcycle_left.png")).convert("RGB"))
    else:
        arr = getattr(skimage.data, name)()
    arr = np.asarray(arr, dtype=np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr[:, :, :3]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[np.ndarray, ...], str]:
    """All photographs in PHOTO_CLASSES order, and a sha256 of their pixels."""
    arrays = tuple(_load_photo(name) for name in PHOTO_CLASSES)
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(a.shape).encode() + a.tobytes())
    return arrays, h.hexdigest()


def photo_crop_boxes(height: int, width: int, split: str, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` square crop boxes (left, top, right, bottom) inside the split's region of a photo.

    The held-out region is the right-most 1/PHOTOS_HELDOUT_FRACTION of the columns, the train
    region the rest, so no pixel is shared. Both splits draw sides log-uniformly in
    [s_max / PHOTOS_SCALE_RANGE, s_max] with s_max the largest square that fits the held-out strip.
    """
    border = width - width // PHOTOS_HELDOUT_FRACTION
    x_lo, x_hi = (0, border) if split == "train" else (border, width)
    s_max = min(height, width - border)
    sides = np.exp(rng.uniform(np.log(s_max / PHOTOS_SCALE_RANGE), np.log(s_max), count)).round().astype(int)
    lefts = x_lo + (rng.random(count) * (x_hi - x_lo - sides + 1)).astype(int)
    tops = (rng.random(count) * (height - sides + 1)).astype(int)
    return np.stack([lefts, tops, lefts + sides, tops + sides], axis=1)


@functools.lru_cache(maxsize=16)
def _build_photos(resolution: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All crops of one split at one resolution: uint8 [N, 3, R, R] and int64 labels [N]."""
    arrays, _ = _photos()
    images, labels = [], []
    for c, arr in enumerate(arrays):
        rng = np.random.default_rng([PHOTOS_SEED, c, ("train", "heldout").index(split)])
        photo = Image.fromarray(arr)
        for box in photo_crop_boxes(arr.shape[0], arr.shape[1], split, rng, PHOTOS_CROPS[split]):
            images.append(np.asarray(adm_center_crop(photo.crop(tuple(int(v) for v in box)), resolution)))
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


class PhotosDataset(_FlipDataset):
    """The bundled offline set: deterministic square crops of 16 photographs, one class each."""

    def __init__(self, resolution: int, split: str = "train", xflip: bool = False):
        super().__init__(resolution, xflip)
        if split not in PHOTOS_CROPS:
            raise UserError(f"photos split {split!r} is unknown: use 'train' or 'heldout'")
        if not 4 <= resolution <= 128:
            raise UserError(f"photos resolution {resolution} is out of range: use 4..128 (e.g. 8, 16, 32, 64)")
        self.split, self.num_classes, self.class_names = split, len(PHOTO_CLASSES), list(PHOTO_CLASSES)
        self.images, self.labels = _build_photos(resolution, split)

    def _num_base(self) -> int:
        return len(self.images)

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].clone(), int(self.labels[i])

    def fingerprint(self) -> str:
        """sha256 over the build parameters, the code version and the source pixels."""
        return _sha256_json({"kind": "photos", "version": PHOTOS_VERSION, "classes": PHOTO_CLASSES,
                             "seed": PHOTOS_SEED, "crops": PHOTOS_CROPS, "heldout": PHOTOS_HELDOUT_FRACTION,
                             "scale": PHOTOS_SCALE_RANGE, "source": _photos()[1], "split": self.split,
                             "resolution": self.resolution, "xflip": self.xflip})


NATIVE_CHECK_FILES = 2048  # an image folder's native size is read from at most this many evenly spaced headers


def native_side(dataset) -> tuple[int, str] | None:
    """(smallest image side in pixels before any resizing, what was checked) of a data set, or None where it
    has no fixed source pixels below its crops (photos crops the full photographs, never upscaled past 128 px).
    An npz: its array's height and width. A folder: the headers of every image, or of NATIVE_CHECK_FILES evenly
    spaced ones in a larger folder (each is a header read, not a decode)."""
    if isinstance(dataset, NpzDataset):
        return int(min(dataset.images.shape[1:3])), f"its {len(dataset.images)} images"
    if isinstance(dataset, ImageFolderDataset):
        files = dataset.files
        if len(files) > NATIVE_CHECK_FILES:
            files = [files[i * len(files) // NATIVE_CHECK_FILES] for i in range(NATIVE_CHECK_FILES)]
        what = f"{'all ' if len(files) == len(dataset.files) else ''}{len(files)} of its {len(dataset.files)} images"
        return min(_smaller_side(f, dataset.root) for f in files), what
    return None


def _smaller_side(path: Path, root) -> int:
    """The smaller side of an image file, from its header; UserError naming it when it cannot be read."""
    try:
        with Image.open(path) as img:
            return min(img.size)
    except (OSError, Image.DecompressionBombError):
        raise UserError(f"{path} is not a readable image: remove it from {root}") from None


def check_native_resolution(dataset, source: str, resolution: int, why: str) -> None:
    """UserError when the data's images are smaller than `resolution`: they would reach it only by upscaling,
    and a model trained or scored on upscaled images learns the upscaler's blur, not the data."""
    found = native_side(dataset)
    if found is not None and found[0] < resolution:
        raise UserError(f"data {source} has images of {found[0]} px ({found[1]} checked), smaller than the "
                        f"{resolution} px {why}: they would be upscaled; give data at {resolution} px or more")


def build_dataset(source: str, resolution: int, *, xflip: bool = False, split: str = "train") -> _FlipDataset:
    """'photos' -> PhotosDataset, '*.npz' -> NpzDataset, a folder -> ImageFolderDataset."""
    if source == "photos":
        return PhotosDataset(resolution, split=split, xflip=xflip)
    if split != "train":
        raise UserError(f"split {split!r} exists only for 'photos'; {source} has one split: leave split='train'")
    if str(source).lower().endswith(".npz"):
        return NpzDataset(source, resolution, xflip=xflip)
    if Path(source).is_dir():
        return ImageFolderDataset(source, resolution, xflip=xflip)
    if not Path(source).exists():
        raise UserError(f"data source {source} does not exist: give 'photos', an image folder or an .npz file")
    raise UserError(f"data source {source} is neither 'photos', a folder nor an .npz file: pass one of those")
