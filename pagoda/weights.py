"""Weight files of pretrained networks (feature extractors, backbones) and other published files (reference
statistics): where they live, what they hash to, how they are fetched on first use and loaded.

A file is looked up in `--weights-dir` when one is given, else in the cache (`$PAGODA_WEIGHTS`, else
`$XDG_CACHE_HOME/pagoda`, else `~/.cache/pagoda`) and then `./weights`. A missing file is downloaded into
that folder (pagoda.download: atomic, resumed, progress bar) from its publisher, or from `$PAGODA_MIRROR`
(an http(s) base URL or a folder holding the files under their cache names, for clusters behind a firewall).
`PAGODA_OFFLINE=1` (the CLIs' `--offline`) never touches the network: a missing file is one line naming the
file, its SHA-256 and where to copy it. `PAGODA_PUBLISHER_BASE` (tests only) sends publisher URLs to a local
server: `https://host/path` becomes `BASE/host/path`.

Trust, recorded in result rows as `weights_trust`:
- "pinned": the file's SHA-256 is a published one (each pin names where it was read);
- "first use": no hash is published; the file's SHA-256 was recorded beside it (`NAME.sha256`) when it was
  downloaded, and any later change to the file is refused;
- "unverified": put in place by hand, no published or recorded hash to check it against;
- "not official": it differs from the published hash (a warning says so; strict checks refuse it);
- "made here": trained by this project (the photos classifier), so no one else's hash applies.
Files are read without running pickled code (`torch.load(weights_only=True)` or safetensors).
"""

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.download import copy_verified, download, record_first_use, recorded_sha256, update_sha256
from pagoda.errors import UserError

ENV = "PAGODA_WEIGHTS"


@dataclass(frozen=True)
class WeightsSpec:
    """One published weight file: accepted local names, its address, its official SHA-256(s)."""

    key: str  # short name used in messages
    files: tuple[str, ...]  # accepted names, relative to the weights folder; the first is preferred
    url: str  # where the official file is published
    sha256: tuple[str, ...]  # hashes of the official file(s); empty = not pinned (trust on first use)
    what: str  # one line: what the file holds
    pin_source: str = ""  # where the pinned hash was read (required when sha256 is given)

    @property
    def downloadable(self) -> bool:
        """Whether the file has an address to fetch it from (the domain net is made by this project)."""
        return self.url.startswith(("http://", "https://"))


# The Inception file of torch-fidelity and pytorch-fid is byte-identical (95,628,359 bytes); the
# `6726825d` in both names is the prefix of this hash (torch.hub's naming rule).
INCEPTION_PIN = ("the full digest as pinned for pytorch-fid's byte-identical pt_inception-2015-12-05-6726825d.pth by "
                 "snap-research/discoscene@3b15039f models/inception_model.py (_MODEL_URL_SHA256); its first 8 digits "
                 "are the 6726825d of torch-fidelity's file name (torch.hub naming)")
INCEPTION = WeightsSpec(
    key="inception",
    files=("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    sha256=("6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",),
    what="TF 2015-12-05 Inception-v3 ported to PyTorch (state dict, torchvision key names)",
    pin_source=INCEPTION_PIN,
)


def _dinov2_spec(key: str, arch: str, hub: str, sha256: str = "") -> WeightsSpec:
    """DINOv2 weights as timm publishes them on the Hugging Face hub, or the torch.hub file of
    facebookresearch/dinov2 (`{hub}_pretrain.pth`, the same tensors plus an unused mask token); pinned where the
    hub page's Git LFS details were read."""
    url = f"https://huggingface.co/timm/{arch}/resolve/main/model.safetensors"
    return WeightsSpec(
        key=key,
        files=(f"{arch}.safetensors", f"{arch}/model.safetensors", f"{arch}.pth", f"{hub}_pretrain.pth"),
        url=url,
        sha256=(sha256,) if sha256 else (),
        what=f"timm {arch} state dict, or torch.hub's {hub}_pretrain.pth "
             f"(https://dl.fbaipublicfiles.com/dinov2/{hub}/{hub}_pretrain.pth)",
        pin_source=f"Git LFS SHA256 on {url.replace('/resolve/', '/blob/')} (commit b999a3f)" if sha256 else "",
    )


def _clip_spec(key: str, model: str, hf_repo: str) -> WeightsSpec:
    """open_clip state dicts of OpenAI's CLIP (TorchScript archives are refused; hash not pinned)."""
    return WeightsSpec(
        key=key,
        files=(
            f"{model}-openai.safetensors",
            f"{model}-openai/open_clip_model.safetensors",
            f"{model}-openai/open_clip_pytorch_model.bin",
            f"{hf_repo.split('/')[-1]}/open_clip_model.safetensors",
        ),
        url=f"https://huggingface.co/{hf_repo}/resolve/main/open_clip_model.safetensors",
        sha256=(),
        what=f"open_clip {model} (pretrained='openai') state dict",
    )


def _timm_spec(key: str, arch: str, tag: str, hub_file: str, hub_url: str) -> WeightsSpec:
    """A timm classifier as timm publishes it on the Hugging Face hub, or its original torch.hub file (whose name
    carries the first 8 hex digits of its SHA-256, torch.hub's naming rule); not pinned."""
    return WeightsSpec(
        key=key,
        files=(f"{arch}.{tag}.safetensors", f"{arch}.{tag}/model.safetensors", hub_file),
        url=f"https://huggingface.co/timm/{arch}.{tag}/resolve/main/model.safetensors",
        sha256=(),
        what=f"timm {arch} state dict (classifier heads included), or {hub_file} ({hub_url})",
    )


# Frozen backbones of PaGoDA's reconstruction distance and discriminator (pagoda.networks.features `paper`).
DEIT = _timm_spec("deit-base-distilled", "deit_base_distilled_patch16_224", "fb_in1k",
                  "deit_base_distilled_patch16_224-df68dfff.pth",
                  "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth")
EFFICIENTNET_LITE0 = _timm_spec(
    "efficientnet-lite0", "tf_efficientnet_lite0", "in1k", "tf_efficientnet_lite0-0aa007d2.pth",
    "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_lite0-0aa007d2.pth")

SPECS: dict[str, WeightsSpec] = {
    "inception": INCEPTION,
    "dinov2": _dinov2_spec("dinov2", "vit_large_patch14_dinov2.lvd142m", "dinov2_vitl14"),
    "dinov2-vitb14": _dinov2_spec("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14",
                                  "55cbb5d887b336d430e649c277b85a1429e724871f9d02ac16203235886d8c7b"),
    "dinov2-vits14": _dinov2_spec("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", "dinov2_vits14"),
    "clip": _clip_spec("clip", "ViT-L-14", "timm/vit_large_patch14_clip_224.openai"),
    "clip-vitb32": _clip_spec("clip-vitb32", "ViT-B-32", "timm/vit_base_patch32_clip_224.openai"),
    "clip-vitl14-336": _clip_spec("clip-vitl14-336", "ViT-L-14-336", "timm/vit_large_patch14_clip_336.openai"),
    "deit-base-distilled": DEIT,
    "efficientnet-lite0": EFFICIENTNET_LITE0,
    "domain": WeightsSpec(
        key="domain",
        files=("domain-photos.safetensors",),
        url="made by this project: `python -m pagoda domain -o <weights dir>/domain-photos.safetensors` writes it",
        sha256=(),
        what="the project's classifier of the bundled photos (its hash depends on the training run)",
    ),
}


def cache_home() -> Path:
    """pagoda's per-user cache folder: $XDG_CACHE_HOME/pagoda, else ~/.cache/pagoda."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagoda"


def cache_dir() -> Path:
    """Where fetched files go: $PAGODA_WEIGHTS, else cache_home()."""
    return Path(os.environ[ENV]) if os.environ.get(ENV) else cache_home()


def find_weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder a missing file is fetched into: `path` (--weights-dir), else the cache (cache_dir)."""
    return Path(path) if path is not None else cache_dir()


def search_dirs(path: str | os.PathLike | None = None) -> list[Path]:
    """Folders looked in, in order: `path` alone when given; else the cache, then ./weights when it exists."""
    if path is not None:
        return [Path(path)]
    return [cache_dir()] + ([Path("weights")] if Path("weights").is_dir() else [])


def offline() -> bool:
    """Whether PAGODA_OFFLINE forbids the network (1 / true / yes / on)."""
    return os.environ.get("PAGODA_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def publisher_url(url: str) -> str:
    """`url`, or, with PAGODA_PUBLISHER_BASE set (tests: a loopback server), BASE/host/path."""
    base = os.environ.get("PAGODA_PUBLISHER_BASE")
    if not base:
        return url
    return base.rstrip("/") + "/" + url.split("://", 1)[1]


def _mirror() -> str | None:
    return os.environ.get("PAGODA_MIRROR") or None


def _pin_text(spec: WeightsSpec) -> str:
    return f"SHA-256 {spec.sha256[0]}" if spec.sha256 else "no published SHA-256"


def fetch(spec: WeightsSpec, folder: Path) -> Path:
    """Put the file of `spec` into `folder` from the mirror or its publisher; returns its path.

    A mirror (PAGODA_MIRROR) is a folder or a file:// / http(s):// base holding the file under its name
    (spec.files[0]); else the publisher's URL. A pinned file must match its pin; an unpinned one gets its
    first-use record (`NAME.sha256`). UserError when offline, unreachable or wrong (see pagoda.download).
    """
    name, dest = spec.files[0], folder / spec.files[0]
    what = f"{spec.key} ({name})"
    mirror = _mirror()
    local_mirror = mirror is not None and "://" not in mirror or (mirror or "").startswith("file://")
    record = None if spec.sha256 else (lambda digest: record_first_use(dest, digest, source))
    if mirror and local_mirror:
        src = Path(mirror.removeprefix("file://")) / name
        if not src.parent.is_dir():
            raise UserError(f"{what}: PAGODA_MIRROR={mirror} is not a folder (nor an http(s):// address): check the "
                            "path, or unset PAGODA_MIRROR")
        if not src.is_file():
            raise UserError(f"{what}: PAGODA_MIRROR={mirror} holds no {name}: copy the file there ({_pin_text(spec)}; "
                            f"published at {spec.url}) or unset PAGODA_MIRROR")
        source = str(src)
        copy_verified(src, dest, sha256=spec.sha256, what=what, before_rename=record)
    else:
        source = f"{mirror.rstrip('/')}/{name}" if mirror else publisher_url(spec.url)
        if offline():
            raise UserError(f"{what} is not in {', '.join(map(str, search_dirs_of(folder)))} and PAGODA_OFFLINE=1 "
                            f"forbids the download: copy {name} ({_pin_text(spec)}) from {source} to {dest}, or "
                            "unset PAGODA_OFFLINE / drop --offline")
        print(f"fetching {what} from {source} -> {dest}", file=sys.stderr)
        download(source, dest, sha256=spec.sha256, what=what, before_rename=record)
    return dest


def search_dirs_of(folder: Path) -> list[Path]:
    """The folders a lookup that fetches into `folder` searched (for messages)."""
    return [folder] if folder != cache_dir() else search_dirs()


def resolve_weights(spec: WeightsSpec | str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The local file for `spec`, fetched on first use (see the module docstring); a one-line UserError naming
    the file, its hash and where to put it when it cannot be had."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    for folder in search_dirs(weights_dir):
        for name in spec.files:
            if (folder / name).is_file():
                return folder / name
    folder = find_weights_dir(weights_dir)
    if spec.downloadable:
        return fetch(spec, folder)
    where = ", ".join(map(str, search_dirs(weights_dir)))
    also = f" (also accepted there: {', '.join(spec.files[1:])})" if spec.files[1:] else ""
    raise UserError(f"{spec.key} weights not found in {where}: put {spec.files[0]} at {folder / spec.files[0]} (or in "
                    f"the folder named by --weights-dir DIR / ${ENV}){also}; {spec.url}")


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, cached by (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = update_sha256(hashlib.sha256(), path).hexdigest()
    return _SHA_CACHE[key]


def verify(path: Path, spec: WeightsSpec, *, strict: bool = False) -> tuple[str, str]:
    """(SHA-256, trust) of the file of `spec` at `path`; trust is "pinned", "first use", "unverified", "made here"
    or "not official" (see the module docstring). A pinned spec's other files warn (with strict: UserError); a file
    that changed since its first-use record is refused (UserError) whatever strict says."""
    digest = check_sha256(path, spec, strict=strict)
    return digest, trust_of(path, spec, digest)


def trust_of(path: Path, spec: WeightsSpec, digest: str) -> str:
    """The trust of a file whose SHA-256 is `digest` (no warning); UserError when it changed since its first use."""
    if spec.sha256:
        return "pinned" if digest in spec.sha256 else "not official"
    if not spec.downloadable:
        return "made here"  # the domain net: trained by this project, its hash is the run's
    recorded = recorded_sha256(path)
    if recorded is None:
        return "unverified"
    if recorded != digest:
        raise UserError(f"{path} changed since its first download (SHA-256 {digest[:16]}..., recorded "
                        f"{recorded[:16]}... in {path.name}.sha256): delete both files to fetch it again, or "
                        "delete the .sha256 record to trust the file in place")
    return "first use"


def check_sha256(path: Path, spec: WeightsSpec, *, strict: bool = False) -> str:
    """Hash `path`; warn (or, with strict, raise) when it is not an official file of `spec`."""
    digest = sha256_file(path)
    if spec.sha256 and digest not in spec.sha256:
        msg = (
            f"{path}: SHA-256 {digest[:16]}... is not the official {spec.key} file ({spec.sha256[0][:16]}...); "
            f"numbers will not match published ones: fetch the file from {spec.url}"
        )
        if strict:
            raise UserError(msg)
        warnings.warn(msg, stacklevel=2)
    return digest


def load_state_dict(path: str | os.PathLike, spec: WeightsSpec | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict, never executing pickled code."""
    path = Path(path)
    source = f"; fetch it again from {spec.url}" if spec is not None else ""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, TorchScript archive, bad header ...
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"weights file {path} could not be read ({first}): it is truncated or not a state dict{source}") from e
    for wrapper in ("state_dict", "model"):  # checkpoints that wrap the state dict one level down
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"weights file {path} holds {type(sd).__name__}, not a dict of tensors{source}")
    return {k.removeprefix("module."): v for k, v in sd.items()}
