"""Named references: the field's published reference statistics, fetched and checked on first use.

    python -m eval.fid --images samples.npz --ref imagenet64
    python -m eval.ref --list

`--ref NAME` (eval.fid, eval.run, bench.compare, the library's `evaluate`) resolves NAME here; a file is fetched
into the weights cache like the extractors' weights (pagoda.weights: mirror, offline mode, atomic and resumed
downloads). No SHA-256 is published for any of these files, so each is trusted on first use: its hash is
recorded beside it at the first download, and a later change is refused. A path to a file is used as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pagoda.errors import UserError
from pagoda.weights import WeightsSpec, resolve_weights, search_dirs, verify

ADM_BASE = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
ADM_SOURCE = "openai/guided-diffusion@22e0df8 evaluations/README.md"
ADM_PROTOCOL = ("ADM evaluator reference batch: TF Inception pool_3 statistics (mu, sigma; sFID's mu_s, sigma_s) "
                "'over the whole dataset' (ImageNet at {r} px) and 10,000 images (arr_0) "
                "for precision / recall")
EDM2_BASE = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs"
EDM2_PROTOCOL = ("EDM2 dataset reference (pickle, read without running code): float64 mean / covariance of "
                 "Inception ('fid', 2048-d) and DINOv2 ViT-L/14 ('fd_dinov2', 1024-d; EDM2's torch resize, "
                 "--resize edm2-torch) features of ImageNet train at {r} px; no images, so no P/R or KID")


@dataclass(frozen=True)
class NamedRef:
    """One published reference: its file (a WeightsSpec: name, URL, pins), resolution and protocol."""

    name: str
    spec: WeightsSpec
    resolution: int
    protocol: str
    source: str  # where the address was read

    def row(self) -> dict:
        """What `eval.ref --list` prints for it."""
        pin = f"pinned {self.spec.sha256[0][:16]}..." if self.spec.sha256 else "first use"
        return dict(name=self.name, resolution=self.resolution, file=self.spec.files[0], trust=pin,
                    url=self.spec.url, source=self.source, protocol=self.protocol)


def _adm(resolution: int, file: str) -> NamedRef:
    url = f"{ADM_BASE}/{resolution}/{file}"
    return NamedRef(f"imagenet{resolution}", WeightsSpec(key=f"imagenet{resolution}", files=(file,), url=url,
                                                        sha256=(), what=f"ADM reference batch, ImageNet {resolution} px"),
                    resolution, ADM_PROTOCOL.format(r=resolution), ADM_SOURCE)


def _edm2(resolution: int, source: str) -> NamedRef:
    file = f"img{resolution}.pkl"
    return NamedRef(f"edm2-img{resolution}", WeightsSpec(key=f"edm2-img{resolution}", files=(f"edm2-{file}",),
                                                         url=f"{EDM2_BASE}/{file}", sha256=(),
                                                         what=f"EDM2 dataset reference, ImageNet {resolution} px"),
                    resolution, EDM2_PROTOCOL.format(r=resolution), source)


NAMED: dict[str, NamedRef] = {r.name: r for r in (
    _adm(64, "VIRTUAL_imagenet64_labeled.npz"),
    _adm(128, "VIRTUAL_imagenet128_labeled.npz"),
    _adm(256, "VIRTUAL_imagenet256_labeled.npz"),
    _adm(512, "VIRTUAL_imagenet512.npz"),  # the 512 px batch has no `_labeled` in its name (ADM's README)
    _edm2(64, "the folder is named in NVlabs/edm2@4bf8162 README.md; img64.pkl is the name third-party READMEs "
              "fetch (not written in EDM2's own text)"),
    _edm2(512, "NVlabs/edm2@4bf8162 README.md and calculate_metrics.py"),
)}


def is_named(ref: str) -> bool:
    """Whether `ref` names a published reference (and is not a path to a file that exists)."""
    return ref in NAMED and not Path(ref).exists()


def resolve_ref(ref: str, weights_dir: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """(local path, trust) of `ref`: a named reference fetched on first use (into --weights-dir, else the cache)
    and checked against its first-use record ("first use"; a file changed since is refused), or the path as
    given (trust None). UserError for a name that is neither (listing the names)."""
    if is_named(ref):
        spec = NAMED[ref].spec
        path = resolve_weights(spec, weights_dir)
        _, trust = verify(path, spec)
        return str(path), trust
    if not Path(ref).exists() and "/" not in ref and "." not in ref:
        raise UserError(f"reference {ref!r} is neither a file nor a named reference: give a path, or one of "
                        f"{', '.join(NAMED)} (python -m eval.ref --list)")
    return ref, None


def refetch_hint(ref: str, path: str) -> str:
    """What to do about a fetched named reference that cannot be read (a damaged download trusted on first use)."""
    return (f"it was fetched as the named reference {ref}: delete {path} and {path}.sha256 and rerun to fetch it "
            "again")


def format_list(weights_dir: str | os.PathLike | None = None) -> str:
    """The named references, one block each: name, resolution, file, trust, where it is (or "not fetched yet"),
    URL, source, protocol."""
    lines = []
    for r in NAMED.values():
        row = r.row()
        here = [d / row["file"] for d in search_dirs(weights_dir) if (d / row["file"]).is_file()]
        lines.append(f"{row['name']:<12} {row['resolution']:>4} px  {row['file']}  ({row['trust']}; "
                     f"{here[0] if here else 'not fetched yet'})")
        lines += [f"    url:      {row['url']}", f"    source:   {row['source']}", f"    protocol: {row['protocol']}"]
    return "\n".join(lines)
