"""The library under the CLIs: measure anything that makes images, against references by name, in one call.

    from eval import evaluate
    rows = evaluate("samples.npz", ref="imagenet64", metrics="fid,is,pr")          # a sample store
    rows = evaluate(images_uint8, ref="refs/photos-16.npz", extractor="domain")    # a uint8 tensor [N, 3, H, W]
    rows = evaluate(lambda seeds, labels: my_model(seeds, labels), num_samples=50_000, num_classes=1000,
                    ref="imagenet64", metrics="fid,fd_dinov2")                     # a callable

`samples` is any of: a path (image folder, EDM2's nested seed folders, ADM .npz, .zip, .tar, webdataset shards
`a-{000..009}.tar`, a pagoda .safetensors checkpoint, `photos:split:res`), a uint8 tensor [N, 3, H, W] (or an
ADM-style uint8 array [N, H, W, 3]), an iterable of uint8 batches or (images, labels) pairs (say how many with
`num_samples`), a callable `(seeds int64 [B], labels int64 [B] or None) -> uint8 [B, 3, H, W]`, or an
eval.sources.Source. References are paths or the names of eval.catalog (fetched on first use); metrics are
eval.registry's names. The result is one row per metric (eval.rows), as the CLIs write them.

`Evaluator` keeps the extractors and references of one measurement for many sample sets: `eval.run`,
`eval.fid` and `bench.compare` are command-line clients of it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable

import numpy as np
import torch

from eval.fdr import FDR, spaces_of
from eval.measure import DEFAULT_SAMPLES, Plan, References, check_cell, make_extractors, score_cell
from eval.pipeline import init_distributed
from eval.registry import DEFAULT_ROLES, Estimators, check_extractor, estimators_arg
from eval.sources import GeneratorSource, Source, TensorSource, open_source
from pagoda.errors import UserError
from pagoda.generator import Generator, as_seeds


def roles_of(extractor: str | dict | None) -> dict:
    """The extractor of each role: a name (the main role: fid, sfid, kid, is, pr, dc) or a dict over the roles
    main / dinov2 / clip / cmmd; the others keep their defaults (DEFAULT_ROLES)."""
    if extractor is None:
        return dict(DEFAULT_ROLES)
    if isinstance(extractor, str):
        return {**DEFAULT_ROLES, "main": extractor}
    bad = sorted(set(extractor) - set(DEFAULT_ROLES))
    if bad:
        raise UserError(f"extractor roles {', '.join(bad)} are unknown: use {', '.join(DEFAULT_ROLES)}")
    return {**DEFAULT_ROLES, **extractor}


def estimators_of(estimator) -> Estimators:
    """Estimators from an Estimators, a dict of its fields, or the CLI's `kid_subset=500,bootstrap=100` text."""
    if estimator is None:
        return Estimators()
    if isinstance(estimator, Estimators):
        return estimator
    if isinstance(estimator, dict):
        try:
            return Estimators(**estimator)
        except TypeError as e:
            raise UserError(f"estimator {estimator}: {e}") from None
    try:
        return estimators_arg(str(estimator))
    except argparse.ArgumentTypeError as e:  # its text names the fix
        raise UserError(f"estimator {estimator!r}: {e}") from None


class CallableGenerator(Generator):
    """A callable `(seeds, labels) -> uint8 images` as a Generator: sample i gets seed + i and, for a conditional
    model, label_i = randint(num_classes) from torch.Generator(seed_i) (labels="seed"), or balanced ones."""

    kind = method = "callable"
    nfe = None  # unknown: the callable does not say how it makes its images
    space = uint8 = feature_nets = None  # unknown too (the callable quantises its own images)

    def __init__(self, fn: Callable, *, num_classes: int = 0, name: str | None = None):
        self.fn, self.num_classes = fn, int(num_classes)
        self.name = name or getattr(fn, "__name__", "callable")
        probe = self._call(as_seeds([0]), self.seed_labels([0]) if self.num_classes else None)
        self.resolution = int(probe.shape[-1])

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (0,)  # the callable makes its own noise: the seed's generator draws the label first

    def _call(self, seeds, labels):
        try:
            x = self.fn(seeds, labels)
        except UserError:
            raise
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or len(x) != len(seeds):
            desc = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise UserError(f"{self.name} returned {desc} for {len(seeds)} seeds: it must return uint8 images "
                            f"[{len(seeds)}, 3, H, W] (float in [-1, 1] -> uint8 by (x + 1) * 127.5, rounded)")
        return x

    def sample(self, seeds, labels=None, guidance: float | None = None) -> torch.Tensor:
        seeds = as_seeds(seeds)
        return self._call(seeds, self.check_labels(labels, len(seeds))).cpu()


def _iterable_source(data: Iterable, num_samples: int | None, name: str) -> TensorSource:
    if num_samples is None:
        raise UserError(f"{name}: an iterable of batches has no length: pass num_samples=N (the images it yields)")
    return TensorSource(data, name=name, num_samples=num_samples)


class Evaluator:
    """One measurement (metrics, references, extractors, estimators), applied to any number of sample sets.

    ref: a path or catalog name, or a list of them (each metric takes the one matching its extractor and the
    samples' resolution). metrics: names or a comma list. extractor: the main extractor's name, or a dict over
    the roles main / dinov2 / clip / cmmd. resize: the image convention of extractors that offer one. estimator:
    Estimators, a dict or `kid_subset=500,bootstrap=100`. class_names / captions: CLIP prompts. cache: read and
    write the feature cache of sample stores (eval.cache). val_ref: validation statistics for metric fdr (eval.fdr),
    whose spaces are `fdr_extractors` (default: the extractors the val_ref files were built with); train_ref: its
    training statistics (default: `ref`). UserError for every impossible request, before any
    weights are loaded where the names alone show it.
    """

    def __init__(self, ref: str | list[str] | tuple = (), metrics: str | Iterable[str] = ("fid",), *,
                 extractor: str | dict | None = None, resize: str | None = None, estimator=None,
                 per_class: bool = False, class_names: Iterable[str] | None = None,
                 captions: Iterable[str] | None = None, batch: int = 250, allow_small: bool = False,
                 weights_dir: str | os.PathLike | None = None, device=None, cache: bool = True,
                 val_ref: str | list[str] | tuple = (), train_ref: str | list[str] | tuple = (),
                 fdr_extractors: Iterable[str] | None = None):
        from eval.cache import default_cache
        from eval.registry import metric_list

        try:
            metrics = metric_list(metrics if isinstance(metrics, str) else ",".join(metrics))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"metrics {metrics!r}: {e}") from None
        self.val_refs, train_refs = (References([r] if isinstance(r, (str, os.PathLike)) else list(r),
                                                weights_dir=weights_dir, option=option)
                                     for r, option in ((val_ref, "--val-ref"), (train_ref, "--train-ref")))
        fdr = spaces_of(self.val_refs, list(fdr_extractors or ())) if FDR in metrics else ()
        if (self.val_refs.paths or train_refs.paths or fdr_extractors) and not fdr:
            raise UserError("--val-ref, --train-ref and --fdr-extractors are read by metric fdr only: add fdr to the "
                            "metrics, or drop them")
        self.plan = Plan(metrics=tuple(m for m in metrics if m != FDR), roles=roles_of(extractor),
                         est=estimators_of(estimator), fdr=fdr,
                         per_class=per_class, class_names=tuple(class_names) if class_names is not None else None,
                         captions=tuple(captions) if captions is not None else None, batch=int(batch),
                         allow_small=allow_small, cache=default_cache(cache))
        for m in self.plan.metrics:  # before loading any weights (an unknown name too)
            check_extractor(m, self.plan.extractor_of(m))
        self.refs = References([ref] if isinstance(ref, (str, os.PathLike)) else list(ref), weights_dir=weights_dir)
        self.train_refs = train_refs if train_refs.paths else self.refs  # fdr's training statistics
        self.refs.check_extractors(self.plan)
        self.device = torch.device(device) if device is not None else init_distributed()
        self.extractors = make_extractors({self.plan.extractor_of(m) for m in self.plan.metrics} | set(fdr),
                                          weights_dir=weights_dir, device=self.device, resize=resize)

    def source(self, samples, *, num_samples: int | None = None, seed: int = 0, labels="seed",
               guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
               num_classes: int = 0, name: str | None = None) -> Source:
        """The Source of `samples` (see the module docstring). num_samples: how many to generate (checkpoints,
        callables; default 50,000) or to use (stores: the first N; iterables: how many they yield). seed, labels,
        guidance, sampler, steps: how a checkpoint or callable samples (labels "seed" | "balanced" | int64 [N])."""
        if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) < 1):
            raise UserError(f"num_samples={num_samples!r}: give a positive number of samples (None = all / default)")
        if isinstance(samples, Source):
            return samples
        if isinstance(samples, (str, os.PathLike)):
            spec = str(samples)
            return open_source(spec, num_samples=num_samples if num_samples or not spec.endswith(".safetensors")
                               else DEFAULT_SAMPLES, seed=seed, labels=labels, guidance=guidance, sampler=sampler,
                               steps=steps, device=self.device)
        if isinstance(samples, np.ndarray):
            if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] != 3:
                raise UserError(f"an array of samples must be uint8 [N, H, W, 3] (ADM's arr_0), got {samples.dtype} "
                                f"{samples.shape}: convert it, or pass a uint8 tensor [N, 3, H, W]")
            samples = torch.from_numpy(samples).permute(0, 3, 1, 2)
        if torch.is_tensor(samples):
            return TensorSource(samples, name=name or "tensor").limit(num_samples)
        if callable(samples):
            gen = CallableGenerator(samples, num_classes=num_classes, name=name)
            return GeneratorSource(gen, num_samples or DEFAULT_SAMPLES, seed=seed, labels=labels, name=gen.name)
        if isinstance(samples, (list, tuple)) and num_samples is None:  # a list of batches says how many it holds
            num_samples = sum(len(b[0] if isinstance(b, (tuple, list)) else b) for b in samples) or None
        if isinstance(samples, Iterable):
            return _iterable_source(samples, num_samples, name or "batches")
        raise UserError(f"cannot measure a {type(samples).__name__}: give a path, a uint8 tensor, an iterable of "
                        "uint8 batches, a callable (seeds, labels) -> images or a checkpoint")

    def check(self, source: Source, *, what: str | None = None, option: str = "num_samples") -> None:
        """Every refusal that needs no image: extractors, references, sample counts, labels, prompts."""
        check_cell(self.plan, source, self.extractors, self.refs, what=what or source.name, option=option,
                   fdr_refs=(self.train_refs, self.val_refs))

    def measure(self, source: Source, *, seed: int | None = None, on_batch=None, check: bool = True) -> list[dict]:
        """The rows of one sample set (checked first, unless the caller has: check=False); seed: what the rows
        record as the seed (generated samples)."""
        with source:
            if check:
                self.check(source)
            return score_cell(self.plan, source, self.extractors, self.refs, device=self.device, seed=seed,
                              on_batch=on_batch, fdr_refs=(self.train_refs, self.val_refs))


def evaluate(samples, ref: str | list[str] | tuple = (), metrics: str | Iterable[str] = ("fid",), *,
             num_samples: int | None = None, seed: int = 0, labels="seed", guidance: float | None = None,
             sampler: str | None = None, steps: int | None = None, num_classes: int = 0, name: str | None = None,
             **options) -> list[dict]:
    """Measure `samples` (see the module docstring) with `metrics` against `ref`; the result rows (dicts).

    The sampling keywords are Evaluator.source's; every other keyword (extractor, resize, estimator, per_class,
    class_names, captions, batch, allow_small, weights_dir, device, cache) is Evaluator's. UserError (one line)
    for anything that cannot be measured, raised before any image is made where it can be.
    """
    ev = Evaluator(ref, metrics, **options)
    source = ev.source(samples, num_samples=num_samples, seed=seed, labels=labels, guidance=guidance,
                       sampler=sampler, steps=steps, num_classes=num_classes, name=name)
    generated = isinstance(source, GeneratorSource)
    return ev.measure(source, seed=seed if generated else None)
