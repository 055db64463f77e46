"""`python -m bench.pulls`: what each loss term of a trained guided G asks of it at one CFG scale, and what its
discriminator thinks of real photos, of the teacher's guided samples and of G's.

    python -m bench.pulls runs/demo/g-cfg --w 3 -o results/pulls.jsonl

The guided G (Stage 2b on guided pairs) is trained on three terms: L_rec on the pairs (the real image of each item,
whatever its w), the CFG distillation term toward the w-guided teacher, and L_adv, whose discriminator sees as
real either the photos at every w (loss.adv_real = data, the default) or the teacher's w-guided samples
(loss.adv_real = teacher). With photos, at w != 1 the photos and the teacher's guided distribution differ, so L_adv
may pull G back toward w = 1 while the CFG term pulls it toward the teacher. This measures it on the run's last
training state (G's raw weights and D, as trained; `state.pt`), and prints which real set the run's D had:

- grad_norm (extra.term = rec, cfg, adv): |d term / d theta| over G's trainable weights, each term as it enters
  G's loss (L_rec; w_cfg * L_cfg; w_adv * lambda * L_adv with lambda of this batch), L_rec on the pair items whose
  w is within --band of --w (their latents were inverted at their own w), the others at w for every item;
- grad_cosine (extra.pair = rec/cfg, rec/adv, cfg/adv): the cosines between those gradients (< 0: they conflict);
- d_logit (extra.images = real, teacher, generator): D's mean patch logit, no augmentation, at w, on the items'
  real photos, on the teacher's w-guided samples (the CFG term's own solver and steps) and on G's samples from
  fresh noise, all with the items' labels.

Every number is a mean over --batches batches of the pairs (the item order of seed --seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from eval.rows import make_row
from pagoda.checkpoint import load_teacher, load_training_state
from pagoda.config import DistillConfig, from_dict
from pagoda.data import to_model
from pagoda.errors import ArgumentParser, UserError, run_cli
from pagoda.losses import adaptive_weight, adaptive_weight_layer, d
from pagoda.networks.discriminator import augment_params
from pagoda.pairs import load_pairs, pair_guidance
from pagoda.rows import append_rows, check_rows_output, text_table
from pagoda.rundir import first_difference
from pagoda.stages.distill import DistillStage, load_init, run_inputs
from pagoda.weights import sha256_file

TERMS = ("rec", "cfg", "adv")


def load_run(run_dir: Path, weights_dir=None) -> tuple[DistillStage, object]:
    """(the Stage-2b stage of a guided run with G and D as in its state.pt, the pairs); UserError for a folder that
    is not a finished or running guided distill run."""
    try:
        raw = json.loads((run_dir / "config.json").read_text())
        cfg = from_dict(DistillConfig, {k: v for k, v in raw.items() if k != "inputs"}, where=f"{run_dir}/config.json")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{run_dir} holds no readable config.json: pass a `pagoda distill` run folder") from None
    except UserError:
        raise UserError(f"{run_dir}/config.json is not a `pagoda distill` run's (another stage's, or edited): pass "
                        "the run folder of a guidance-conditioned `pagoda distill`") from None
    teacher = load_teacher(cfg.teacher)
    teacher_net, diffusion, meta = teacher.net, teacher.diffusion, teacher.meta
    if not (run_dir / "state.pt").is_file():
        raise UserError(f"{run_dir} holds no state.pt (the run has not taken a step): pass a run that has")
    pairs = load_pairs(cfg.pairs)
    made_from = raw.get("inputs")  # None: a run from before input hashes, taken as it is
    now = {**run_inputs(cfg, pairs), "teacher_sha256": sha256_file(cfg.teacher)}  # the file, not the pairs' record
    changed = None if made_from is None else first_difference(made_from, now, "inputs.")
    if changed is not None:  # the run's own check (pagoda.rundir.check_run_config): an input replaced at its path
        raise UserError(f"an input named by {run_dir}/config.json is not the one the run was trained with "
                        f"({changed[0]} differs: a file replaced at the same path): restore it, or pass another run")
    if pairs.guidance_range is None:
        raise UserError(f"{run_dir} was trained on unguided pairs: pass the run of a guidance-conditioned G")
    init, network = load_init(cfg.init, teacher_net, pairs, True, meta["network"])
    stage = DistillStage(cfg, teacher_net, diffusion, network=network, guided=True, init=init,
                         weights_dir=weights_dir)
    try:
        state = load_training_state(run_dir / "state.pt")
    except UserError:
        raise UserError(f"{run_dir}/state.pt cannot be read (damaged or not a training state): pass another "
                        "run") from None
    stage.net.load_state_dict(state["net"])
    if stage.disc is None:
        raise UserError(f"{run_dir} trained without a discriminator (loss.w_adv = 0): there is no L_adv to measure")
    stage.disc.load_state_dict(state["disc"])
    stage.disc.train()  # BatchNorm on batch statistics, as in training; spectral norms fixed
    return stage, pairs


def _grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def pulls(stage: DistillStage, pairs, *, w: float, band: float, batch: int, batches: int, seed: int) -> dict:
    """{"grad_norm": {term: value}, "grad_cosine": {pair: value}, "d_logit": {images: value}, "items": n}: means
    over the batches (module docstring). UserError when no pair item has a w within band of w."""
    net, cfg = stage.net, stage.cfg
    params = [p for p in net.parameters() if p.requires_grad]
    lo, hi = pairs.guidance_range
    if not lo <= w <= hi:
        raise UserError(f"--w {w:g} is outside the run's guidance range [{lo:g}, {hi:g}]: choose a w inside it")
    w_items = pair_guidance(torch.arange(len(pairs)), lo, hi)  # each item's w, without reading it
    near = torch.nonzero((w_items - w).abs() <= band).flatten().tolist()
    if not near:
        raise UserError(f"no pair item has w within {band:g} of {w:g}: choose a wider --band")
    order = torch.randperm(len(near), generator=torch.Generator().manual_seed(seed)).tolist()
    sums = {"norm": dict.fromkeys(TERMS, 0.0), "cos": {}, "logit": dict.fromkeys(("real", "teacher", "generator"), 0.0)}
    gen = torch.Generator().manual_seed(seed)
    for b in range(batches):
        items = [near[order[(b * batch + i) % len(near)]] for i in range(batch)]
        x, y, z, w_own = (torch.stack([pairs[j][k] for j in items]) for k in range(4))
        labels = stage._labels(y)
        ws = torch.full((batch,), float(w))
        rec = stage.G(net, z, labels, w_own.float())  # each latent at the w it was inverted with
        l_rec = d(rec, to_model(x), [stage.backbone], draw=augment_params(batch, gen)).mean()
        z_cfg = stage.sigma_max * torch.randn(z.shape, generator=gen)
        target = stage.cfg_target(z_cfg, labels, ws)
        l_cfg = cfg.loss.w_cfg * d(stage.G(net, z_cfg, labels, ws), target, [stage.backbone],
                                   draw=augment_params(batch, gen)).mean()
        fake = stage.G(net, stage.sigma_max * torch.randn(z.shape, generator=gen), labels, ws)
        l_adv = stage._g_adv(stage.disc, fake, labels, ws, gen)
        lam = adaptive_weight(l_rec, l_adv, adaptive_weight_layer(net)) if cfg.loss.adaptive else 1.0
        g = {"rec": _grad(l_rec, params), "cfg": _grad(l_cfg, params),
             "adv": _grad(cfg.loss.w_adv * lam * l_adv, params)}
        for t in TERMS:
            sums["norm"][t] += g[t].norm().item() / batches
        for i, a in enumerate(TERMS):
            for bname in TERMS[i + 1:]:
                c = torch.nn.functional.cosine_similarity(g[a], g[bname], dim=0).item()
                sums["cos"][f"{a}/{bname}"] = sums["cos"].get(f"{a}/{bname}", 0.0) + c / batches
        with torch.no_grad():
            for name, images in (("real", to_model(x)), ("teacher", target), ("generator", fake.detach())):
                sums["logit"][name] += stage.disc(images, labels, ws).mean().item() / batches
    return {"grad_norm": sums["norm"], "grad_cosine": sums["cos"], "d_logit": sums["logit"], "items": len(near)}


def rows_of(result: dict, *, run: str, w: float, num_samples: int, seed: int) -> list[dict]:
    common = dict(model=run, method="pagoda", guidance=w, num_samples=num_samples, seed=seed, device="cpu",
                  dtype="float32")
    rows = [make_row(metric="grad_norm", value=v, extra={"term": t}, **common) for t, v in result["grad_norm"].items()]
    rows += [make_row(metric="grad_cosine", value=v, extra={"pair": p}, **common)
             for p, v in result["grad_cosine"].items()]
    rows += [make_row(metric="d_logit", value=v, extra={"images": i}, **common) for i, v in result["d_logit"].items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bench.pulls", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder of a guidance-conditioned `pagoda distill` (config.json, state.pt)")
    p.add_argument("--w", type=float, default=3.0, help="the CFG scale to measure at (default 3)")
    p.add_argument("--band", type=float, default=0.25, help="L_rec uses the pair items with |w_j - w| <= band "
                   "(default 0.25)")
    p.add_argument("--batch", type=int, default=16, help="items per batch (default 16)")
    p.add_argument("--batches", type=int, default=4, help="batches averaged (default 4)")
    p.add_argument("--seed", type=int, default=0, help="item order and noise (default 0)")
    p.add_argument("--weights-dir", default=None, help="weights folder of the run's backbones (paper / domain)")
    p.add_argument("-o", "--out", default=None, help="JSONL file the rows are appended to (default: print only)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.batches < 1 or not args.band >= 0:
        p.error("--batch and --batches must be >= 1 and --band >= 0")
    if args.out:
        check_rows_output(args.out)
    torch.manual_seed(args.seed)
    stage, pairs = load_run(Path(args.run), args.weights_dir)
    result = pulls(stage, pairs, w=args.w, band=args.band, batch=args.batch, batches=args.batches, seed=args.seed)
    rows = rows_of(result, run=str(args.run), w=args.w, num_samples=args.batch * args.batches, seed=args.seed)
    print(text_table([{"metric": r["metric"], "what": next(iter(r["extra"].values())), "value": r["value"]}
                      for r in rows], ["metric", "what", "value"]))
    print(f"L_rec on the {result['items']} pair items with w in [{args.w - args.band:g}, {args.w + args.band:g}]; "
          f"the run's D judged as real: {stage.cfg.loss.adv_real} (loss.adv_real)")
    if args.out:
        append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
