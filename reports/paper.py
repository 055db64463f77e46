"""The published reference numbers (METHOD.md §3-§4) as result rows, to put beside ours.

All are class-conditional ImageNet, 50k samples, FID (and IS) by the ADM evaluator, without CFG. A value is
kept as the paper quotes it: `extra.digits` holds its decimals, and `extra.approx` marks a number read off
a figure or quoted as approximate (written ~x.xx in METHOD.md).
"""

from __future__ import annotations

SOURCES = {
    "pagoda": "Kim et al. 2024, PaGoDA (NeurIPS 2024, arXiv 2405.14822), ImageNet comparison table, "
              "without CFG",
    "edm": "Karras et al. 2022, EDM (NeurIPS 2022), ImageNet-64 result of the deterministic Heun sampler",
    "euler": "the EDM (Karras et al. 2022) ImageNet-64 teacher sampled with Euler (= DDIM): values as quoted "
             "in METHOD.md §3, which does not name the table they come from",
    "pd": "Salimans & Ho 2022, Progressive Distillation (ICLR 2022): the EDM sigma-space reimplementation as "
          "reported in the CTM (Kim et al. 2024, ICLR) and PaGoDA papers' ImageNet-64 tables",
    "ctm": "Kim et al. 2024, Consistency Trajectory Models (ICLR 2024), ImageNet-64 table",
    "cd": "Song et al. 2023, Consistency Models (ICML 2023), ImageNet-64 table, consistency distillation "
          "(LPIPS)",
    "dmd": "Yin et al. 2024, One-step Diffusion with Distribution Matching Distillation (CVPR 2024), "
           "ImageNet-64 table",
    "stylegan-xl": "Sauer et al. 2022, StyleGAN-XL (SIGGRAPH 2022): approximate values as quoted in "
                   "METHOD.md §4 (the PaGoDA paper's comparison across resolutions)",
}

# model, method, sampler, steps, nfe, source, metric, {resolution: value as quoted}
_TABLE = (
    ("PaGoDA", "pagoda", None, None, 1, "pagoda", "fid", {64: "1.21", 128: "1.48", 256: "1.56", 512: "1.80"}),
    ("PaGoDA", "pagoda", None, None, 1, "pagoda", "is", {256: "259.6"}),
    ("EDM teacher", "heun", "heun", 40, 79, "edm", "fid", {64: "2.44"}),
    ("EDM teacher", "ddim", "euler", 10, 10, "euler", "fid", {64: "16.7"}),
    ("EDM teacher", "ddim", "euler", 5, 5, "euler", "fid", {64: "43.8"}),
    ("EDM teacher", "ddim", "euler", 3, 3, "euler", "fid", {64: "83"}),
    ("PD (EDM teacher)", "pd", "euler", 1, 1, "pd", "fid", {64: "15.39"}),
    ("PD (EDM teacher)", "pd", "euler", 2, 2, "pd", "fid", {64: "8.95"}),
    ("CTM", "ctm", None, None, 1, "ctm", "fid", {64: "1.92"}),
    ("CTM", "ctm", None, 2, 2, "ctm", "fid", {64: "1.73"}),
    ("CD (LPIPS)", "cd", None, None, 1, "cd", "fid", {64: "6.20"}),
    ("CD (LPIPS)", "cd", None, 2, 2, "cd", "fid", {64: "4.70"}),
    ("DMD", "dmd", None, None, 1, "dmd", "fid", {64: "2.62"}),
    ("StyleGAN-XL", "gan", None, None, 1, "stylegan-xl", "fid",
     {64: "~1.51", 128: "~1.81", 256: "~2.30", 512: "~2.41"}),
)


def _row(model, method, sampler, steps, nfe, source, metric, resolution, quoted: str) -> dict:
    """One published row in the result-row schema, plus published=True and its `source`."""
    number = quoted.lstrip("~")
    extra = {"digits": len(number.partition(".")[2]), "dataset": "ImageNet"}
    if quoted.startswith("~"):
        extra["approx"] = True
    return dict(run="published", model=model, method=method, resolution=resolution, guidance=None,
                sampler=sampler, steps=steps, nfe=nfe, metric=metric, value=float(number), ci_low=None,
                ci_high=None, num_samples=50_000, reference="ImageNet training set (ADM evaluator)",
                extractor="inception (ADM evaluator)", time=None, extra=extra, published=True,
                source=SOURCES[source])


def paper_rows() -> list[dict]:
    """The published numbers as rows (a fresh list of fresh dicts on every call)."""
    return [_row(*spec[:7], resolution, quoted) for spec in _TABLE for resolution, quoted in spec[7].items()]
