"""FDr_k: the Frechet distance to the training set, in units of the validation set's own distance to it.

    FDr_k = (1/k) sum_e FD_e(generated, train) / FD_e(validation, train)

over k feature spaces e (arXiv 2604.28190, "FDr_k"; the paper averages Inception, ConvNeXt-v2, DINOv2, MAE,
SigLIP2 and CLIP). Real held-out images score 1 in every space; a model below 1 is closer to the training set
than unseen real images are, which a plain FD rewards (a model trained on the evaluator's features, or one that
memorises) and FDr exposes. The training statistics are the --train-ref of each space (default: the --ref, the
field's FID reference being the training set's); the validation statistics are a --val-ref built by eval.ref from
held-out images (photos:heldout on the bundled set, the ImageNet
validation set for ImageNet models). The spaces are the --fdr-extractors given, by default the extractors of the
--val-ref files (build them with inception, dinov2 and clip for ImageNet; the domain net on photos).

One row per cell: metric `fdr`, value FDr_k, extractor the spaces joined by "+", extra.fdr_spaces {space: ratio},
extra.fd_train {space: FD(generated, train)}, extra.fd_val {space: FD(validation, train)}, extra.val_reference
{space: name}, extra.val_reference_sha256 {space: SHA-256 of its statistics}.
"""

from __future__ import annotations

import hashlib

import numpy as np

from eval.metrics import frechet_distance
from pagoda.errors import UserError

FDR = "fdr"


def spaces_of(val_refs, names: list[str] | None) -> tuple[str, ...]:
    """The extractors FDr averages over: `names` as given, else those the --val-ref files were built with (in order).
    UserError when no validation reference is given, or one records no extractor (a file made outside pagoda)."""
    if not val_refs.paths:
        raise UserError("metric fdr needs validation statistics: pass --val-ref VAL.npz, built by python -m eval.ref "
                        "from held-out images (photos:heldout:RES, or the ImageNet validation set) with each "
                        "extractor FDr averages over")
    if names:
        return tuple(dict.fromkeys(names))
    made = [val_refs.prov[p].get("extractor") for p in val_refs.paths]
    if None in made:
        path = val_refs.paths[made.index(None)]
        raise UserError(f"--val-ref {path} does not say which extractor made it (not built by eval.ref): rebuild it "
                        "with python -m eval.ref, or name the spaces with --fdr-extractors")
    return tuple(dict.fromkeys(made))


def _pair(ex, resolution, refs, val_refs, est):
    """(train path, train Reference, val path, val Reference) of one space, each found as FID finds its --ref."""
    metric = "fd_dinov2" if ex.name.startswith("dinov2") else "fid"  # which statistics of an EDM2 pkl
    try:
        train = refs.find(ex, resolution, metric, est, what="fdr")
    except UserError as e:
        raise UserError(f"fdr, training statistics of space {ex.name}: {e}") from None
    try:
        val = val_refs.find(ex, resolution, metric, est, what="fdr")
    except UserError as e:
        raise UserError(f"fdr, validation statistics (--val-ref) of space {ex.name}: {e}") from None
    return (*train, *val)


def check_fdr(spaces, extractors: dict, resolution, refs, val_refs, est) -> None:
    """UserError, before any image is made, when a space lacks its training or validation statistics, or when the
    two are the same statistics (FD(validation, train) = 0: the ratio is undefined)."""
    for name in spaces:
        train_path, train, val_path, val = _pair(extractors[name], resolution, refs, val_refs, est)
        if refs.about(train_path, train)["reference_sha256"] == val_refs.about(val_path, val)["reference_sha256"]:
            given = "--train-ref" if refs.option == "--train-ref" else "--ref (the training statistics without " \
                "--train-ref)"
            raise UserError(f"fdr in space {name}: --val-ref {val_path} holds the same statistics as {given} "
                            f"{train_path}, so FD(validation, train) is 0: give the training images' statistics as "
                            "--train-ref and held-out images' (e.g. photos:heldout) as --val-ref")


def fdr_row(spaces, outs: dict, extractors: dict, resolution, refs, val_refs, est) -> tuple[float, dict, dict]:
    """(FDr_k, row fields, row extra) of one extraction `outs` (extractor name -> eval.pipeline.Extraction)."""
    ratios, fd_train, fd_val, val_name, val_sha, train_name, train_sha = {}, {}, {}, {}, {}, {}, {}
    for name in spaces:
        train_path, train, val_path, val = _pair(extractors[name], resolution, refs, val_refs, est)
        stats = outs[name].stats
        fd_train[name] = frechet_distance(stats.mean(), stats.cov(), train.mu, train.sigma)
        fd_val[name] = frechet_distance(val.mu, val.sigma, train.mu, train.sigma)
        ratios[name] = fd_train[name] / fd_val[name]
        train_name[name], train_sha[name] = refs.name(train_path), refs.about(train_path, train)["reference_sha256"]
        val_name[name], val_sha[name] = val_refs.name(val_path), val_refs.about(val_path, val)["reference_sha256"]
    one = len(spaces) == 1
    fields = dict(reference="+".join(dict.fromkeys(train_name.values())), extractor="+".join(spaces),
                  extractor_sha256=extractors[spaces[0]].weights_sha256 if one else None)
    extra = dict(fdr_spaces=ratios, fd_train=fd_train, fd_val=fd_val, val_reference=val_name,
                 val_reference_sha256=val_sha, resize="+".join(extractors[n].resize for n in spaces),
                 reference_sha256=train_sha[spaces[0]] if one else _digest(train_sha))
    return float(np.mean(list(ratios.values()))), fields, extra


def _digest(shas: dict) -> str:
    """One SHA-256 for the training statistics of several spaces: over `space=sha` lines, sorted."""
    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(shas.items())).encode()).hexdigest()
