"""Checkpoints: safetensors models that rebuild themselves, and the atomic training state beside them.

A model file is plain safetensors (nothing is unpickled on load) whose metadata holds
`"format": "pagoda-1"` and, under `"pagoda"`, the JSON meta: kind, stage, resolution, num_classes,
network (UNetConfig fields), diffusion, sample, the full stage config, step, ema_rate, git commit,
versions, time. `build_network(meta)` needs nothing else (the k-diffusion convention).

The training state (`state.pt`: step, weights, EMA, optimizer, scaler) is a torch.save of tensors
and primitives only, read back with `weights_only=True`. Every write goes to a temp file in the
same folder, is fsynced, then renamed over the target: a crash leaves the old file or the new one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from pagoda.config import DiffusionConfig, UNetConfig, from_dict, to_dict
from pagoda.diffusion import EDMPrecond
from pagoda.errors import UserError, write_atomic
from pagoda.version import __version__, git_commit

FORMAT = "pagoda-1"  # bump when the meta layout changes incompatibly
_IMPORT_HINT = "for the public EDM ImageNet-64 teacher run `python -m pagoda import-edm SRC.pt -o OUT.safetensors`"


# ---------------------------------------------------------------------------------------------
# Model files (safetensors + JSON meta).

def _plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses shared or strided ones)."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()  # tied weights are stored twice and tied again by load_state_dict
        seen.add(ptr)
        out[name] = t
    return out


def tensors_sha256(tensors: dict[str, torch.Tensor], meta_json: str = "") -> str:
    """SHA-256 (hex) of the JSON meta text and a state dict's names, dtypes, shapes and raw bytes, in name order:
    the checksum a model file carries (metadata key "sha256"), since safetensors itself stores none and a
    changed byte in the tensor data or in the meta (its network config, say) would otherwise load silently."""
    import hashlib
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a model file: tensors + meta (JSON, under metadata key "pagoda") + the tensors' checksum
    (tensors_sha256, key "sha256"); atomic."""
    tensors = _plain_tensors(state_dict)
    meta_json = json.dumps(meta, sort_keys=True)
    metadata = {"format": FORMAT, "pagoda": meta_json, "sha256": tensors_sha256(tensors, meta_json)}
    return write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON meta of a pagoda model file, reading only its header; UserError for anything else."""
    return _meta_of(path, _read_header(path))


def _read_header(path: str | os.PathLike) -> dict:
    """The safetensors metadata (str -> str) of a file; UserError when it is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"checkpoint {path} {what}: pass the .safetensors file a training run or "
                        f"`python -m pagoda import-edm` wrote")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({e}): it is truncated or of "
                        f"another format; copy it again or use an earlier snapshot") from None
    return metadata


def _meta_of(path: str | os.PathLike, metadata: dict) -> dict:
    """The pagoda meta parsed from a file's safetensors metadata; UserError for a file pagoda did not write."""
    if "pagoda" not in metadata:
        raise UserError(f"{path} is a safetensors file without pagoda metadata, not a pagoda checkpoint: "
                        f"{_IMPORT_HINT}")
    if metadata.get("format", FORMAT) != FORMAT:
        raise UserError(f"checkpoint {path} has format {metadata['format']!r}, this pagoda reads {FORMAT!r}: "
                        f"use the pagoda version that wrote it (pagoda {__version__} here)")
    try:
        meta = json.loads(metadata["pagoda"])
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {path} has damaged metadata ({e}): copy it again") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise UserError(f"checkpoint {path} has metadata without a 'kind': it was not written by pagoda; "
                        f"{_IMPORT_HINT}")
    return meta


def check_meta(path: str | os.PathLike, meta: dict, *, kind: str | None = None,
               resolution: int | None = None) -> None:
    """UserError unless the checkpoint is of `kind` and at `resolution` (None = any)."""
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"checkpoint {path} holds kind={meta.get('kind')!r} but a {kind!r} checkpoint is needed "
                        f"here: pass a {kind} checkpoint")
    if resolution is not None and meta.get("resolution") != resolution:
        raise UserError(f"checkpoint {path} is at resolution {meta.get('resolution')} but {resolution} is needed "
                        f"here: pass a {resolution} px checkpoint or change the requested resolution")


def load_model(path: str | os.PathLike, *, kind: str | None = None, resolution: int | None = None,
               device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a pagoda model file, checked for kind and resolution."""
    header = _read_header(path)
    meta = _meta_of(path, header)
    check_meta(path, meta, kind=kind, resolution=resolution)
    want = header.get("sha256")
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}): copy it again or use an earlier snapshot") \
            from None
    if want is not None and tensors_sha256(state_dict, header.get("pagoda", "")) != want:  # older files: none
        raise UserError(f"checkpoint {path} is damaged: its tensors or metadata do not match the checksum it was "
                        "written with: copy it again or use an earlier snapshot")
    return {k: v.to(device) for k, v in state_dict.items()}, meta


def num_parameters(path: str | os.PathLike) -> int:
    """Number of scalars stored in a safetensors file, from its header alone."""
    total = 0
    with safetensors.safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
    return total


def build_network(meta: dict, *, where: str = "checkpoint"):
    """A freshly initialised UNet of the architecture in meta["network"] (unknown keys are UserErrors; a guided
    network without `guidance_emb_scale` was written before the key and embeds LEGACY_W_EMB_SCALE * w)."""
    from pagoda.networks.unet import LEGACY_W_EMB_SCALE, UNet  # heavy, and optional for reading meta

    if not isinstance(meta.get("network"), dict):
        raise UserError(f"{where} has no 'network' entry in its metadata, so its model cannot be rebuilt: "
                        f"{_IMPORT_HINT}")
    network = meta["network"]
    if network.get("guidance_embed") and "guidance_emb_scale" not in network:  # written before the key: 1000 * w
        network = {**network, "guidance_emb_scale": LEGACY_W_EMB_SCALE}
    cfg = from_dict(UNetConfig, network, where=f"{where} network")
    try:
        return UNet(**dataclasses.asdict(cfg))
    except (ValueError, TypeError, RuntimeError) as e:  # a config the network cannot be built from (edited meta)
        raise UserError(f"{where} has a network config the UNet cannot be built from ({e}): the file is damaged "
                        "or was edited; use another snapshot") from None


def rebuild_network(source, network: dict, *, new_prefixes, **changes):
    """(a network of the architecture network + changes with every tensor of `source` copied under its own path,
    its network config as a dict). The tensors the change adds are freshly initialised and must all lie under one
    of `new_prefixes`; anything else missing, or any source tensor without a place, is a RuntimeError (the copy is
    by module structure: no key is renamed)."""
    cfg = to_dict(dataclasses.replace(from_dict(UNetConfig, network, where="network"), **changes))
    net = build_network({"network": cfg}).to(next(source.parameters()).device)
    missing, unexpected = net.load_state_dict(source.state_dict(), strict=False)
    if unexpected or not all(k.startswith(tuple(new_prefixes)) for k in missing):
        raise RuntimeError(f"the rebuilt network does not hold the source by structure: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return net, cfg


def diffusion_config(path: str | os.PathLike, meta: dict) -> DiffusionConfig:
    """The EDM constants (sigma range, sigma_data, rho) in a model file's meta; the imported EDM teacher has no
    'diffusion' entry, so EDM's defaults apply to it. Unknown or mistyped keys are UserErrors."""
    cfg = from_dict(DiffusionConfig, meta.get("diffusion", {}), where=f"checkpoint {path} diffusion")
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"checkpoint {path} has diffusion constants no model was trained with ({e}): the file is "
                        "damaged or was edited; use another snapshot") from None
    return cfg


def load_network(path: str | os.PathLike, *, kind: str | None = None, resolution: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """(net, meta): the network rebuilt from the file's meta with its weights (strict), in eval mode; floating
    tensors cast to `dtype` (None keeps the stored dtype, e.g. an fp16 import)."""
    state_dict, meta = load_model(path, kind=kind, resolution=resolution)
    with torch.device("meta"):  # no time spent on random init of weights about to be overwritten
        net = build_network(meta, where=f"checkpoint {path}")
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        net.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path}: weights do not match its network config "
                        f"({str(e).splitlines()[0]} ...): the file is damaged or was edited; use another snapshot") \
            from None
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"checkpoint {path} lacks tensors {left[:3]}: use another snapshot")
    return net.to(device).eval(), meta


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A diffusion teacher as read from its file: the UNet F (eval mode), its EDM constants, the file's meta."""

    net: torch.nn.Module
    diffusion: DiffusionConfig
    meta: dict

    def denoiser(self) -> EDMPrecond:
        """D(x, sigma, labels) = EDMPrecond(F) with the file's sigma_data (METHOD §1), eval mode, no gradients."""
        return EDMPrecond(self.net, sigma_data=self.diffusion.sigma_data).eval().requires_grad_(False)


def load_teacher(path: str | os.PathLike, *, kind: str = "teacher", device: str | torch.device = "cpu") -> Teacher:
    """The one teacher loader (distillation, progressive distillation with kind "pd" for a previous round's
    student, inversion pairs, editing, sampling). UserError for no path, a file of another kind, or diffusion
    constants no model was trained with."""
    if not str(path):
        raise UserError("no teacher given: pass --teacher T.safetensors (the Stage-1 checkpoint)")
    found = read_meta(path).get("kind")
    if found != kind:
        raise UserError(f"checkpoint {path} holds kind={found!r} but a {kind!r} checkpoint is needed here (it is not "
                        "a diffusion teacher): pass the Stage-1 checkpoint (python -m pagoda teacher ...)")
    net, meta = load_network(path, device=device)  # its kind is checked above, with the message for teachers
    return Teacher(net, diffusion_config(path, meta), meta)


# ---------------------------------------------------------------------------------------------
# Meta.

def _jsonable(config: Any) -> dict:
    """A config dataclass or dict as plain JSON data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return to_dict(config)
    return json.loads(json.dumps(config))


def model_meta(*, kind: str, stage: str, config: Any, step: int, ema_rate: float,
               extra: dict | None = None) -> dict:
    """The meta of a model file: what rebuilds the network and samples it, plus provenance."""
    config = _jsonable(config)
    network = config.get("network")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}  # a PD round's data is a source name
    resolution = (network or data).get("resolution")
    meta = dict(kind=kind, stage=stage, resolution=resolution,
                num_classes=(network or {}).get("num_classes", 0))
    for key in ("network", "diffusion", "sample"):
        if key in config:
            meta[key] = config[key]
    meta.update(config=config, step=int(step), ema_rate=float(ema_rate), git_commit=git_commit(),
                pagoda_version=__version__, torch_version=torch.__version__,
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    meta.update(_jsonable(extra or {}))
    return meta


# ---------------------------------------------------------------------------------------------
# Training state.

_PRIMITIVES = (str, int, float, bool, type(None), torch.Tensor, torch.Size)


def _check_tree(obj: Any, where: str = "state") -> None:
    """Refuse anything `weights_only=True` could not read back (it would fail only at resume)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(k, f"{where} key")
            _check_tree(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_tree(v, f"{where}[{i}]")
    elif not isinstance(obj, _PRIMITIVES):
        raise TypeError(f"{where} is a {type(obj).__name__}: training state holds only tensors and primitives")


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """torch.save(state) atomically; state is a tree of dicts / lists of tensors and primitives."""
    _check_tree(state)
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict:
    """The training state at `path`, unpickled with weights_only=True (no code runs), on the CPU."""
    path = Path(path)
    hint = f"delete {path} to restart the run from scratch (the model files beside it stay)"
    if not path.is_file():
        raise UserError(f"training state {path} does not exist: run without it to start from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"training state {path} is truncated or not a pagoda training state ({msg}): {hint}") \
            from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"training state {path} holds no step counter, it is not a pagoda training state: {hint}")
    return state
