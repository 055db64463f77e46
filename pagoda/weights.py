"""Local weight files of pretrained networks (feature extractors, backbones): where they live, what they
hash to, how to load them. Also the project's one SHA-256 helper for files.

Nothing here downloads. A file is looked up in `--weights-dir`, else `$PAGODA_WEIGHTS`, else
`./weights`; a missing file fails at once with the name to fetch, where it is published and
where to put it. Files are read without running pickled code (`torch.load(weights_only=True)`
or safetensors), and every file's SHA-256 is computed so result rows can record it.
"""

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.errors import UserError

ENV = "PAGODA_WEIGHTS"


@dataclass(frozen=True)
class WeightsSpec:
    """One published weight file: accepted local names, its address, its official SHA-256(s)."""

    key: str  # short name used in messages
    files: tuple[str, ...]  # accepted names, relative to the weights folder; the first is preferred
    url: str  # where the official file is published
    sha256: tuple[str, ...]  # hashes of the official file(s); empty = not pinned (see `what`)
    what: str  # one line: what the file holds


# The Inception file of torch-fidelity and pytorch-fid is byte-identical (95,628,359 bytes); the
# `6726825d` in both names is the prefix of this hash (torch.hub's naming rule).
INCEPTION = WeightsSpec(
    key="inception",
    files=("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth"),
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    sha256=("6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",),
    what="TF 2015-12-05 Inception-v3 ported to PyTorch (state dict, torchvision key names)",
)


def _dinov2_spec(key: str, arch: str, hub: str) -> WeightsSpec:
    """DINOv2 weights as timm publishes them on the Hugging Face hub, or the torch.hub file of
    facebookresearch/dinov2 (`{hub}_pretrain.pth`, the same tensors plus an unused mask token); not pinned."""
    return WeightsSpec(
        key=key,
        files=(f"{arch}.safetensors", f"{arch}/model.safetensors", f"{arch}.pth", f"{hub}_pretrain.pth"),
        url=f"https://huggingface.co/timm/{arch}/resolve/main/model.safetensors",
        sha256=(),
        what=f"timm {arch} state dict, or torch.hub's {hub}_pretrain.pth "
             f"(https://dl.fbaipublicfiles.com/dinov2/{hub}/{hub}_pretrain.pth)",
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
    "dinov2-vitb14": _dinov2_spec("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14"),
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


def find_weights_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder to search: `path`, else `$PAGODA_WEIGHTS`, else `./weights` when it exists."""
    if path is not None:
        return Path(path)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path("weights") if Path("weights").is_dir() else None


def resolve_weights(spec: WeightsSpec | str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The local file for `spec`; a UserError naming file, source and destination when absent."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    folder = find_weights_dir(weights_dir)
    if folder is not None:
        for name in spec.files:
            if (folder / name).is_file():
                return folder / name
    where = f"in {folder}" if folder is not None else f"(no --weights-dir given, ${ENV} unset, no ./weights)"
    dest = folder / spec.files[0] if folder is not None else f"${ENV}/{spec.files[0]}"
    get = spec.url if spec.url.startswith("made by") else f"fetch it from {spec.url}"
    also = f" (also accepted there: {', '.join(spec.files[1:])})" if spec.files[1:] else ""
    raise UserError(f"{spec.key} weights not found {where}: put {spec.files[0]} at {dest} (or in the folder named "
                    f"by --weights-dir DIR / ${ENV}){also}; {get}")


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def update_sha256(h, path: str | os.PathLike):
    """Feed a file's bytes (1 MiB chunks) into the hashlib object `h`; returns h."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, cached by (path, size, mtime)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = update_sha256(hashlib.sha256(), path).hexdigest()
    return _SHA_CACHE[key]


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
