"""`python -m eval.run`: every metric of checkpoints and of anyone's samples, one extraction pass per extractor.

    python -m eval.run --ckpt teacher.safetensors --ckpt G16.safetensors --ref refs/photos-16.npz \\
        --extractor domain --metrics fid,kid,is,pr --guidance 1,2 --sampler heun,euler --steps 8,18
    python -m eval.run --images samples.npz --images samples_dir/ --images shards-{000..009}.tar \\
        --ref imagenet64 --metrics fid,sfid,is,pr,dc

A checkpoint is swept over cells (guidance, sampler, steps); axes that do not apply collapse (sampler and
steps for a one-step generator, guidance for an unconditional one). `--images` (an ADM npz with arr_0 and
optional arr_1 labels, an image folder, EDM2's nested seed folders, a zip / tar or webdataset shards:
eval.stores) is one cell with method "samples", named by its path; it goes through the same code path as a
checkpoint's samples, and its features are cached by content (eval.cache; --no-cache). In each cell every
extractor the metrics need runs once over the images (`--extractor NAME,dinov2=NAME,clip=NAME,cmmd=NAME`: the
first for fid, sfid, kid, is, pr, dc, the others for fd_dinov2, clip and cmmd). Each (cell, metric) is one JSONL
row with its estimator parameters in `extra`; a
table is printed at the end. A --ref serves the metrics whose extractor, image convention (resize) and
resolution match its provenance (a reference without provenance, e.g. an ADM npz or EDM2 pkl, matches any).

Rows: fid, sfid (ADM evaluator spatial FID), fd_dinov2 (CI from --estimator bootstrap=N), kid (extra.std, subset_size,
subsets), precision / recall (k, CI), density / coverage (k, CI), is (extra.splits, style, std), clip
(100 * mean max(cos, 0); class prompts "a photo of a {class}" or one caption per image), cmmd (x 1000).
Every impossible request (a metric its extractor cannot measure, too few samples or stored reference
features, a reference lacking what a metric needs) is refused before any image is generated.

Labels of a class-conditional checkpoint are drawn per sample from its seed (`--labels seed`, as EDM and
ADM sample), so no metric depends on the generation order; `--labels balanced` gives exactly equal class
counts in a seeded random order, and its rows say so (extra.labels).

--per-class (class-labelled samples, a reference with labels) adds, for fid and pr, one row per class:
`fid_class`, `precision_class`, `recall_class`, with extra.class, class_name, num_fake, num_real. A class
usually has fewer samples than feature dimensions, so its FID is biased upwards: compare it between
models at equal sample counts, never with published FIDs. The table shows the 5 worst classes per metric.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import torch

from eval.measure import DEFAULT_SAMPLES, Cell, cells_of, worst_classes
from eval.pipeline import is_main
from eval.registry import (
    DEFAULT_ROLES,
    METRICS,
    PER_CLASS,
    Estimators,
    bootstrap_error,
    estimators_arg,
    metric_list,
)
from eval.repeat import repeat_rows
from eval.sources import GeneratorSource, Window, open_source
from pagoda.config import SAMPLER_HELP, sampler_spec
from pagoda.errors import (
    MAX_SAMPLES,
    ArgumentParser,
    UserError,
    guidance_scale,
    positive_int,
    run_cli,
    sample_count,
)
from pagoda.rows import append_rows, check_rows_output, format_table


def csv_of(kind):
    """argparse type: a comma-separated list of `kind` values."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except argparse.ArgumentTypeError as e:  # the item's own message names the fix
            raise argparse.ArgumentTypeError(f"in {text!r}: {e}") from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list: give at least one value")
        return values
    return parse


def labels_arg(text: str) -> str:
    """argparse type: how a conditional model's labels are chosen."""
    if text not in ("seed", "balanced"):
        raise argparse.ArgumentTypeError(f"{text!r}: use seed (drawn per sample, default) or balanced")
    return text


def lines_arg(text: str) -> tuple[str, ...]:
    """argparse type: the non-empty lines of a UTF-8 text file."""
    try:
        lines = Path(text).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {text} as UTF-8 text ({type(e).__name__})") from None
    lines = tuple(line.strip() for line in lines if line.strip())
    if not lines:
        raise argparse.ArgumentTypeError(f"{text} holds no lines")
    return lines


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared by eval.fid and eval.run: sampling, extraction and output."""
    p.add_argument("--num-samples", type=sample_count, default=None,
                   help=f"images to generate per checkpoint cell (default {DEFAULT_SAMPLES}); "
                        "with --images: the first N (default all)")
    p.add_argument("--batch", type=positive_int, default=250, help="images per batch per process (no effect on results)")
    p.add_argument("--seed", type=int, default=None, help="checkpoints: sample i uses seed + i (default 0)")
    p.add_argument("--labels", type=labels_arg, default=None,
                   help="labels of a conditional checkpoint: seed (drawn per sample, default) or balanced "
                        "(equal class counts in a seeded random order)")
    add_weights_args(p)
    p.add_argument("-o", "--out", default="results/eval.jsonl", help="JSONL file the result rows are appended to")
    p.add_argument("--allow-small", action="store_true", help="run even with fewer samples than feature dimensions")
    add_cache_arg(p)


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    """--no-cache: extract a sample store's features again instead of reading / writing the feature cache."""
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache of sample stores "
                   "(default: $PAGODA_FEATURES, else ~/.cache/pagoda/features; keyed by content)")


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """--weights-dir and --offline: where extractor weights and named references are looked for and fetched."""
    p.add_argument("--weights-dir", default=None, help="folder of extractor weights and named references (default: "
                   "$PAGODA_WEIGHTS, else ~/.cache/pagoda, then ./weights; missing files are fetched into it)")
    p.add_argument("--offline", action="store_true", help="never touch the network (= PAGODA_OFFLINE=1): a missing "
                   "file is named with its hash and where to copy it")


def apply_offline(args) -> None:
    """--offline: set PAGODA_OFFLINE=1 for this process and the ones it starts."""
    if getattr(args, "offline", False):
        os.environ["PAGODA_OFFLINE"] = "1"


def check_bootstrap(rounds: int) -> None:
    """UserError unless --bootstrap is 0 (off) or enough rounds for a percentile interval."""
    if bootstrap_error(rounds):
        raise UserError(f"--bootstrap {rounds}: {bootstrap_error(rounds)}")


def refuse_checkpoint_options(args, what: str) -> None:
    """UserError for sampling options given with sample files only (they would be silently ignored)."""
    given = [opt for opt, v in (("--guidance", args.guidance), ("--sampler", args.sampler), ("--steps", args.steps),
                                ("--labels", args.labels), ("--seed", args.seed)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)}: sampling option(s) for checkpoints only, not for {what}: drop them")


def extractor_spec(text: str) -> tuple[dict, str | None]:
    """argparse type: `NAME[,ROLE=NAME...][,resize=R]` -> ({role: name}, resize). NAME is the main extractor
    (fid, sfid, kid, is, pr, dc); ROLE is dinov2 (fd_dinov2), clip (clip) or cmmd (cmmd); resize is the image
    convention of the extractors that offer one (DINOv2: pil-bicubic, edm2-torch)."""
    roles, resize = {}, None
    for i, item in enumerate(filter(None, (t.strip() for t in text.split(",")))):
        key, eq, value = item.partition("=")
        if not eq and i == 0:
            roles["main"] = key
        elif key == "resize" and value and resize is None:
            resize = value
        elif key in DEFAULT_ROLES and value and key not in roles:
            roles[key] = value
        else:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: write NAME[,dinov2=NAME][,clip=NAME]"
                                             "[,cmmd=NAME][,resize=MODE], each once (e.g. domain,dinov2=dinov2-vitb14)")
    if not roles and resize is None:
        raise argparse.ArgumentTypeError(f"{text!r} names no extractor: write NAME[,dinov2=NAME][,clip=NAME]"
                                         "[,cmmd=NAME][,resize=MODE] (e.g. inception or domain)")
    return roles, resize


def prompts_arg(text: str) -> tuple[str, tuple[str, ...]]:
    """argparse type: `classes:FILE` (one class name per line) or `captions:FILE` (one caption per image)."""
    kind, colon, path = text.partition(":")
    if not colon or kind not in ("classes", "captions"):
        raise argparse.ArgumentTypeError(f"{text!r}: write classes:FILE (one class name per line, class-id order) or "
                                         "captions:FILE (one caption per image)")
    return kind, lines_arg(path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.run` (bench.demo builds its steps against it)."""
    p = ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint to evaluate (repeatable)")
    p.add_argument("--images", action="append", default=[], help="samples (repeatable): an image folder, EDM2's "
                   "nested seed folders, an ADM npz, a .zip / .tar, webdataset shards a-{000..009}.tar")
    p.add_argument("--ref", action="append", default=[], help="reference statistics (repeatable, see above), or a "
                   "named one: imagenet64|128|256|512, edm2-img64|512 (python -m eval.ref --list)")
    p.add_argument("--val-ref", action="append", default=[], help="validation statistics (repeatable, one per "
                   "space) for metric fdr: eval.ref of held-out images, e.g. photos:heldout:16 (eval.fdr)")
    p.add_argument("--train-ref", action="append", default=[], help="training statistics for metric fdr (repeatable; "
                   "default: the --ref files, the field's FID reference being the training set's)")
    p.add_argument("--fdr-extractors", type=csv_of(str), default=None, help="the spaces fdr averages over (default: "
                   "the extractors of the --val-ref files; the field's: inception,dinov2,clip)")
    p.add_argument("--metrics", type=metric_list, default=["fid"],
                   help=f"comma list from {','.join(METRICS)},fdr (FD to the training set / the validation set's)")
    p.add_argument("--extractor", type=extractor_spec, default=({}, None),
                   help="NAME[,dinov2=NAME][,clip=NAME][,cmmd=NAME][,resize=MODE]: the extractor of fid/sfid/kid/"
                        "is/pr/dc (default inception), of fd_dinov2 (dinov2 = ViT-L/14), clip (clip = ViT-L/14) and "
                        "cmmd (clip-vitl14-336), and DINOv2's image convention (pil-bicubic or edm2-torch)")
    p.add_argument("--guidance", type=csv_of(guidance_scale), default=None, help="CFG scales, e.g. 1,1.5,2")
    p.add_argument("--sampler", type=csv_of(sampler_spec), default=None, help="comma-separated: " + SAMPLER_HELP)
    p.add_argument("--steps", type=csv_of(positive_int), default=None, help="diffusion sampler steps, e.g. 8,18")
    p.add_argument("--estimator", type=estimators_arg, default=Estimators(),
                   help="estimator parameters, e.g. kid_subset=1000,kid_subsets=100,is_splits=10,is_style=adm,pr_k=3,"
                        "dc_k=5,bootstrap=100 (bootstrap rounds of the fid/fd/P-R/D-C CIs; 0 = none)")
    p.add_argument("--per-class", action="store_true",
                   help="also one fid / pr row per class (class-labelled samples, reference with labels)")
    p.add_argument("--repeat", type=positive_int, default=1, metavar="K",
                   help="measure K disjoint ranges of --num-samples (seeds seed + k N ..., or images k N ...) and add, "
                        "per metric, a mean-of-K row (with the std) and a min-of-K row (max-of-K where higher is "
                        "better), each labelled by extra.selection (default 1: one range)")
    p.add_argument("--prompts", type=prompts_arg, default=None,
                   help="clip: classes:FILE (one class name per line) or captions:FILE (one caption per image)")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.ckpt and not args.images:
        p.error("give at least one --ckpt or --images")
    check_rows_output(args.out)
    apply_offline(args)
    if args.per_class and not set(PER_CLASS) & set(args.metrics):
        p.error("--per-class applies to fid and pr: add one of them to --metrics")
    if not args.ckpt:
        refuse_checkpoint_options(args, "--images")
    total = args.repeat * (args.num_samples or DEFAULT_SAMPLES)
    if total > MAX_SAMPLES:
        raise UserError(f"--repeat {args.repeat} x --num-samples {args.num_samples or DEFAULT_SAMPLES} is {total:,} "
                        f"samples, more than {MAX_SAMPLES:,}: lower --repeat or --num-samples")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed {args.seed} is negative: seeds are integers >= 0")
    last = (args.seed or 0) + total - 1
    if args.ckpt and last > 2**63 - 1:  # seeds are int64
        raise UserError(f"--seed {args.seed} with --repeat {args.repeat} x --num-samples reaches seed {last}, beyond "
                        "the largest int64 seed (2^63 - 1): use a smaller --seed")
    from eval.api import Evaluator
    roles, resize = args.extractor
    kind, lines = args.prompts or (None, None)
    ev = Evaluator(args.ref, args.metrics, extractor=roles, resize=resize, estimator=args.estimator,
                   per_class=args.per_class, class_names=lines if kind == "classes" else None,
                   captions=lines if kind == "captions" else None, batch=args.batch, allow_small=args.allow_small,
                   weights_dir=args.weights_dir, cache=not args.no_cache, val_ref=args.val_ref,
                   train_ref=args.train_ref, fdr_extractors=args.fdr_extractors)
    rows = run(ev, ckpts=args.ckpt, images=args.images, num_samples=args.num_samples, seed=args.seed or 0,
               labels=args.labels or "seed", guidance=args.guidance or [None], samplers=args.sampler or [None],
               steps=args.steps or [None], repeat=args.repeat)
    if is_main():
        append_rows(args.out, rows)
        print(format_table([r for r in rows if not r["metric"].endswith("_class")]))
        if args.per_class:
            print(f"\nworst 5 classes per metric (all classes in {args.out}):")
            print(format_table(worst_classes(rows)))
        print(f"{len(rows)} rows -> {args.out}")
    return 0


def run(ev, *, ckpts: list[str], images: list[str], num_samples: int | None, seed: int, labels: str,
        guidance: list, samplers: list, steps: list, dtype: torch.dtype = torch.float32, repeat: int = 1) -> list[dict]:
    """Check every cell with the Evaluator `ev` (eval.api), then measure them in order; the rows of all cells.
    Each checkpoint is loaded once to plan and check its cells (the sampler and steps of a cell change nothing
    that is checked) and once per cell to measure it; each sample set is opened once. dtype: the checkpoints'
    sampling dtype (autocast). repeat K > 1: each cell is measured on K disjoint ranges of N samples (seeds
    seed + kN .. seed + (k+1)N - 1; a sample set's images kN .. (k+1)N - 1, N = num_samples or all // K) and
    eval.repeat.repeat_rows adds the mean-of-K and min-of-K rows."""
    from pagoda.generator import load_generator

    n = num_samples or DEFAULT_SAMPLES

    def generator_source(gen, cell: Cell, k: int = 0) -> GeneratorSource:
        return GeneratorSource(gen, n, seed=seed + k * n, labels=labels, guidance=cell.guidance, name=cell.spec)

    def store_windows(source) -> list:
        if repeat == 1:
            return [source.limit(num_samples)]
        size = num_samples or source.num_samples // repeat
        if size < 1 or size * repeat > source.num_samples:
            raise UserError(f"{source.name} holds {source.num_samples} images, fewer than the {max(size, 1) * repeat} "
                            f"that --repeat {repeat} needs: lower --num-samples or --repeat, or add images")
        return [Window(source, k * size, size) for k in range(repeat)]

    cells, image_sources, said = [], {}, io.StringIO()
    with contextlib.redirect_stderr(said):  # the checks' notes and warnings are shown only if every check passes
        for ckpt in ckpts:
            gen = load_generator(ckpt, device=ev.device)
            for cell in cells_of(ckpt, gen, guidance, samplers, steps):  # every refusal before any image is made
                gen.check_guidance(cell.guidance)  # e.g. a w outside a guidance-conditioned G's trained range
                with generator_source(gen, cell) as source:
                    ev.check(source, what=ckpt, option="--num-samples")
                cells.append(cell)
        for spec in images:
            windows = store_windows(open_source(spec))
            ev.check(windows[0], what=spec, option="--num-samples (or more images)")
            image_sources[spec] = windows
            cells.append(Cell(spec, images=True))
    sys.stderr.write(said.getvalue())
    rows = []
    for cell in cells:
        if cell.images:  # every cell was checked above
            runs = [ev.measure(window, check=False) for window in image_sources[cell.spec]]
        else:
            gen = load_generator(cell.spec, sampler=cell.sampler, steps=cell.steps, device=ev.device, dtype=dtype)
            runs = [ev.measure(generator_source(gen, cell, k), seed=seed + k * n, check=False) for k in range(repeat)]
        rows += runs[0] if repeat == 1 else repeat_rows(runs)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
