"""`python -m bench.moves`: how far and which way a guidance-conditioned G's samples move with the CFG scale w,
against the teacher's classifier-free guidance on the same seeds.

    python -m bench.moves runs/demo/models/G16-cfg.safetensors --teacher runs/demo/models/teacher.safetensors \
        --w 2,3 --seeds 0-255 -o results/moves.jsonl

For each w (seed i: the same noise and label for G and the teacher, pagoda.generator.seeded_draws):

- guidance_move (a row for G and one for the teacher, model = its path): RMS in uint8 levels over pixels and seeds of X(w) - X(1), how
  far w moves the samples of X (G at NFE 1; the teacher with --sampler / --steps, default DPM-Solver++(2M) 4);
- guidance_move_cosine (G's row, extra.teacher = the teacher's path): the mean over seeds of cos(G(w) - G(1), T(w) - T(1)) on the flattened uint8 images,
  whether G moves the way the teacher's CFG moves (1: same direction; 0: unrelated; seeds where either move is
  zero count as 0).

These are the README's "move" and "cosine with the teacher's" columns ("Stage 3": the guidance-conditioned G).
The teacher must be the one G was distilled from (its SHA-256, recorded in G's file); -o appends rows to a rows
file (created with its folders when missing; a file that does not hold rows is refused).
"""

from __future__ import annotations

import argparse

import torch

from eval.rows import make_row
from pagoda.checkpoint import read_meta
from pagoda.errors import ArgumentParser, UserError, int_list, run_cli
from pagoda.generator import load_generator
from pagoda.rows import append_rows, check_rows_output, text_table
from pagoda.weights import sha256_file


def _float_list(text: str) -> list[float]:
    try:
        ws = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 2,3") from None
    if len(set(ws)) != len(ws) or 1.0 in ws:
        raise argparse.ArgumentTypeError(f"{text!r} must list each CFG scale once, and not 1 (the moves are "
                                         "measured from w = 1), e.g. 2,3")
    return ws


def moves(g, teacher, seeds: torch.Tensor, ws: list[float], batch: int = 64) -> dict[float, dict]:
    """{w: {"generator": RMS levels, "teacher": RMS levels, "cosine": mean cosine}} of G's and the teacher's moves
    X(w) - X(1) on `seeds` (int64 [N]); both sample each seed with its own noise and label at w and at 1."""
    sums = {w: {"generator": 0.0, "teacher": 0.0, "cosine": 0.0} for w in ws}
    n = len(seeds)
    for s in range(0, n, batch):
        chunk = seeds[s:s + batch]
        base = {name: m.sample(chunk, guidance=1.0).flatten(1).float() for name, m in (("g", g), ("t", teacher))}
        for w in ws:
            dg = g.sample(chunk, guidance=w).flatten(1).float() - base["g"]
            dt = teacher.sample(chunk, guidance=w).flatten(1).float() - base["t"]
            sums[w]["generator"] += dg.pow(2).mean(1).sum().item()
            sums[w]["teacher"] += dt.pow(2).mean(1).sum().item()
            sums[w]["cosine"] += torch.nn.functional.cosine_similarity(dg, dt, dim=1, eps=1e-12).sum().item()
    return {w: {"generator": (v["generator"] / n) ** 0.5, "teacher": (v["teacher"] / n) ** 0.5,
                "cosine": v["cosine"] / n} for w, v in sums.items()}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.moves` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m bench.moves", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a guidance-conditioned one-step G (.safetensors, `pagoda distill` on guided pairs)")
    p.add_argument("--teacher", required=True, help="its teacher's checkpoint (.safetensors)")
    p.add_argument("--sampler", default="dpmpp2m", help="the teacher's sampler (default dpmpp2m)")
    p.add_argument("--steps", type=int, default=4, help="the teacher's steps (default 4)")
    p.add_argument("--w", type=_float_list, default=[2.0, 3.0], help="CFG scales other than 1 (default 2,3)")
    p.add_argument("--seeds", type=int_list, default=list(range(256)), help="seeds, e.g. 0-255 (default 0-255)")
    p.add_argument("--batch", type=int, default=64, help="seeds per forward (default 64; no effect on the result)")
    p.add_argument("-o", "--out", default=None, help="JSONL file the rows are appended to (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        p.error("--batch and --steps must be >= 1")
    if args.out:
        check_rows_output(args.out)
    g = load_generator(args.ckpt)
    if g.nfe_for(1.0) != 1:
        raise UserError(f"{args.ckpt} is not a one-step G (NFE {g.nfe_for(1.0):g}): pass a `pagoda distill` model")
    for w in [1.0, *args.w]:  # G must serve every w: one line naming the model and its range, exit 2
        g.check_guidance(w)
    tmeta, want = read_meta(args.teacher), read_meta(args.ckpt).get("teacher_sha256")
    if tmeta.get("kind") != "teacher":
        raise UserError(f"--teacher {args.teacher} is a {tmeta.get('kind')!r} checkpoint, not a teacher: pass the "
                        f"teacher {args.ckpt} was distilled from")
    if (want and sha256_file(args.teacher) != want) or tmeta.get("resolution") != g.resolution:
        raise UserError(f"--teacher {args.teacher} is not the teacher {args.ckpt} was distilled from (other "
                        "weights or size): pass the G's own teacher")
    teacher = load_generator(args.teacher, sampler=args.sampler, steps=args.steps)
    for w in args.w:
        teacher.check_guidance(w)
    result = moves(g, teacher, torch.tensor(args.seeds, dtype=torch.int64), args.w, args.batch)
    common = dict(resolution=g.resolution, num_samples=len(args.seeds), device="cpu", dtype="float32")
    of_g = dict(model=str(args.ckpt), method="pagoda", nfe=1, extra={"teacher": str(args.teacher)}, **common)
    of_t = dict(model=str(args.teacher), method="teacher", sampler=args.sampler, steps=args.steps,
                nfe=teacher.nfe_for(2.0), **common)
    rows = []
    for w, r in result.items():
        rows += [make_row(metric="guidance_move", value=r["generator"], guidance=w, **of_g),
                 make_row(metric="guidance_move", value=r["teacher"], guidance=w, **of_t),
                 make_row(metric="guidance_move_cosine", value=r["cosine"], guidance=w, **of_g)]
    print(text_table([{"w": w, "G move": r["generator"], "teacher move": r["teacher"], "cosine": r["cosine"]}
                      for w, r in result.items()], ["w", "G move", "teacher move", "cosine"]))
    if args.out:
        append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
