"""Import the public EDM ImageNet-64 teacher of the consistency-models release into our UNet.

`edm_imagenet64_ema.pt` is a plain state dict of ADM's `cm/unet.py` built with the ImageNet-64 flags of that
repo's launch script (192 channels, mult 1-2-3-4, 3 res blocks, attention at 32/16/8 with 64-channel heads,
scale-shift norm, up/down in ResBlocks, 1000 classes, learn_sigma False), fp32 or fp16 tensors.

Key mapping decisions (see pagoda.networks.unet):
- Names and shapes are ADM's, so keys map to themselves; qkv / proj_out are 1x1 Conv2d in both.
- qkv channels: the release was trained with that repo's flash-attention path, whose layout is
  (q, k, v) x heads x head_dim; our AttentionBlock uses the same layout, so no permutation is needed.
- The release embeds 1000 * ln(sigma) / 4; our UNet embeds emb_noise_scale * c_noise with
  emb_noise_scale = 1000 and c_noise = ln(sigma) / 4 (EDM), which is the same number.
- label_emb gets a 1001st row for our null class, set to zero. The teacher was trained without label dropout,
  so that row means nothing to it: classifier-free guidance is NOT meaningful with this teacher.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from pagoda.checkpoint import save_model
from pagoda.config import UNetConfig, get_preset, to_dict
from pagoda.errors import ArgumentParser, UserError, run_cli
from pagoda.networks.unet import UNet, count_parameters
from pagoda.weights import sha256_file

# The released network's architecture, in our config's terms (dropout as it was trained; no effect in eval).
EDM_IMAGENET64 = UNetConfig(resolution=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                            attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1, num_classes=1000,
                            use_scale_shift_norm=True, resblock_updown=True, emb_noise_scale=1000.0)
SOURCE = "edm_imagenet64_ema.pt (consistency-models release)"
_NOT_IT = "this is not the EDM ImageNet-64 checkpoint (edm_imagenet64_ema.pt of openai/consistency_models)"


def published_edm_imagenet64_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released state dict, derived from our UNet (the release has no null-class row)."""
    with torch.device("meta"):
        net = UNet(**dataclasses.asdict(EDM_IMAGENET64))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    rows, dim = shapes["label_emb.weight"]
    shapes["label_emb.weight"] = (rows - 1, dim)
    return shapes


def _check_state_dict(state_dict: dict, where: str) -> None:
    expected = published_edm_imagenet64_shapes()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    for keys, what in ((missing, "lacks key"), (unexpected, "has unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UserError(f"{where} {what} {keys[0]!r}{more}: {_NOT_IT}")
    for k, shape in expected.items():
        v = state_dict[k]
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            raise UserError(f"{where}: {k!r} is {type(v).__name__} {getattr(v, 'dtype', '')}, not a float tensor: {_NOT_IT}")
        if tuple(v.shape) != shape:
            raise UserError(f"{where}: {k!r} has shape {tuple(v.shape)}, expected {shape}: {_NOT_IT}")


def convert_edm_imagenet64(state_dict: dict, *, where: str = "state dict") -> dict[str, torch.Tensor]:
    """Released ADM state dict -> our UNet's (EDM_IMAGENET64): same keys, float32, zero null-class row appended.

    CFG is not meaningful for the result: the teacher never saw the null class (no label dropout).
    """
    _check_state_dict(state_dict, where)
    out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    W = out["label_emb.weight"]
    out["label_emb.weight"] = torch.cat([W, W.new_zeros(1, W.shape[1])])
    return out


def load_state_dict_safely(path: str) -> dict:
    """torch.load with weights_only=True (never runs code from the file); any failure is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist or is not a file: give the path of edm_imagenet64_ema.pt")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals, corrupt zips, truncation: all the fault of the file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be loaded as a plain tensor state dict ({reason}); "
                        f"download edm_imagenet64_ema.pt again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict: {_NOT_IT}")
    return obj


def import_edm_imagenet64(src_path: str, dst_path: str) -> dict:
    """Convert the released file at src_path into our teacher checkpoint at dst_path; returns its metadata."""
    state_dict = convert_edm_imagenet64(load_state_dict_safely(src_path), where=src_path)
    teacher = get_preset("imagenet64").teacher
    meta = {"kind": "teacher", "stage": "teacher", "resolution": EDM_IMAGENET64.resolution,
            "num_classes": EDM_IMAGENET64.num_classes, "network": to_dict(EDM_IMAGENET64),
            # EDM constants of the release; it was trained without label dropout (so no CFG).
            "diffusion": to_dict(dataclasses.replace(teacher.diffusion, label_dropout=0.0)),
            "sample": to_dict(teacher.sample), "source": SOURCE, "source_sha256": sha256_file(src_path)}
    save_model(dst_path, state_dict, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    """`python -m pagoda import-edm SRC.pt -o teacher.safetensors`."""
    parser = ArgumentParser(prog="python -m pagoda import-edm",
                                     description="Import the public EDM ImageNet-64 teacher (edm_imagenet64_ema.pt).")
    parser.add_argument("src", help="path of edm_imagenet64_ema.pt from the consistency-models release")
    parser.add_argument("-o", "--out", required=True, help="teacher checkpoint to write (.safetensors)")
    args = parser.parse_args(argv)
    meta = import_edm_imagenet64(args.src, args.out)
    with torch.device("meta"):
        n = count_parameters(UNet(**dataclasses.asdict(EDM_IMAGENET64)))
    print(f"wrote {args.out}: EDM ImageNet-64 teacher, {n:,} parameters, source sha256 {meta['source_sha256'][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
