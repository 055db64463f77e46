"""Sample stores people have, beside a flat folder and an ADM npz: zip and tar archives, webdataset tar shards, and
EDM2's nested seed folders. Each is a random-access Source with the folder's checks (one size for all images,
decodable files; the image decoder and its rules are pagoda.data.load_image's), so an image gives the same uint8
pixels, hence bit-equal features, from any of them.

- `samples.zip`, `samples.tar`: every image member (sorted by name, folders inside included); unlabelled.
- webdataset shards, `shards/train-{000000..000009}.tar` (brace range) or `shards/*.tar` (glob): the samples of
  every shard in order, each the group of members sharing a key (`KEY.png`, `KEY.cls`, ...); with a `.cls` member
  (an integer) per sample, that is its label.
- EDM2's generator writes seed s to `OUT/{s - s % 1000:06d}/{s:06d}.png`: such a folder is one unlabelled
  store in seed order, not 1000-image classes (pagoda.data.scan_folder's ImageNet layout).
Compressed tars (.tar.gz, .tgz) are refused: they have no random access (decompress them first).
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from eval.sources import Source
from pagoda.data import IMAGE_EXTENSIONS, load_image
from pagoda.errors import UserError
from pagoda.weights import sha256_file

ARCHIVE_SUFFIXES = (".zip", ".tar")
COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def is_archive_spec(spec: str) -> bool:
    """Whether `spec` names a zip, a tar, or tar shards (brace range or glob)."""
    return spec.lower().endswith(ARCHIVE_SUFFIXES + COMPRESSED_TAR)


def expand_shards(spec: str) -> list[Path]:
    """The files of `spec`: one archive, a brace range `a-{000..009}.tar` (zero padding kept) or a glob."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo:
            raise UserError(f"{spec}: the range {{{m.group(1)}..{m.group(2)}}} is empty: write {{low..high}}")
        paths = [Path(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():]) for i in range(lo, hi + 1)]
    elif glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec))
        if not paths:
            raise UserError(f"{spec} matches no file: check the pattern")
    else:
        paths = [Path(spec)]
    for p in paths:
        if not p.is_file():
            raise UserError(f"archive {p} does not exist: check the path" + (f" (from {spec})" if len(paths) > 1 else ""))
    return paths


class _Archive:
    """One zip or tar, opened lazily (per process), read member by member."""

    def __init__(self, path: Path):
        self.path, self._handle = path, None
        if path.name.lower().endswith(COMPRESSED_TAR):
            raise UserError(f"{path} is a compressed tar, which cannot be read out of order: decompress it "
                            f"(e.g. gunzip / tar xf) and pass the .tar or the folder")
        self.kind = "zip" if zipfile.is_zipfile(path) else "tar" if tarfile.is_tarfile(path) else None
        if self.kind is None:
            raise UserError(f"{path} is neither a zip nor a tar archive (or it is damaged): check the file")
        try:
            if self.kind == "zip":
                self.members = {i.filename: i for i in self.handle.infolist() if not i.is_dir()}
            else:
                self.members = {m.name: m for m in self.handle.getmembers() if m.isfile()}
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{path} could not be listed ({type(e).__name__}): the archive is damaged") from None

    @property
    def handle(self):
        if self._handle is None:
            self._handle = zipfile.ZipFile(self.path) if self.kind == "zip" else tarfile.open(self.path, "r:")
        return self._handle

    def open(self, name: str):
        """A binary file object reading the member (decompressed as it is read)."""
        try:
            if self.kind == "zip":
                return self.handle.open(self.members[name])
            return self.handle.extractfile(self.members[name])
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise UserError(f"{self.path}:{name} could not be read ({type(e).__name__}): the archive is damaged") from None

    def read(self, name: str) -> bytes:
        try:
            with self.open(name) as f:
                return f.read()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise UserError(f"{self.path}:{name} could not be read ({type(e).__name__}): the archive is damaged") from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS) and "/." not in "/" + name


class ArchiveSource(Source):
    """The images of a zip, a tar or webdataset tar shards (see the module docstring); labels from `.cls` members."""

    def __init__(self, spec: str):
        self.spec, self.name = spec, spec
        self.archives = [_Archive(p) for p in expand_shards(spec)]
        self.items: list[tuple[int, str]] = []  # (archive, member) of sample i
        labels: list[int | None] = []
        for a, archive in enumerate(self.archives):
            for member in sorted(n for n in archive.members if _is_image(n)):
                self.items.append((a, member))
                cls = member.rsplit(".", 1)[0] + ".cls"
                labels.append(self._label(archive, cls) if cls in archive.members else None)
        if not self.items:
            raise UserError(f"{spec} holds no images ({' '.join(IMAGE_EXTENSIONS)}): check the archive")
        if any(y is None for y in labels) and any(y is not None for y in labels):
            a, member = self.items[labels.index(None)]
            raise UserError(f"{self.archives[a].path}:{member} has no .cls label but other samples do: give every "
                            "sample a KEY.cls or none")
        self.labels = None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.num_samples = len(self.items)
        sizes = {}
        for i in range(self.num_samples):  # the folder's check: one size for all, every file an image
            sizes.setdefault(self._size(i), i)
            if len(sizes) > 1:
                (s0, i0), (s1, i1) = sizes.items()
                raise UserError(f"image {self._where(i1)} is {s1[0]}x{s1[1]} but {self._where(i0)} is {s0[0]}x{s0[1]}: "
                                f"all images of {spec} must have one size (resize them)")
        (w, h), = sizes
        self.resolution = w if w == h else None

    def _label(self, archive: _Archive, cls: str) -> int:
        text = archive.read(cls).decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise UserError(f"{archive.path}:{cls} holds {text[:20]!r}, not a class id (a non-negative integer)")
        return int(text)

    def _where(self, i: int) -> str:
        a, member = self.items[i]
        return f"{self.archives[a].path}:{member}"

    def _size(self, i: int) -> tuple[int, int]:
        a, member = self.items[i]
        try:
            with self.archives[a].open(member) as f, Image.open(f) as im:  # the header only, as a folder's check
                return im.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise UserError(f"image {self._where(i)} is corrupt or not an image: delete or replace it") from None

    def load(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = []
        for i in index.tolist():
            a, member = self.items[i]
            img = load_image(io.BytesIO(self.archives[a].read(member)), name=self._where(i))
            images.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1))
        return torch.stack(images), None if self.labels is None else self.labels[index]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for archive in self.archives:
            h.update(sha256_file(archive.path).encode())
        return h.hexdigest()

    def cache_key(self) -> str:
        return f"archive:{self.fingerprint()}"

    def close(self) -> None:
        for archive in self.archives:
            archive.close()


def edm2_seed_files(root: Path) -> list[Path] | None:
    """The images of `root` in seed order when it is laid out as EDM2's generate_images.py writes (every entry a
    folder `{k * 1000:06d}` holding only `{s:06d}.png` with s // 1000 == k), else None."""
    dirs = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not dirs or not all(p.is_dir() and re.fullmatch(r"\d{6}", p.name) and int(p.name) % 1000 == 0 for p in dirs):
        return None
    files = []
    for d in sorted(dirs):
        names = [f for f in d.iterdir() if not f.name.startswith(".")]
        if not all(f.is_file() and re.fullmatch(r"\d{6,}\.png", f.name) and int(f.stem) // 1000 * 1000 == int(d.name)
                   for f in names):
            return None
        files += sorted(names, key=lambda f: int(f.stem))
    return files or None
