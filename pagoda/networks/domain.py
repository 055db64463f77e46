"""The domain classifier: a small CNN trained on the bundled `photos` set.

It makes every metric (FD, IS, precision/recall) work offline on `photos`, and its frozen
intermediate maps are the download-free backbone of the tiny presets (reconstruction distance,
discriminator). It owns its preprocessing, so any uint8 image of any size can be fed to it.

    python -m pagoda domain -o weights/domain-photos.safetensors [--epochs N --seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.checkpoint import write_atomic
from pagoda.data import PHOTO_CLASSES, PhotosDataset, to_model
from pagoda.errors import ArgumentParser, UserError

KIND = "domain-classifier"
TRAIN_RESOLUTIONS = (8, 16, 32, 64)
INPUT_RESOLUTION = 32  # the size every image is resized to before the classifier (so every metric scores at it)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, two 3x3 convs), optional 2x downsampling."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = down
        self.norm0, self.conv0 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        h = self.conv0(F.silu(self.norm0(x)))
        h = self.conv1(F.silu(self.norm1(h)))
        return self.skip(x) + h


class DomainNet(nn.Module):
    """Features [N, 4*width] and logits [N, num_classes] of uint8 images of any size."""

    def __init__(self, num_classes: int, width: int = 32, input_resolution: int = INPUT_RESOLUTION):
        super().__init__()
        if num_classes < 1 or width < 8 or width % 8 or input_resolution < 8:
            raise UserError(f"DomainNet(num_classes={num_classes}, width={width}, input_resolution="
                            f"{input_resolution}): need num_classes >= 1, width a multiple of 8, resolution >= 8")
        self.num_classes, self.width, self.input_resolution = num_classes, width, input_resolution
        chans = [width, 2 * width, 4 * width]  # at R/2, R/4, R/8: cheap enough to train in a minute on CPU
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, down=True) for c_in, c_out in zip([width] + chans[:-1], chans))
        self.norm = nn.GroupNorm(8, chans[-1])
        self.head = nn.Linear(chans[-1], num_classes)
        self.feature_dim = chans[-1]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps after each block (R/2, R/4, R/8) of float images in [-1, 1]; no resizing."""
        maps, h = [], self.stem(x)
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return maps

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float [-1, 1] at input_resolution (bilinear, antialiased)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"DomainNet takes uint8 images, got {x.dtype}: use to_uint8(), or feature_maps() for floats")
        x = to_model(x)
        if x.shape[-2:] != (self.input_resolution, self.input_resolution):
            size = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (features after global pooling, logits)."""
        h = self.feature_maps(self.preprocess(x))[-1]
        features = F.silu(self.norm(h)).mean(dim=(2, 3))
        return features, self.head(features)


# ----------------------------------------------------------------------------------------------
# Training.

def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per image: random horizontal flip and a random shift by up to R/8 (reflect padding)."""
    n, r = x.shape[0], x.shape[-1]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, r // 8)
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
    top, left = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    rows = (top[:, None] + torch.arange(r))[:, None, :, None]  # [n, 1, r, 1]
    cols = (left[:, None] + torch.arange(r))[:, None, None, :]  # [n, 1, 1, r]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


@torch.no_grad()
def heldout_accuracy(model: DomainNet, resolution: int, batch: int = 256) -> float:
    """Top-1 accuracy on the held-out split of `photos` at one resolution."""
    data = PhotosDataset(resolution, split="heldout")
    model.eval()
    correct = sum(int((model(x)[1].argmax(1) == y).sum())
                  for x, y in zip(data.images.split(batch), data.labels.split(batch)))
    return correct / len(data.labels)


def train_domain_net(*, epochs: int = 4, seed: int = 0, width: int = 32, input_resolution: int = INPUT_RESOLUTION,
                     resolutions: tuple[int, ...] = TRAIN_RESOLUTIONS, batch: int = 128, lr: float = 3e-3,
                     progress: bool = False) -> tuple[DomainNet, dict]:
    """Train on the `photos` train split at `resolutions` (8..64 px); report held-out accuracy at each.

    Every batch holds images of one resolution (the net resizes them itself); batches of all
    resolutions are shuffled together. AdamW, one-cycle learning rate (warm-up, cosine), label smoothing 0.1.
    Deterministic for a given seed (thread-count effects on float sums aside).
    """
    if epochs < 1:
        raise UserError(f"--epochs {epochs} must be >= 1")
    from tqdm import tqdm
    start, gen = time.perf_counter(), torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainNet(len(PHOTO_CLASSES), width=width, input_resolution=input_resolution)
    data = {r: PhotosDataset(r, split="train") for r in resolutions}
    steps_per_epoch = sum(math.ceil(len(d.labels) / batch) for d in data.values())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    bar = tqdm(total=epochs * steps_per_epoch, desc="domain net", disable=not progress)
    model.train()
    for _ in range(epochs):
        # One epoch: every train crop at every resolution once, batches in a random order.
        batches = [(r, idx) for r, d in data.items() for idx in torch.randperm(len(d.labels), generator=gen).split(batch)]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            r, idx = batches[j]
            x, y = _augment(data[r].images[idx], gen), data[r].labels[idx]
            loss = F.cross_entropy(model(x)[1], y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().requires_grad_(False)
    acc = {str(r): heldout_accuracy(model, r) for r in TRAIN_RESOLUTIONS}  # all four, whatever was trained
    report = {"heldout_accuracy": acc, "heldout_accuracy_mean": sum(acc.values()) / len(acc),
              "chance": 1 / len(PHOTO_CLASSES), "epochs": epochs, "seed": seed, "batch": batch, "lr": lr,
              "train_resolutions": list(resolutions), "train_seconds": round(time.perf_counter() - start, 1)}
    return model, report


# ----------------------------------------------------------------------------------------------
# Files.

def _class_names(model: DomainNet) -> list[str]:
    """The model's own names, else the photos classes when the count fits, else "0", "1", ..."""
    names = getattr(model, "class_names", None)
    if names is None:
        same = model.num_classes == len(PHOTO_CLASSES)
        names = PHOTO_CLASSES if same else [str(c) for c in range(model.num_classes)]
    return list(names)


def save_domain_net(model: DomainNet, path: str | os.PathLike, report: dict) -> None:
    """Write safetensors with the JSON config in the metadata; atomic (tmp, fsync, replace)."""
    path = Path(path)
    meta = {"kind": KIND, "num_classes": model.num_classes, "width": model.width,
            "input_resolution": model.input_resolution, "class_names": _class_names(model),
            "heldout_accuracy": report.get("heldout_accuracy"), "report": report}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata={"pagoda": json.dumps(meta)}))


def read_domain_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a domain-classifier file; UserError naming the file otherwise."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pagoda", "{}"))
    except FileNotFoundError:
        raise UserError(f"domain classifier {path} does not exist: train one with "
                        f"`python -m pagoda domain -o {path}`") from None
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}): retrain or re-copy it") from None
    if meta.get("kind") != KIND:
        raise UserError(f"{path} holds kind={meta.get('kind')!r}, not a {KIND}: pass the file written by "
                        "`python -m pagoda domain`")
    return meta


def load_domain_net(path: str | os.PathLike, device: str | torch.device = "cpu") -> DomainNet:
    """Rebuild a DomainNet from its file (no unpickling), frozen and in eval mode."""
    meta = read_domain_metadata(path)
    model = DomainNet(meta["num_classes"], width=meta["width"], input_resolution=meta["input_resolution"])
    try:
        state = safetensors.torch.load_file(str(path), device=str(device))
        model.load_state_dict(state, strict=True)
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"domain classifier {path} is damaged or does not match its config "
                        f"({str(e).splitlines()[0]}): retrain or re-copy it") from None
    model.class_names = meta.get("class_names", [])
    return model.to(device).eval().requires_grad_(False)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pagoda domain` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m pagoda domain", description="Train the domain classifier on "
                                "the bundled photos data set (8..64 px) and write it as safetensors.")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file, e.g. weights/domain-photos.safetensors")
    p.add_argument("--epochs", type=int, default=4, help="passes over all train crops at all resolutions (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pagoda domain`: train the photos classifier and write it."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    model, report = train_domain_net(epochs=args.epochs, seed=args.seed, progress=True)
    acc = ", ".join(f"{r} px {a:.3f}" for r, a in report["heldout_accuracy"].items())
    print(f"held-out accuracy: {acc} (mean {report['heldout_accuracy_mean']:.3f}, chance {report['chance']:.3f}); "
          f"trained in {report['train_seconds']} s")
    save_domain_net(model, args.out, report)
    print(f"wrote {args.out}")
    return 0
