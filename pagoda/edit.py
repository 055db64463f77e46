"""Controllable generation with PaGoDA's autoencoder (METHOD §2, "Controllable generation"; Kim et al. 2024, §5):
encode by DDIM inversion with the teacher (Stage 2a's `invert`: Heun on the 40-point Karras grid to sigma_max, D
clamped, the true label), edit the latent or the input, decode with the one-step G in one network call.

    python -m pagoda edit TASK --generator G.safetensors --teacher T.safetensors --data SRC --items 0-7 -o grid.png

Tasks (each writes a PNG grid, one row per item, and prints / writes its numbers as JSON next to the grid):
- reconstruct   [x | G(z_x)]; PSNR (dB, uint8) and d (the L_rec distance, `random` backbone) to x.
- superres      a grown G decodes the inversion of the low-resolution (base) crop at its own resolution:
                [bicubic up(x_low) | G(z_x) | x_high]; PSNR of both against the high-resolution crop of the same
                source image (the bicubic row is the baseline).
- inpaint       mask (base x base, white = keep) over the base input; DESIGN: fill the hole with grey, then
                `--iterations` rounds of invert -> decode -> paste the known pixels back (at the base resolution;
                the decoder's output is area-downsampled when G is grown); [masked x | G(z) | x]; PSNR inside
                the hole against x, and the grey fill's PSNR as the baseline.
- transfer      invert with the true label y, decode with y' (`--to-class`): [x | G(z_x, y) | G(z_x, y')];
                no ground truth, so no number beyond the reconstruction's PSNR.
- interpolate   spherical interpolation (slerp) between the latents of two items, `--frames` points; labels
                switch from the first item's to the second's at t = 1/2 (DESIGN); PSNR of both endpoints.

Inputs are images of a data source (`photos`, `photos:heldout`, an image folder or an ADM .npz) by index, at
G's base resolution and, for the ground truth, at G's output resolution (crops of the same source image).
A guidance-conditioned G decodes at `--guidance` w (default its own) after an inversion with the w-guided teacher.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pagoda.checkpoint import diffusion_config, read_meta, write_atomic
from pagoda.data import build_dataset, check_native_resolution, psnr, to_model, to_uint8
from pagoda.errors import UserError
from pagoda.samplers import inversion_sigmas

MAX_FRAMES = 64


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between latents a and b [...] (flattened angle; Shoemake 1985), linear when they
    are (anti)parallel to float precision."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-6 or (math.pi - theta).abs() < 1e-6:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    out = (torch.sin((1 - t) * theta) * a.double() + torch.sin(t * theta) * b.double()) / torch.sin(theta)
    return out.to(a.dtype)


def finite(tree):
    """A JSON tree with every non-finite float (an infinite PSNR of identical images) replaced by None, which JSON
    can hold."""
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite(v) for v in tree]
    return tree


def center_mask(resolution: int) -> torch.Tensor:
    """The default inpainting mask: float [1, 1, R, R], 1 = keep, 0 over the central half (a square hole)."""
    m = torch.ones(1, 1, resolution, resolution)
    lo, hi = resolution // 4, resolution - resolution // 4
    m[..., lo:hi, lo:hi] = 0
    return m


def load_mask(path: str, resolution: int) -> torch.Tensor:
    """A mask image (white / nonzero = keep, black = fill) as float [1, 1, R, R]; UserError for another size."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if path == "center":
        return center_mask(resolution)
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise UserError(f"--mask {path} does not exist: give a {resolution}x{resolution} PNG (white = keep) or "
                        "'center'") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--mask {path} is not a readable image ({e}): give a PNG") from None
    if img.size != (resolution, resolution):
        raise UserError(f"--mask {path} is {img.size[0]}x{img.size[1]} but the generator's input is "
                        f"{resolution}x{resolution}: give a mask of the base resolution (white = keep)")
    m = torch.from_numpy(np.asarray(img.convert("L")) > 127).float()
    if m.all():
        raise UserError(f"--mask {path} keeps every pixel (every value is > 127, which counts as white = keep): "
                        "paint the hole black (<= 127)")
    if not m.any():
        raise UserError(f"--mask {path} keeps no pixel (every value is <= 127, which counts as black = fill): "
                        "paint the pixels to keep white (> 127)")
    return m[None, None]


def write_rows(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """A PNG grid, one row per list of uint8 images [3, H, W] (smaller images nearest-upsampled to the row's
    largest size so the columns line up); atomic."""
    import numpy as np
    from PIL import Image

    size = max(img.shape[-1] for row in rows for img in row)
    cols = max(len(row) for row in rows)
    grid = np.full((len(rows) * size, cols * size, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            img = img[None].float()
            if img.shape[-1] != size:
                img = F.interpolate(img, size=(size, size), mode="nearest")
            grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = img[0].byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    write_atomic(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


@dataclass
class Editor:
    """G and its teacher: encode(x, y) -> z by inversion, decode(z, y) -> uint8 images at G's resolution."""

    gen: object  # pagoda.generator.OneStepGenerator
    teacher: object  # EDM denoiser
    sigmas: torch.Tensor
    guidance: float

    @property
    def base(self) -> int:
        return self.gen.noise_shape[-1]

    def _labels(self, y: torch.Tensor):
        return y if self.gen.num_classes > 0 else None

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z float32 [N, 3, base, base] of uint8 images x [N, 3, base, base] (Stage 2a's inversion)."""
        from pagoda.pairs import invert
        w = None if self.guidance == 1.0 else torch.full((len(x),), self.guidance)
        return invert(self.teacher, x, self._labels(y), self.sigmas, w)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, R, R] at G's output resolution: one network call."""
        return self.gen.decode(z, self._labels(y), self.guidance)


def open_editor(generator: str, teacher: str, *, guidance: float | None = None) -> Editor:
    """The Editor of a PaGoDA checkpoint and the teacher its pairs were made with (checked by SHA-256)."""
    from pagoda.generator import OneStepGenerator, load_generator
    from pagoda.pairs import NUM_POINTS, load_teacher
    from pagoda.weights import sha256_file

    gen = load_generator(generator)
    tmeta = read_meta(teacher)  # a missing or foreign --teacher: one line before anything else reads it
    if not isinstance(gen, OneStepGenerator):
        raise UserError(f"--generator {generator} is a {gen.kind!r} checkpoint: editing needs a PaGoDA G (kind "
                        "'pagoda', from `python -m pagoda distill` or `grow`)")
    meta = read_meta(generator)
    want = meta.get("teacher_sha256")
    if want and sha256_file(teacher) != want:
        raise UserError(f"--teacher {teacher} is not the teacher {generator} was trained with (its pairs came from "
                        f"{meta.get('teacher')}): pass that teacher, so the inversion matches G's latents")
    denoiser = load_teacher(teacher).denoiser()
    if tmeta.get("resolution") != gen.noise_shape[-1]:
        raise UserError(f"--teacher {teacher} is at {tmeta.get('resolution')} px but {generator} takes "
                        f"{gen.noise_shape[-1]} px latents: pass its own teacher")
    w = gen.check_guidance(guidance)
    d = diffusion_config(generator, meta)
    sigmas = inversion_sigmas(NUM_POINTS, sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho)
    return Editor(gen, denoiser, sigmas, w)


def open_images(source: str, items: list[int], resolution: int, why: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, R, R] and labels int64 [N] of the items of a data source ('photos', 'photos:heldout', a folder,
    an .npz) at `resolution`; UserError for an index out of range, and (given `why`, the use of the images) for
    data smaller than `resolution`."""
    name, _, split = source.partition(":") if source.startswith("photos") else (source, "", "")
    dataset = build_dataset(name, resolution, split=split or "train")
    if why:
        check_native_resolution(dataset, source, resolution, why)
    bad = [i for i in items if not 0 <= i < len(dataset)]
    if bad:
        raise UserError(f"--items {bad[0]} is out of range: {source} has {len(dataset)} images (0..{len(dataset) - 1})")
    x, y = zip(*(dataset[i] for i in items))
    return torch.stack(x), torch.stack(y)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d (pagoda.losses, the `random` backbone with L_rec's seed) per image [N] between uint8 images."""
    from pagoda.losses import d
    from pagoda.networks.features import build_backbone
    return d(to_model(a), to_model(b), [build_backbone("random", seed=1)])


@dataclass(frozen=True)
class Images:
    """What every task starts from: the items at G's input (base) resolution with their labels, and at its output
    resolution (the same tensor unless G was grown)."""

    editor: Editor
    x_low: torch.Tensor  # uint8 [N, 3, base, base]
    y: torch.Tensor  # int64 [N]
    x_high: torch.Tensor  # uint8 [N, 3, res, res]

    @property
    def res(self) -> int:
        return self.editor.gen.resolution

    def rebuild(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """G(encode(x, y), y): x defaults to the items at base resolution, y to their labels."""
        x, y = self.x_low if x is None else x, self.y if y is None else y
        return self.editor.decode(self.editor.encode(x, y), y)


def _reconstruct(im: Images) -> tuple[list, dict]:
    rec = im.rebuild()
    rows = [[hi, r] for hi, r in zip(im.x_high, rec)]
    return rows, {"psnr_db": psnr(rec, im.x_high).mean().item(), "d": _distance(rec, im.x_high).mean().item(),
                  "columns": ["x", "G(z_x)"]}


def _superres(im: Images) -> tuple[list, dict]:
    base = im.editor.base
    if im.res == base:
        raise UserError(f"superres needs a grown G (output above its {base} px input); {im.editor.gen.name} outputs "
                        f"{im.res} px: pass a G from `python -m pagoda grow`")
    sr = im.rebuild()
    bicubic = to_uint8(F.interpolate(to_model(im.x_low), size=(im.res, im.res), mode="bicubic", align_corners=False)
                       .clamp(-1, 1))
    rows = [list(r) for r in zip(bicubic, sr, im.x_high)]
    return rows, {"psnr_db": psnr(sr, im.x_high).mean().item(), "psnr_bicubic_db": psnr(bicubic, im.x_high).mean()
                  .item(), "columns": ["bicubic(x_low)", "G(z_x_low)", "x_high"]}


def _inpaint(im: Images, *, mask: str = "center", iterations: int = 4) -> tuple[list, dict]:
    """Invert the masked image (grey hole), decode, paste the known pixels back; `iterations` rounds."""
    base, res = im.editor.base, im.res
    m = load_mask(mask, base)
    if iterations < 1:
        raise UserError(f"--iterations {iterations} must be >= 1")
    masked = torch.where(m.bool(), im.x_low, torch.full_like(im.x_low, 128))
    current = masked
    for _ in range(iterations):
        out = im.rebuild(current)
        low = out if res == base else to_uint8(F.interpolate(to_model(out), size=(base, base), mode="area"))
        current = torch.where(m.bool(), im.x_low, low)
    hole = 1 - (m if res == base else F.interpolate(m, size=(res, res), mode="nearest"))
    fill = torch.full_like(im.x_high, 128)
    rows = [list(r) for r in zip(masked, out, im.x_high)]
    return rows, {"psnr_hole_db": psnr(out, im.x_high, hole).mean().item(),
                  "psnr_hole_grey_db": psnr(fill, im.x_high, hole).mean().item(), "iterations": iterations,
                  "columns": ["masked x", "G (inpainted)", "x"]}


def _transfer(im: Images, *, to_class: int | None = None) -> tuple[list, dict]:
    """Decode the item's z with another class."""
    gen = im.editor.gen
    if gen.num_classes == 0:
        raise UserError(f"transfer needs a class-conditional G; {gen.name} is unconditional")
    if to_class is None:
        raise UserError(f"transfer needs --to-class C, the class to decode with (0..{gen.num_classes - 1})")
    if not 0 <= to_class < gen.num_classes:
        raise UserError(f"--to-class {to_class} must be a class id in [0, {gen.num_classes - 1}]")
    z = im.editor.encode(im.x_low, im.y)
    rec, moved = im.editor.decode(z, im.y), im.editor.decode(z, torch.full_like(im.y, to_class))
    rows = [list(r) for r in zip(im.x_high, rec, moved)]
    return rows, {"psnr_db": psnr(rec, im.x_high).mean().item(), "to_class": to_class,
                  "columns": ["x", "G(z_x, y)", "G(z_x, y')"]}


def _interpolate(im: Images, *, frames: int = 8) -> tuple[list, dict]:
    """Decode slerp(z_a, z_b, t) at `frames` points t in [0, 1] (the label switches at t = 0.5)."""
    if len(im.y) != 2:
        raise UserError(f"interpolate takes two --items (e.g. 0,5), got {len(im.y)}")
    if not 2 <= frames <= MAX_FRAMES:
        raise UserError(f"--frames {frames} must be in [2, {MAX_FRAMES}]")
    z = im.editor.encode(im.x_low, im.y)
    ts = [i / (frames - 1) for i in range(frames)]
    zs = torch.stack([slerp(z[0], z[1], t) for t in ts])
    ys = torch.stack([im.y[0] if t < 0.5 else im.y[1] for t in ts])
    out = im.editor.decode(zs, ys)
    ends = torch.stack([out[0], out[-1]])
    return [[im.x_high[0], *out, im.x_high[1]]], {"psnr_endpoints_db": psnr(ends, im.x_high).tolist(), "t": ts,
                                                  "columns": ["x_a", *(f"t={t:.2f}" for t in ts), "x_b"]}


# task -> its function (Images, **its own options) -> (grid rows, numbers)
TASKS: dict[str, Callable[..., tuple[list, dict]]] = {
    "reconstruct": _reconstruct, "superres": _superres, "inpaint": _inpaint, "transfer": _transfer,
    "interpolate": _interpolate}
TASK_OPTIONS = {"mask": "inpaint", "iterations": "inpaint", "to_class": "transfer", "frames": "interpolate"}


def check_options(task: str, options: dict) -> None:
    """UserError for an unknown task or an option (TASK_OPTIONS, as --flag) that belongs to another task: never
    silently ignored."""
    if task not in TASKS:
        raise UserError(f"edit task {task!r} is unknown: use one of {', '.join(TASKS)}")
    alien = [f"--{k.replace('_', '-')}" for k in options if TASK_OPTIONS.get(k) != task]
    if alien:
        raise UserError(f"{', '.join(alien)}: option(s) of another task, not of {task}: drop them")


def run_task(task: str, editor: Editor, source: str, items: list[int], **options) -> tuple[list[list[torch.Tensor]],
                                                                                          dict]:
    """(grid rows, numbers) of one task (module docstring) with its own options (TASK_OPTIONS); UserError for an
    unknown task, another task's option, or inputs the task cannot use."""
    check_options(task, options)
    base, res = editor.base, editor.gen.resolution
    x_low, y = open_images(source, items, base)
    x_high = open_images(source, items, res, why="ground truth of a grown G")[0] if res != base else x_low
    return TASKS[task](Images(editor, x_low, y, x_high), **options)


def main(argv: list[str] | None = None) -> int:
    """`python -m pagoda edit TASK ...` (see the module docstring)."""
    from pagoda.errors import ArgumentParser, check_output, guidance_scale, int_list

    p = ArgumentParser(prog="python -m pagoda edit", description="Invert images with the teacher, edit, decode with "
                       "the one-step G; writes a PNG grid (one row per item) and its numbers as JSON beside it.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--generator", required=True, help="a PaGoDA G (.safetensors; grown for superres)")
    p.add_argument("--teacher", required=True, help="the teacher G's pairs were made with")
    p.add_argument("--data", default="photos:heldout", help="'photos', 'photos:heldout' (default), a folder or .npz")
    p.add_argument("--items", type=int_list, default=list(range(8)), help="image indices, e.g. 0-7 (default)")
    p.add_argument("-o", "--out", required=True, help="the grid (.png); numbers go to the same name with .json")
    p.add_argument("--mask", default=None, help="inpaint: a base-resolution PNG (white = keep) or 'center' (default)")
    p.add_argument("--iterations", type=int, default=None, help="inpaint: invert/decode/paste rounds (default 4)")
    p.add_argument("--to-class", type=int, default=None, help="transfer: the class to decode with")
    p.add_argument("--frames", type=int, default=None, help="interpolate: points from t = 0 to 1 (default 8)")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="a guidance-conditioned G's w (default its own)")
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in TASK_OPTIONS if getattr(args, k) is not None}
    check_options(args.task, given)  # before any model is read
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"-o {out}: the grid must end in .png")
    check_output(out)
    check_output(out.with_suffix(".json"), what=f"-o {out}: its numbers' file")
    editor = open_editor(args.generator, args.teacher, guidance=args.guidance)
    rows, numbers = run_task(args.task, editor, args.data, args.items, **given)
    numbers = {"task": args.task, "generator": str(args.generator), "data": args.data, "items": args.items,
               "resolution": editor.gen.resolution, "base": editor.base, "guidance": editor.guidance, **numbers}
    write_rows(out, rows)
    text = json.dumps(finite(numbers), indent=1) + "\n"
    write_atomic(out.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    shown = {k: v for k, v in numbers.items() if k.startswith("psnr") or k == "d"}
    print(f"wrote {out} ({len(rows)} rows) and {out.with_suffix('.json')}: "
          + ", ".join(f"{k} {v if isinstance(v, list) else round(v, 3)}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    import sys

    from pagoda.errors import run_cli
    sys.exit(run_cli(main))
