"""The one streaming pass shared by eval.ref, eval.fid and eval.run: source -> extractors -> statistics.

Images are generated or read batch by batch, each extractor runs once per batch, and what is kept
is bounded: float64 sums of features and outer products (FeatureStats, all-reduced across ranks),
plus, only when a metric needs them, per-sample features / class labels / logits / CLIP cosines in
FeatureStores of a fixed capacity (gathered to every rank at the end). Memory does not grow with the
sample count beyond those stores.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.sources import Source, dist_info
from eval.stats import FeatureStats, FeatureStore
from pagoda import dist
from pagoda.dist import is_main


@dataclass(frozen=True)
class Want:
    """What to keep from one extractor besides the mean / covariance sums."""

    store: int = 0  # keep features of the first `store` samples (KID, P/R, bootstrap CIs)
    labels: bool = False  # also keep the class label of each stored feature row (per-class metrics)
    logits: bool = False  # keep every sample's logits (IS)
    texts: list[str] | None = None  # CLIP: prompts; keep each sample's image-text cosine
    text_by: str = "label"  # texts[label of sample i] (class prompts) or texts[i] (one caption per sample)
    spatial: bool = False  # also keep mean / covariance sums of the spatial features (sFID)


@dataclass
class Extraction:
    """Everything one extractor produced over a source."""

    extractor: object
    stats: FeatureStats
    store: FeatureStore | None = None
    labels: FeatureStore | None = None  # one column: the label of each row of `store`
    logits: FeatureStore | None = None
    cos: FeatureStore | None = None
    spatial: FeatureStats | None = None  # sums of the extractor's "spatial" output (sFID)
    extra: dict = field(default_factory=dict)

    def stored_labels(self) -> np.ndarray | None:
        """int64 class of each row of store.features() (labels travel as exact small floats), or None."""
        return None if self.labels is None else np.rint(self.labels.features()[:, 0]).astype(np.int64)


def init_distributed() -> torch.device:
    """Join the torchrun process group if there is one; the device this rank extracts on."""
    dist.init()
    return dist.device()


@contextlib.contextmanager
def exact_math():
    """Inference mode without TF32 or cudnn autotuning (METHOD §5), around generation and extraction alike."""
    from eval.extractors import deterministic
    with torch.inference_mode(), deterministic():
        yield


def _start(ex, want: Want, num_samples: int) -> Extraction:
    out = Extraction(ex, FeatureStats(ex.feature_dim))
    if want.store:
        out.store = FeatureStore(ex.feature_dim, min(want.store, num_samples))
    if want.labels:
        if out.store is None:
            raise ValueError("Want(labels=True) keeps the labels of stored features: set store > 0 too")
        out.labels = FeatureStore(1, out.store.capacity)
    if want.logits:
        if not ex.num_logits:
            raise ValueError(f"extractor {ex.name} has no logits")
        out.logits = FeatureStore(ex.num_logits, num_samples)
    if want.texts is not None:  # CLIP score: the prompts' unit text features, and one cosine per image
        out.cos = FeatureStore(1, num_samples)
        out.extra.update(text_features=F.normalize(ex.encode_text(want.texts).double(), dim=-1).cpu(),
                         text_by=want.text_by)
    if want.spatial:
        if not ex.spatial_dim:
            raise ValueError(f"extractor {ex.name} has no spatial features")
        out.spatial = FeatureStats(ex.spatial_dim)
    return out


def _update(out: Extraction, res: dict, labels: torch.Tensor | None, index: torch.Tensor) -> None:
    feats = res["features"].detach().to("cpu", torch.float64)
    out.stats.update(feats)
    if out.store is not None:
        keep = index < out.store.capacity
        if keep.any():
            out.store.update(feats[keep], index[keep])
            if out.labels is not None:
                if labels is None:
                    raise ValueError("Want(labels=True) but the source gives no labels")
                out.labels.update(labels.cpu()[keep].double()[:, None], index[keep])
    if out.logits is not None:
        out.logits.update(res["logits"].detach().to("cpu", torch.float64), index)
    if out.spatial is not None:
        out.spatial.update(res["spatial"].detach().to("cpu", torch.float64))
    if out.cos is not None:
        if out.extra["text_by"] == "label" and labels is None:
            raise ValueError("CLIP score with class prompts needs labels")
        text = out.extra["text_features"][labels.cpu() if out.extra["text_by"] == "label" else index]
        out.cos.update((F.normalize(feats, dim=-1) * text).sum(-1, keepdim=True), index)


def extract(source: Source, extractors: dict[str, object], wants: dict[str, Want] | None = None, *,
            batch: int = 64, device: str | torch.device = "cpu", progress: bool | None = None,
            on_batch=None, cache=None) -> dict[str, Extraction]:
    """Run every extractor over this rank's shard of `source`; reduce / gather across ranks at the end.

    `on_batch(images, labels, index)` sees each batch (e.g. to save samples). Progress goes to stderr
    on rank 0 when it is a terminal (progress=None) or when asked. `cache` (an eval.cache.FeatureCache) reads
    and writes the per-sample outputs of a store with content, shard by shard (one process, no on_batch);
    each Extraction's `extra` then counts the images `extracted` and read `from_cache`.
    """
    wants = wants or {}
    outs = {name: _start(ex, wants.get(name, Want()), source.num_samples) for name, ex in extractors.items()}
    rank, world = dist_info()
    show = is_main() and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=source.num_samples, disable=not show, unit="img", desc=source.name[-40:], file=sys.stderr)
    keys = {name: cache.key(source, ex) for name, ex in extractors.items()} if cache is not None else {}
    with exact_math():
        if keys and world == 1 and on_batch is None and all(keys.values()):
            _extract_cached(source, extractors, outs, keys, cache, batch=batch, device=device, bar=bar)
        else:
            for x, y, index in source.batches(batch, rank=rank, world=world):
                if on_batch is not None:
                    on_batch(x, y, index)
                for name, ex in extractors.items():
                    _update(outs[name], ex(x.to(device)), y, index)
                bar.update(len(x) * world)
    bar.close()
    for out in outs.values():
        _finish(out)
    return outs


def _extract_cached(source: Source, extractors: dict, outs: dict, keys: dict, cache, *, batch: int, device,
                    bar) -> None:
    """Shard by shard: read each extractor's outputs from the cache, compute (and write) those missing, then add
    the whole shard to the statistics, so a cold, a warm and a resumed run sum in the same order."""
    from eval.cache import outputs_of
    from eval.sources import check_images

    for out in outs.values():
        out.extra.update(extracted=0, from_cache=0)
    for start in range(0, source.num_samples, cache.shard):
        stop = min(start + cache.shard, source.num_samples)
        shard = {name: cache.load(keys[name], start, stop) for name in extractors}
        missing = [name for name, arrays in shard.items() if arrays is None]
        if missing:
            parts, labels = {name: [] for name in missing}, []
            for b in range(start, stop, batch):
                index = torch.arange(b, min(b + batch, stop), dtype=torch.int64)
                x, y = source.load(index)
                x = check_images(x, source.name).to(device)
                for name in missing:
                    parts[name].append(outputs_of(extractors[name](x)))
                labels.append(None if y is None else y.numpy())
                bar.update(len(index))
            for name in missing:
                arrays = {k: np.concatenate([p[k] for p in parts[name]]) for k in parts[name][0]}
                if labels[0] is not None:
                    arrays["labels"] = np.concatenate(labels).astype(np.int64)
                about = dict(store=source.cache_key(), source=source.name, extractor=extractors[name].name,
                             weights_sha256=extractors[name].weights_sha256)
                cache.save(keys[name], start, stop, arrays, about)
                shard[name] = arrays
                outs[name].extra["extracted"] += stop - start
        else:
            bar.update(stop - start)
        index = torch.arange(start, stop, dtype=torch.int64)
        for name, arrays in shard.items():
            if name not in missing:
                outs[name].extra["from_cache"] += stop - start
            y = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
            res = {k: torch.from_numpy(v) for k, v in arrays.items() if k != "labels"}
            _update(outs[name], res, y, index)
    for name, out in outs.items():
        print(f"feature cache: {source.name} x {name}: {out.extra['from_cache']} images read, {out.extra['extracted']} "
              f"extracted ({cache.root / keys[name]}; --no-cache to bypass)", file=sys.stderr)


def _finish(out: Extraction) -> None:
    out.stats.all_reduce()
    if out.spatial is not None:
        out.spatial.all_reduce()
    for store in (out.store, out.labels, out.logits, out.cos):
        if store is not None:
            store.gather()


def check_sample_count(n: int, dim: int, *, allow_small: bool, what: str, option: str = "--num-samples",
                       metric: str = "FID") -> None:
    """Refuse (UserError) fewer than 2 samples (no covariance at all), and fewer samples than feature
    dimensions unless allow_small (the covariance is singular: the Frechet distance is biased upwards).
    `option` names the option that sets the count in the command at hand."""
    from pagoda.errors import UserError
    if n < 2:
        raise UserError(f"{what}: {metric} needs at least 2 samples for a covariance, got {n}: use {option} >= 2 "
                        f"(>= {dim} to be comparable)")
    if n >= dim:
        return
    if not allow_small:
        raise UserError(f"{what}: {n} samples is fewer than the feature dimension {dim}, so the covariance is "
                        f"singular and {metric} is not comparable: use {option} >= {dim} or pass --allow-small")
    if is_main():
        print(f"warning: {what}: {n} samples < feature dimension {dim}: {metric} is biased and not comparable "
              "(--allow-small)", file=sys.stderr)
