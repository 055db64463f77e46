"""The field's published numbers as result rows, each with its protocol and its source, to put beside ours.

Class-conditional ImageNet, 50k samples unless a note says otherwise. Every row carries what its source states of
the protocol (pagoda.rows.PROTOCOL): the reference statistics, the feature space, the selection rule, how guidance
is paid for, pixel or latent space, and whether the model was trained on the evaluator's features. What a source
does not state is left unknown (None), never filled in. `extra.conf` grades the figure as ../shared/PUBLISHED.md
does: A = read in the authors' own repository or paper text (`A (transcript)`: in a machine-made transcript of
the paper's table), B = read in a later paper's table that cites it, C = unconfirmed (a secondary summary): a C row
is shown marked as such. A value is kept as its source writes it: `extra.digits` holds its decimals and
`extra.approx` marks a number quoted as approximate (~x.xx). Re-checked 2026-12-06 against the sources named.
"""

from __future__ import annotations

# Reference statistics by name (a row's `reference`; eval.catalog's names where pagoda can fetch them).
REFERENCES = {
    "imagenet64": "ADM reference batch VIRTUAL_imagenet64_labeled.npz (training set; ADM evaluator)",
    "imagenet256": "ADM reference batch VIRTUAL_imagenet256_labeled.npz (training set; ADM evaluator)",
    "edm-imagenet64": "EDM's imagenet-64x64.npz (training-set statistics)",
    "edm2-img64": "EDM2's dataset-refs img64.pkl (training-set statistics)",
    "edm2-img512": "EDM2's dataset-refs img512.pkl (training-set statistics: Inception and DINOv2)",
    "jax-imagenet256": "statistics computed with a JAX Inception on TPU (iMF / pMF repositories)",
    "jax-imagenet512": "statistics computed with a JAX Inception on TPU (pMF repository)",
    "shortcut-imagenet256": "the Shortcut repository's own imagenet256_fidstats_ours.npz",
}

SOURCES = {
    "sida": "Zhou et al. 2024, SiDA: mingyuanzhou/SiD, branch sida, README (SiDA table); arXiv 2410.14919",
    "sid": "Zhou et al. 2024, SiD: mingyuanzhou/SiD README; arXiv 2404.04057",
    "pagoda": "Kim et al. 2024, PaGoDA (arXiv 2405.14822): figure seen only in secondary summaries, the paper's "
              "table not re-read",
    "dmd2": "Yin et al. 2024, DMD2: tianweiy/DMD2 experiments/imagenet/README.md (model zoo); arXiv 2405.14867",
    "edm2": "Karras et al. 2024, EDM2: NVlabs/edm2 generate_images.py config_presets (the authors' comments per "
            "preset); arXiv 2312.02696",
    "autog": "Karras et al. 2024, autoguidance: NVlabs/edm2 generate_images.py config_presets; arXiv 2406.02507",
    "scm": "Lu & Song 2024, sCM (arXiv 2410.11081) Tables 1-2, read in a machine-made transcript of the tables",
    "scm-quoted": "as quoted in the table of Lu & Song 2024, sCM (arXiv 2410.11081)",
    "ctm": "Kim et al. 2024, CTM: sony/ctm README (ImageNet 64 FID 1.92); arXiv 2310.02279",
    "ict": "Song & Dhariwal 2023, iCT (arXiv 2310.14189) abstract",
    "cd": "Song et al. 2023, Consistency Models (arXiv 2303.01469) abstract",
    "pd": "Salimans & Ho 2022, progressive distillation on the EDM teacher, as quoted in the CTM and PaGoDA "
          "tables (not re-read)",
    "euler": "the EDM teacher (Karras et al. 2022) sampled with Euler: values as quoted in METHOD.md, which does "
             "not name their table (not re-read)",
    "dmd": "Yin et al. 2024, DMD (CVPR 2024): as quoted in METHOD.md (not re-read)",
    "stylegan-xl-64": "Sauer et al. 2022, StyleGAN-XL: approximate value as quoted in METHOD.md (not re-read)",
    "stylegan-xl": "Sauer et al. 2022, StyleGAN-XL: autonomousvision/stylegan-xl README, pretrained-models table",
    "fdloss": "2026, FD loss and FDr_k: Jiawei-Yang/FD-loss (eval_all_fds.py, scripts/README.md); arXiv "
              "2604.28190 abstract",
    "imf": "2025, iMF: Lyy-iiis/imeanflow README (original-paper column); arXiv 2512.02012",
    "pmf": "2026, pMF: Lyy-iiis/pMF README (paper column); arXiv 2601.22158",
    "meanflow": "Geng et al. 2025, MeanFlow (arXiv 2505.13447) abstract; 2 NFE as quoted in later tables",
    "imm": "Zhou et al. 2025, IMM (arXiv 2503.07565) abstract (8 x 2 NFE); 1 x 2 NFE as quoted in the alpha-Flow table",
    "shortcut": "Frans et al. 2024, shortcut models: kvfrans/shortcut-models README (sanity-check table)",
    "interval": "Kynkaanniemi et al. 2024, guidance interval (arXiv 2404.07724) abstract",
}

# model, method, space, resolution, nfe, guidance cost, metric, value as quoted, reference, selection,
# trained on the evaluator's features, conf, source, note. nfe counts network evaluations per sample (x2 with CFG).
_TABLE = (
    ("SiDA", "sida", "pixel", 64, 1, "none", "fid", "1.110", "edm-imagenet64", None, False, "A", "sida",
     "10 trials of 50k; which statistic is reported is not stated"),
    ("PaGoDA", "pagoda", "pixel", 64, 1, "none", "fid", "1.21", None, None, False, "C", "pagoda", ""),
    ("DMD2", "dmd2", "pixel", 64, 1, "none", "fid", "1.28", "edm-imagenet64", "best-checkpoint", False, "A", "dmd2",
     "resumed from the best checkpoint of a from-scratch run (1.51)"),
    ("EDM2-L", "edm2", "pixel", 64, 63, "none", "fid", "1.33", "edm2-img64", "min-of-3", False, "A", "edm2",
     "EMA length chosen per metric"),
    ("EDM2-XL", "edm2", "pixel", 64, 63, "none", "fid", "1.33", "edm2-img64", "min-of-3", False, "A", "edm2",
     "EMA length chosen per metric"),
    ("EDM2-S + autoguidance", "edm2", "pixel", 64, 126, "x2", "fid", "1.01", "edm2-img64", "min-of-3", False, "A",
     "autog", "guide = an early, smaller EDM2-XS"),
    ("EDM2-S + autoguidance", "edm2", "pixel", 64, 126, "x2", "fd_dinov2", "31.85", "edm2-img64", "min-of-3", False,
     "A", "autog", "another EMA length and guidance than its FID row"),
    ("SiD", "sid", "pixel", 64, 1, "none", "fid", "1.524", "edm-imagenet64", None, False, "A", "sid",
     "data-free; 10 trials of 50k"),
    ("sCT", "sct", "pixel", 64, 1, "none", "fid", "2.04", None, None, False, "A (transcript)", "scm", ""),
    ("sCT", "sct", "pixel", 64, 2, "none", "fid", "1.48", None, None, False, "A", "scm", "1.48 also in the abstract"),
    ("sCD", "scd", "pixel", 64, 1, "none", "fid", "2.44", None, None, False, "A (transcript)", "scm", ""),
    ("sCD", "scd", "pixel", 64, 2, "none", "fid", "1.66", None, None, False, "A (transcript)", "scm", ""),
    ("CTM", "ctm", "pixel", 64, 1, "none", "fid", "1.92", "imagenet64", None, False, "A", "ctm",
     "GAN loss on real data"),
    ("CTM", "ctm", "pixel", 64, 2, "none", "fid", "1.73", "imagenet64", None, False, "B", "scm-quoted", ""),
    ("ECT (ECM-XL)", "ect", "pixel", 64, 1, "none", "fid", "2.49", None, None, False, "B", "scm-quoted", ""),
    ("ECT (ECM-XL)", "ect", "pixel", 64, 2, "none", "fid", "1.67", None, None, False, "B", "scm-quoted", ""),
    ("EDM teacher", "heun", "pixel", 64, 79, "none", "fid", "2.44", "edm-imagenet64", None, False, "B", "scm-quoted",
     ""),
    ("iCT", "ict", "pixel", 64, 1, "none", "fid", "4.02", "imagenet64", None, False, "B", "scm-quoted", ""),
    ("iCT-deep", "ict", "pixel", 64, 1, "none", "fid", "3.25", "imagenet64", None, False, "A", "ict", ""),
    ("iCT-deep", "ict", "pixel", 64, 2, "none", "fid", "2.77", "imagenet64", None, False, "A", "ict", ""),
    ("CD (LPIPS)", "cd", "pixel", 64, 1, "none", "fid", "6.20", "imagenet64", None, False, "A", "cd", ""),
    ("CD (LPIPS)", "cd", "pixel", 64, 2, "none", "fid", "4.70", "imagenet64", None, False, "B", "scm-quoted", ""),
    ("PD (EDM teacher)", "pd", "pixel", 64, 1, "none", "fid", "15.39", None, None, False, "C", "pd", ""),
    ("PD (EDM teacher)", "pd", "pixel", 64, 2, "none", "fid", "8.95", None, None, False, "C", "pd", ""),
    ("EDM teacher", "ddim", "pixel", 64, 10, "none", "fid", "16.7", None, None, False, "C", "euler", ""),
    ("EDM teacher", "ddim", "pixel", 64, 5, "none", "fid", "43.8", None, None, False, "C", "euler", ""),
    ("EDM teacher", "ddim", "pixel", 64, 3, "none", "fid", "83", None, None, False, "C", "euler", ""),
    ("DMD", "dmd", "pixel", 64, 1, "none", "fid", "2.62", None, None, False, "C", "dmd", ""),
    ("StyleGAN-XL", "gan", "pixel", 64, 1, "none", "fid", "~1.51", None, None, False, "C", "stylegan-xl-64", ""),
    ("PaGoDA", "pagoda", "pixel", 128, 1, "none", "fid", "1.48", None, None, False, "C", "pagoda", ""),
    ("StyleGAN-XL", "gan", "pixel", 128, 1, "none", "fid", "1.77", None, None, False, "A", "stylegan-xl",
     "the released model; discriminator on ImageNet-trained features"),
    ("ImageNet validation images", "real", None, 256, None, "none", "fid", "1.68", "imagenet256", "single", False,
     "A", "fdloss", "real held-out images against the training statistics: the floor a model is compared to"),
    ("pMF-H/16 + FD loss (Inception)", "fd-loss", "pixel", 256, 1, "in-1", "fid", "0.72", None, None, True, "A",
     "fdloss", "trained on the evaluator's Inception features"),
    ("PaGoDA", "pagoda", "pixel", 256, 1, "none", "fid", "1.56", None, None, False, "C", "pagoda", ""),
    ("PaGoDA", "pagoda", "pixel", 256, 1, "none", "is", "259.6", None, None, False, "C", "pagoda", ""),
    ("iMF-XL/2", "imf", "latent", 256, 1, "in-1", "fid", "1.72", "jax-imagenet256", None, False, "A", "imf", ""),
    ("iMF-XL/2", "imf", "latent", 256, 2, "in-1", "fid", "1.54", "jax-imagenet256", None, False, "A", "imf", ""),
    ("pMF-H/16", "pmf", "pixel", 256, 1, "in-1", "fid", "2.22", "jax-imagenet256", None, False, "A", "pmf",
     "trained with LPIPS and ConvNeXt-classifier feature losses; guidance scale and interval tuned per model"),
    ("StyleGAN-XL", "gan", "pixel", 256, 1, "none", "fid", "2.26", None, None, False, "A", "stylegan-xl", ""),
    ("MeanFlow-XL/2", "meanflow", "latent", 256, 1, "in-1", "fid", "3.43", "imagenet256", None, False, "A",
     "meanflow", ""),
    ("MeanFlow-XL/2", "meanflow", "latent", 256, 2, "in-1", "fid", "2.93", "imagenet256", None, False, "B",
     "meanflow", ""),
    ("IMM-XL/2", "imm", "latent", 256, 2, "x2", "fid", "8.05", None, None, False, "B", "imm",
     "1 step; other tables quote 7.77 (another configuration?)"),
    ("IMM-XL/2", "imm", "latent", 256, 16, "x2", "fid", "1.99", None, None, False, "A", "imm", "8 steps"),
    ("Shortcut-XL/2", "shortcut", "latent", 256, 1, "in-1", "fid", "10.60", "shortcut-imagenet256", None, False,
     "A", "shortcut", "its in-code FID uses 4096 samples"),
    ("Shortcut-XL/2", "shortcut", "latent", 256, 4, "in-1", "fid", "7.80", "shortcut-imagenet256", None, False,
     "A", "shortcut", "its in-code FID uses 4096 samples"),
    ("EDM2-XXL + autoguidance", "edm2", "latent", 512, 126, "x2", "fid", "1.25", "edm2-img512", "min-of-3", False,
     "A", "autog", "guide = a small, under-trained EDM2-M"),
    ("EDM2-XXL + autoguidance", "edm2", "latent", 512, 126, "x2", "fd_dinov2", "24.18", "edm2-img512", "min-of-3",
     False, "A", "autog", "another EMA length and guidance than its FID row"),
    ("EDM2-S + autoguidance", "edm2", "latent", 512, 126, "x2", "fid", "1.34", "edm2-img512", "min-of-3", False,
     "A", "autog", ""),
    ("EDM2-S + autoguidance", "edm2", "latent", 512, 126, "x2", "fd_dinov2", "36.67", "edm2-img512", "min-of-3",
     False, "A", "autog", "another EMA length and guidance than its FID row"),
    ("SiDA (EDM2-XXL)", "sida", "latent", 512, 1, "none", "fid", "1.366", "edm2-img512", None, False, "A", "sida",
     "10 trials of 50k; which statistic is reported is not stated"),
    ("EDM2-XXL + guidance interval", "edm2", "latent", 512, 126, "x2", "fid", "1.40", None, None, False, "A",
     "interval", "guidance only inside a noise interval: fewer than 126 NFE in practice"),
    ("PaGoDA", "pagoda", "pixel", 512, 1, "none", "fid", "1.80", None, None, False, "C", "pagoda", ""),
    ("EDM2-XXL", "edm2", "latent", 512, 126, "x2", "fid", "1.81", "edm2-img512", "min-of-3", False, "A", "edm2",
     "CFG with an XS unconditional guide"),
    ("EDM2-XXL", "edm2", "latent", 512, 126, "x2", "fd_dinov2", "33.09", "edm2-img512", "min-of-3", False, "A",
     "edm2", "another EMA length and guidance than its FID row"),
    ("EDM2-XXL", "edm2", "latent", 512, 63, "none", "fid", "1.91", "edm2-img512", "min-of-3", False, "A", "edm2", ""),
    ("EDM2-XXL", "edm2", "latent", 512, 63, "none", "fd_dinov2", "42.84", "edm2-img512", "min-of-3", False, "A",
     "edm2", "another EMA length than its FID row"),
    ("EDM2-S", "edm2", "latent", 512, 126, "x2", "fid", "2.23", "edm2-img512", "min-of-3", False, "A", "edm2", ""),
    ("EDM2-S", "edm2", "latent", 512, 126, "x2", "fd_dinov2", "52.32", "edm2-img512", "min-of-3", False, "A", "edm2",
     "another EMA length and guidance than its FID row"),
    ("EDM2-S", "edm2", "latent", 512, 63, "none", "fid", "2.56", "edm2-img512", "min-of-3", False, "A", "edm2", ""),
    ("EDM2-S", "edm2", "latent", 512, 63, "none", "fd_dinov2", "68.64", "edm2-img512", "min-of-3", False, "A",
     "edm2", "another EMA length than its FID row"),
    ("sCD-XXL", "scd", "latent", 512, 1, "in-1", "fid", "2.28", None, None, False, "A (transcript)", "scm",
     "CFG distilled into the student (scale up to 2)"),
    ("sCD-XXL", "scd", "latent", 512, 2, "in-1", "fid", "1.88", None, None, False, "A", "scm",
     "CFG distilled into the student (scale up to 2); 1.88 also in the abstract"),
    ("pMF-H/32", "pmf", "pixel", 512, 1, "in-1", "fid", "2.48", "jax-imagenet512", None, False, "A", "pmf",
     "trained with LPIPS and ConvNeXt-classifier feature losses"),
    ("StyleGAN-XL", "gan", "pixel", 512, 1, "none", "fid", "2.42", None, None, False, "A", "stylegan-xl", ""),
)

# The feature network and image convention behind each published metric: the 2015 TF Inception (FID, IS) at its
# own resize; EDM2's DINOv2 ViT-L/14 at 224 px with its torch resize (METHOD.md section 5).
_EXTRACTOR = {"fid": ("inception", None), "is": ("inception", None), "fd_dinov2": ("dinov2", "edm2-torch")}


# The diffusion samplers behind the EDM teacher and PD rows: (sampler, steps from NFE) as our rows name them.
_SAMPLED = {"heun": ("heun", lambda nfe: (nfe + 1) // 2), "ddim": ("euler", lambda nfe: nfe),
            "pd": ("euler", lambda nfe: nfe)}


def _row(model, method, space, resolution, nfe, cost, metric, quoted, reference, selection, trained, conf, source,
         note) -> dict:
    """One published row in the result-row schema, plus published=True, its `source` and its protocol."""
    number = quoted.lstrip("~")
    extractor, resize = _EXTRACTOR[metric]
    extra = {"digits": len(number.partition(".")[2]), "dataset": "ImageNet", "conf": conf, "guidance_cost": cost,
             "trained_on_evaluator": trained}
    for key, value in (("space", space), ("selection", selection), ("resize", resize), ("note", note or None),
                       ("approx", True if quoted.startswith("~") else None)):
        if value is not None:
            extra[key] = value
    sampler, steps = _SAMPLED.get(method, (None, None))
    return dict(run="published", model=model, method=method, resolution=resolution, guidance=None, sampler=sampler,
                steps=None if steps is None else steps(nfe), nfe=nfe, metric=metric, value=float(number), ci_low=None, ci_high=None,
                num_samples=50_000, reference=reference, extractor=extractor, time=None, extra=extra, published=True,
                source=SOURCES[source])


def paper_rows() -> list[dict]:
    """The published numbers as rows (a fresh list of fresh dicts on every call)."""
    return [_row(*spec) for spec in _TABLE]


def published_key(row: dict) -> str:
    """How `python -m eval.diff` names a published row: model, resolution, NFE and metric, e.g. `DMD2@64/nfe1/fid`."""
    nfe = "" if row["nfe"] is None else f"/nfe{row['nfe']}"
    return f"{row['model'].replace(' ', '')}@{row['resolution']}{nfe}/{row['metric']}"
