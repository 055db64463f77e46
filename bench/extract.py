"""Inception feature extraction: this suite against torch-fidelity's extractor, same images and weights.

    python -m bench.extract --images 2000 --batch 100 [--weights-dir D] [--out results/bench.jsonl]
    python -m bench.extract --folder --images 2000        # end to end from PNG files, against torch-fidelity
                                                          # and clean-fid, and the feature cache cold / warm

--folder: N bundled-photo crops (64 px) are written as PNG files to a temporary folder, and each tool extracts
the folder's Inception features end to end (its own input pipeline: listing, decoding, batching) in one process,
one after the other: pagoda's eval pipeline (eval.pipeline.extract over eval.sources, as eval.run reads a folder)
with the feature cache cold, warm (the re-score: the folder's content hash plus reading the cached shards) and off,
torch-fidelity's calculate_metrics(input1=folder, isc=True) and clean-fid's get_folder_features (mode "clean":
its PIL bicubic resize to 299 in its data loader). All three run the same Inception network (torch-fidelity's
module with the same weights), so the ratios measure the input pipelines and loops. pagoda's time is split into
reading + decoding and the network (forward + sums).

Both extract pool3 features of two disjoint sets of N bundled-photo crops at 64 px (upsampled
to 299 inside each extractor, as generated images would be), batch by batch in alternation so
that load from other processes hits both alike. Ours is timed as eval.run runs it: the forward plus
the float64 mean / covariance sums, once for FID alone and once with sFID on (the 2023-d spatial
sums too). Reported: img/s of each, the ratio of ours (sFID on) to torch-fidelity, the extra cost of
sFID over FID alone, and |FID_ours - FID_torch-fidelity| between the two sets. Without --weights-dir, randomly initialised
weights with BatchNorm statistics calibrated on the photos stand in (the row says so).
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.profile import device_name
from eval.extractors import (
    InceptionExtractor,
    calibrate_batchnorm,
    inception_state_dict,
    torch_fidelity_inception,
)
from eval.metrics import fid_from_features
from eval.rows import make_row
from eval.stats import FeatureStats
from pagoda.checkpoint import write_atomic
from pagoda.errors import ArgumentParser, UserError, run_cli
from pagoda.rows import append_rows, check_rows_output
from pagoda.weights import INCEPTION, load_state_dict, resolve_weights


def bench_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random sets of n uint8 64 px crops from the bundled photos' train split."""
    from pagoda.data import PhotosDataset

    images = PhotosDataset(64, "train").images
    if 2 * n > len(images):
        raise UserError(f"--images {n}: the photos set has {len(images)} crops, two sets need {2 * n}: use <= {len(images) // 2}")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(images)))
    return images[perm[:n]], images[perm[n : 2 * n]]


def random_inception_weights(folder: Path, calibration: torch.Tensor, seed: int = 0) -> Path:
    """Write a random Inception (exact architecture, BN calibrated on `calibration`) under the official name."""
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    net = calibrate_batchnorm(torch_fidelity_inception(tv.state_dict()), calibration.split(8))
    path = Path(folder) / INCEPTION.files[0]
    write_atomic(path, lambda tmp: torch.save(net.state_dict(), tmp))  # never a half-written weights file
    return path


def timed_features(fns: dict, images: torch.Tensor, batch: int, desc: str = "extract") -> tuple[dict, dict]:
    """Features [N, 2048] and seconds per function, batches interleaved across the functions."""
    feats, secs = {k: [] for k in fns}, dict.fromkeys(fns, 0.0)
    for x in tqdm(images.split(batch), desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            feats[k].append(fn(x))
            secs[k] += time.perf_counter() - t0
    return {k: torch.cat(v).double() for k, v in feats.items()}, secs


def run(n: int, batch: int, weights_dir: str | None, threads: int | None) -> dict:
    """Time both extractors on the same 2n images; compare their FIDs."""
    if threads:
        torch.set_num_threads(threads)
    x1, x2 = bench_images(n)
    with tempfile.TemporaryDirectory() as tmp:
        made = weights_dir is None
        folder = Path(tmp) if made else Path(weights_dir)
        if made:
            random_inception_weights(folder, x2[:32])
        ours = InceptionExtractor(weights_dir=folder)
        ref = torch_fidelity_inception(load_state_dict(resolve_weights(INCEPTION, folder)), features=("2048",)).eval()

    def ref_fn(x):  # torch-fidelity's own extraction loop runs its module under no_grad
        with torch.no_grad():
            return ref(x)[0]

    def ours_fn(x, spatial: bool):  # what eval.pipeline does per batch: forward, then the float64 sums
        out = ours(x)
        FeatureStats(ours.feature_dim).update(out["features"])
        if spatial:
            FeatureStats(ours.spatial_dim).update(out["spatial"])
        return out["features"]

    fns = {"ours": lambda x: ours_fn(x, True), "ours_fid_only": lambda x: ours_fn(x, False),
           "torch_fidelity": ref_fn}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
        fn(x1[: min(batch, 8)])
    f1, s1 = timed_features(fns, x1, batch, "set 1 (ours + torch-fidelity)")
    f2, s2 = timed_features(fns, x2, batch, "set 2 (ours + torch-fidelity)")
    fid = {k: fid_from_features(f1[k].numpy(), f2[k].numpy()) for k in ("ours", "torch_fidelity")}
    rate = {k: 2 * n / (s1[k] + s2[k]) for k in fns}
    rel = max(((f1["ours"] - f1["torch_fidelity"]).abs().max() / f1["torch_fidelity"].abs().max()).item(),
              ((f2["ours"] - f2["torch_fidelity"]).abs().max() / f2["torch_fidelity"].abs().max()).item())
    return {"rate": rate, "fid": fid, "rel_feature_err": rel, "weights": "calibrated-random" if made else str(ours.weights_path),
            "sha256": ours.weights_sha256, "threads": torch.get_num_threads()}


def write_pngs(folder: Path, n: int) -> None:
    """n 64 px crops of the bundled photos as PNG files 000000.png ..."""
    from PIL import Image
    images, _ = bench_images(n)
    for i, x in enumerate(images):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def _timed(fn, split: dict, key: str):
    """`fn`, adding the seconds of each call to split[key]."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        split[key] += time.perf_counter() - t0
        return out
    return wrapper


def _pagoda_runs(folder: Path, cache_dir: Path, ours, tf_module, batch: int, secs: dict) -> tuple:
    """Our extraction of `folder`: without the cache (its read / network split kept), cold and warm; returns the
    first two runs' outputs."""
    from eval.cache import FeatureCache
    from eval.pipeline import extract
    from eval.sources import open_source

    split = {"read_decode": 0.0, "network": 0.0}

    def pagoda(cache):
        source = open_source(str(folder))
        source.load = _timed(source.load, split, "read_decode")
        t0 = time.perf_counter()
        out = extract(source, {"inception": ours}, batch=batch, cache=cache)["inception"]
        return time.perf_counter() - t0, out

    warm_up = bench_images(8, seed=2)[0]
    ours(warm_up), tf_module(warm_up)  # allocator and oneDNN primitive caches, for every tool alike
    call = type(ours).__call__  # a dunder call is looked up on the class: time it there, restore it after
    type(ours).__call__ = _timed(call, split, "network")
    try:
        secs["pagoda_no_cache"], plain = pagoda(None)
        secs["pagoda_split"] = dict(split)
        secs["pagoda_cold"], cold = pagoda(FeatureCache(cache_dir))
        secs["pagoda_warm"], warm = pagoda(FeatureCache(cache_dir))
    finally:
        type(ours).__call__ = call
    assert warm.extra["extracted"] == 0 and cold.extra["extracted"] == len(list(folder.iterdir()))
    return plain, cold


def _reference_runs(folder: Path, tmp: Path, weights: Path, tf_module, batch: int, n: int, secs: dict) -> None:
    """torch-fidelity's and clean-fid's end-to-end extraction of `folder`, timed into `secs`."""
    import cleanfid.fid
    import torch_fidelity

    safe = tmp / "torch-fidelity-inception.pth"  # torch-fidelity unpickles the path it is given: hand it a file
    torch.save(inception_state_dict(load_state_dict(weights)), safe)  # of tensors we loaded safely ourselves
    t0 = time.perf_counter()
    torch_fidelity.calculate_metrics(input1=str(folder), isc=True, cuda=False, batch_size=batch, cache=False,
                                     verbose=False, feature_extractor_weights_path=str(safe))
    secs["torch_fidelity"] = time.perf_counter() - t0

    def cleanfid_model(x):  # clean-fid hands float [B, 3, 299, 299] in 0..255 after its own resize
        return tf_module(x.round().clamp(0, 255).to(torch.uint8))[0]

    t0 = time.perf_counter()
    cf = cleanfid.fid.get_folder_features(str(folder), model=cleanfid_model, batch_size=batch,
                                          device=torch.device("cpu"), mode="clean", verbose=False)
    secs["clean_fid"] = time.perf_counter() - t0
    assert len(cf) == n


def run_folder(n: int, batch: int, weights_dir: str | None, threads: int | None) -> dict:
    """Seconds of each tool's end-to-end extraction of one folder of n PNGs (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    secs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "pngs"
        folder.mkdir()
        write_pngs(folder, n)
        made = weights_dir is None
        wdir = tmp if made else Path(weights_dir)
        if made:
            random_inception_weights(wdir, bench_images(32, seed=1)[1])
        weights = resolve_weights(INCEPTION, wdir)
        ours = InceptionExtractor(weights_dir=wdir)
        tf_module = torch_fidelity_inception(load_state_dict(weights), features=("2048", "logits_unbiased")).eval()
        plain, cold = _pagoda_runs(folder, tmp / "cache", ours, tf_module, batch, secs)
        _reference_runs(folder, tmp, weights, tf_module, batch, n, secs)
        same = np.allclose(plain.stats.mean(), cold.stats.mean(), rtol=1e-12)  # per batch vs per shard float64 sums
    return {"secs": secs, "same_stats": bool(same), "sha256": ours.weights_sha256, "threads": torch.get_num_threads(),
            "weights": "calibrated-random" if made else str(weights)}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m bench.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images per set; two sets are extracted (default 2000)")
    p.add_argument("--batch", type=int, default=100, help="images per forward pass (default 100)")
    p.add_argument("--weights-dir", default=None, help="folder with the Inception weights (default: calibrated random)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--folder", action="store_true", help="end to end from a folder of --images PNGs against "
                   "torch-fidelity and clean-fid, and the feature cache cold / warm (see above)")
    p.add_argument("-o", "--out", default="results/bench.jsonl", help="JSONL file the row is appended to")
    args = p.parse_args(argv)
    check_rows_output(args.out)
    if args.images < 2 or args.batch < 1:
        raise UserError(f"--images {args.images} --batch {args.batch}: need at least 2 images and 1 per batch")
    if args.folder:
        return folder_main(args)
    r = run(args.images, args.batch, args.weights_dir, args.threads)
    ratio = r["rate"]["ours"] / r["rate"]["torch_fidelity"]
    dfid = abs(r["fid"]["ours"] - r["fid"]["torch_fidelity"])
    row = make_row(model="inception", method="extract", metric="extract_speedup", value=ratio, num_samples=2 * args.images,
                   extractor="inception", extractor_sha256=r["sha256"], batch=args.batch, dtype="float32",
                   device=device_name(torch.device("cpu")),
                   extra={"img_per_s_ours": round(r["rate"]["ours"], 3),
                          "img_per_s_torch_fidelity": round(r["rate"]["torch_fidelity"], 3),
                          "img_per_s_ours_fid_only": round(r["rate"]["ours_fid_only"], 3),
                          "sfid_extra_cost": r["rate"]["ours_fid_only"] / r["rate"]["ours"] - 1, "sfid": True,
                          "fid_ours": r["fid"]["ours"], "fid_torch_fidelity": r["fid"]["torch_fidelity"],
                          "abs_delta_fid": dfid, "max_rel_feature_err": r["rel_feature_err"],
                          "weights": r["weights"], "threads": r["threads"], "images_per_set": args.images})
    append_rows(args.out, [row])
    print(f"ours {r['rate']['ours']:.2f} img/s (sFID on; FID alone {r['rate']['ours_fid_only']:.2f}, sFID costs "
          f"{100 * (r['rate']['ours_fid_only'] / r['rate']['ours'] - 1):+.1f}%), torch-fidelity "
          f"{r['rate']['torch_fidelity']:.2f} img/s, ratio {ratio:.2f}x; FID {r['fid']['ours']:.6f} vs {r['fid']['torch_fidelity']:.6f} "
          f"(|dFID| {dfid:.2e}); weights: {r['weights']} -> {args.out}")
    return 0


def folder_main(args) -> int:
    """--folder: one row per tool (img/s end to end), and the cache's warm / cold ratio."""
    r = run_folder(args.images, args.batch, args.weights_dir, args.threads)
    secs, n = r["secs"], args.images
    split = secs.pop("pagoda_split")
    common = dict(model="inception", method="extract-folder", num_samples=n, extractor="inception",
                  extractor_sha256=r["sha256"], batch=args.batch, dtype="float32", device=device_name(torch.device("cpu")))
    rows = [make_row(metric="extract_img_per_s", value=n / s, **common,
                     extra={"tool": tool, "seconds": round(s, 3), "threads": r["threads"], "weights": r["weights"],
                            "vs_torch_fidelity": secs["torch_fidelity"] / s, "vs_clean_fid": secs["clean_fid"] / s,
                            **({"read_decode_s": round(split["read_decode"], 3), "network_s": round(split["network"], 3)}
                               if tool == "pagoda_no_cache" else {})})
            for tool, s in secs.items()]
    rows.append(make_row(metric="rescore_speedup", value=secs["pagoda_cold"] / secs["pagoda_warm"], **common,
                         extra={"cold_s": round(secs["pagoda_cold"], 3), "warm_s": round(secs["pagoda_warm"], 3),
                                "same_stats": r["same_stats"]}))
    append_rows(args.out, rows)
    for tool, s in secs.items():
        print(f"{tool:>16}: {s:7.1f} s  {n / s:6.2f} img/s  (torch-fidelity / this {secs['torch_fidelity'] / s:.2f}x, "
              f"clean-fid / this {secs['clean_fid'] / s:.2f}x)")
    print(f"pagoda (no cache) split: read + decode {split['read_decode']:.1f} s, network + sums {split['network']:.1f} s; "
          f"re-score with a warm cache {secs['pagoda_cold'] / secs['pagoda_warm']:.0f}x faster than cold "
          f"({secs['pagoda_warm']:.2f} s vs {secs['pagoda_cold']:.1f} s); {r['threads']} threads -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
