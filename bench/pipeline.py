"""The demo's pipeline: its plans (sizes per preset) and its steps, each a list of typed tool commands.

`python -m bench.demo` runs it. The steps (README "What the demo shows"; `--dry-run` prints every command of each): the domain classifier,
the teacher, held-out references, plain and guided inversion pairs, G and the guided G, growth with its drift
and the no-L_rec ablation, progressive distillation, eval.run / bench.moves, bench.compare / bench.train_cost,
sample grids, reports.build, then the summary (reports.summary). The pipeline sits on the top floor
(ARCHITECTURE): it imports the tools it drives and builds each command against the tool's own parser
(bench.steps), each command its own process (the sample grids run in this one), each step resumable.

DESIGN: the demo's sizes (how many photos are inverted, how many steps each stage trains) are the Plan below,
chosen so that the photos pipeline takes about 25 minutes on a 2-core host (measured 23.8; hosts differ by up to
~1.8x); they make small, under-trained models, and the report says what it measured, not what the paper reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench.compare
import bench.moves
import bench.train_cost
import pagoda.__main__
import pagoda.networks.domain
import reports.build
from bench.steps import Command, Step, Tool
from eval import ref as eval_ref
from eval import run as eval_run
from pagoda.checkpoint import read_meta, write_atomic
from pagoda.config import get_preset
from pagoda.data import PhotosDataset, save_npz
from pagoda.errors import UserError
from pagoda.networks.domain import INPUT_RESOLUTION
from reports.summary import Facts


def _pagoda(sub: str) -> Tool:
    """`python -m pagoda SUB`, against SUB's own parser."""
    def parser() -> argparse.ArgumentParser:
        subs = next(a for a in pagoda.__main__.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return subs.choices[sub]
    return Tool("pagoda", sub, parser, pagoda.__main__.main)


DOMAIN = Tool("pagoda", "domain", pagoda.networks.domain.build_parser, pagoda.__main__.main)
TEACHER, PAIRS, DISTILL, GROW, PD, DRIFT, SAMPLE = (_pagoda(s) for s in ("teacher", "pairs", "distill", "grow", "pd",
                                                                           "drift", "sample"))
EVAL_REF = Tool(eval_ref.__name__, None, eval_ref.build_parser, eval_ref.main)
EVAL_RUN = Tool(eval_run.__name__, None, eval_run.build_parser, eval_run.main)
MOVES = Tool(bench.moves.__name__, None, bench.moves.build_parser, bench.moves.main)
COMPARE = Tool(bench.compare.__name__, None, bench.compare.build_parser, bench.compare.main)
TRAIN_COST = Tool(bench.train_cost.__name__, None, bench.train_cost.build_parser, bench.train_cost.main)
REPORT = Tool(reports.build.__name__, None, reports.build.build_parser, reports.build.main)


@dataclass(frozen=True)
class Plan:
    """The sizes of one demo pipeline (DESIGN: sized to the time budget on 2 CPU cores)."""

    preset: str
    budget_min: int  # the wall-clock budget on 2 CPU cores that the sizes are chosen for
    domain_epochs: int  # the domain classifier's passes (its own default is 4)
    teacher_set: tuple[str, ...]  # --set overrides of the teacher stage
    pairs_images: int  # training photos inverted (x2: each with its mirror)
    guided_images: int  # photos inverted with the CFG-guided teacher (w in guidance_range)
    guidance_range: str  # LO:HI of the guided pairs
    g_steps: int  # Stage 2b steps of the one-step G
    guided_steps: int  # Stage 2b steps of the guidance-conditioned G
    grow_steps: tuple[int, ...]  # Stage 3 steps per 2x stage (its length = the number of stages)
    pd_from: int  # the teacher's steps in the first PD round (halved down to 1); each round gets g_steps / rounds
    num_samples: int  # images per quality measurement
    teacher_cells: tuple[tuple[str, str], ...]  # (samplers, steps) sweeps of the teacher, comma lists
    guidance: str  # the CFG scales of the guidance curves (comma list)
    guidance_cell: tuple[str, int]  # the teacher sampler and steps of its guidance curve
    drift_seeds: int
    reps: int  # timed calls per cost setting
    train_cost_factors: str
    train_cost_time_up_to: int
    # --set overrides of the guided G, fine-tuned from G (--init): 10x G's lr for the trunk, the w-embedding's lr
    # kept at 200 x 1e-4, D's reals the w-guided teacher's samples (README "Stage 3": the guided G's ablations)
    guided_set: tuple[str, ...] = ("train.lr=1e-3", "guidance_lr_mult=20", "loss.adv_real=teacher")
    moves_seeds: int = 256  # seeds of bench.moves (the guided G's and the teacher's moves with w)
    grid_seeds: int = 64
    metrics: str = "fid,fdr,kid,is,pr"
    eval_batch: int = 250

    @property
    def pd_steps(self) -> int:
        """PD updates per round: G's updates spread over the rounds, so that PD-1 and G compare at one budget (the
        same total updates of the same batch; PD and G train with the preset's batch, 32 on photos)."""
        return self.g_steps // len(_halvings(self.pd_from))


PLANS = {
    "photos": Plan("photos", 25, 4, (), pairs_images=192, guided_images=64, guidance_range="1:3", g_steps=256,
                   guided_steps=300, grow_steps=(200, 16), pd_from=16, num_samples=500,
                   teacher_cells=(("euler,heun,dpmpp2m", "4,8"), ("euler", "1,2")), guidance="1,2,3",
                   guidance_cell=("euler", 4), drift_seeds=500, reps=30, train_cost_factors="1,2,4,8",
                   train_cost_time_up_to=32),
    "smoke": Plan("smoke", 3, 1, ("train.steps=200",), pairs_images=64, guided_images=32, guidance_range="1:3",
                  g_steps=40, guided_steps=20, grow_steps=(10,), pd_from=4, num_samples=500,
                  teacher_cells=(("euler,heun,dpmpp2m", "4"), ("euler", "1")), guidance="1,2",
                  guidance_cell=("euler", 4), drift_seeds=200, reps=30, train_cost_factors="1,2",
                  train_cost_time_up_to=8, grid_seeds=16),
}


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def _link(src: Path, dst: Path) -> None:
    """dst = the content of src (a hard link where possible): result rows name a model by its file's stem."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def subset_npz(out: Path, images: int, resolution: int) -> None:
    """`images` training photos at `resolution` px, evenly spaced over the set (all classes), as an ADM npz."""
    ds = PhotosDataset(resolution, split="train")  # images: uint8 N x 3 x H x W
    if images > len(ds.images):
        raise UserError(f"the demo asks for {images} photos but photos has {len(ds.images)}")
    idx = np.linspace(0, len(ds.images) - 1, images).round().astype(np.int64)
    x = ds.images[idx].permute(0, 2, 3, 1).numpy()
    save_npz(out, x, ds.labels[idx].numpy().astype(np.int64))


class Pipeline:
    """The steps of one plan under `out`, and the files they share."""

    def __init__(self, plan: Plan, out: Path, weights: Path):
        self.plan, self.out, self.weights = plan, out.resolve(), weights.resolve()
        self.preset = get_preset(plan.preset)
        self.base = self.preset.teacher.data.resolution
        self.resolutions = [self.base * 2 ** k for k in range(len(plan.grow_steps) + 1)]
        self.top = self.resolutions[-1]
        o = self.out
        self.teacher = o / "teacher" / "teacher.safetensors"
        self.models, self.results = o / "models", o / "results"
        self.data = o / "data" / f"photos-train-{self.top}px-{plan.pairs_images}.npz"
        self.data_guided = o / "data" / f"photos-train-{self.top}px-{plan.guided_images}.npz"
        self.refs = {r: o / "refs" / f"photos-heldout-{r}px-domain.npz" for r in self.resolutions}
        self.train_refs = {r: o / "refs" / f"photos-train-{r}px-domain.npz" for r in self.resolutions}  # FDr's
        self.domain = self.weights / "domain-photos.safetensors"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.safetensors"

    def steps(self) -> list[Step]:
        """Every step, in order; UserError when a tool's command line no longer takes what a step passes."""
        return [*self._data_steps(), *self._train_steps(), *self._eval_steps(), *self._bench_steps(),
                Step("report", "the report (tables, plots, sample grids)",
                     [REPORT.command(self.results, out=self.out / "report", title=f"PaGoDA demo ({self.plan.preset})")],
                     [self.out / "report" / "index.html"], self._row_files())]

    def _data_steps(self) -> list[Step]:
        p, o = self.plan, self.out
        steps = []
        if not self.domain.exists() or (o / ".steps" / "domain.json").exists():
            steps.append(Step("domain", "the domain classifier (offline feature network of every metric)",
                              [DOMAIN.command(out=self.domain, epochs=p.domain_epochs)], [self.domain]))
        steps.append(Step("teacher", f"Stage 1: the EDM teacher at {self.base} px",
                          [TEACHER.command(preset=p.preset, out=o / "teacher", set=list(p.teacher_set))],
                          [self.teacher, self.model("teacher")], fresh=[o / "teacher"],
                          after=lambda: _link(self.teacher, self.model("teacher"))))
        for r in self.resolutions:
            steps.append(Step(f"ref{r}", f"reference statistics of the held-out photos at {r} px (FD; FDr's "
                              "validation set)", [EVAL_REF.command(f"photos:heldout:{r}", extractor="domain",
                                                                   out=self.refs[r], weights_dir=self.weights,
                                                                   force=True)],
                              [self.refs[r]], [self.domain], fresh=[self.refs[r]]))
            steps.append(Step(f"train-ref{r}", f"statistics of the training photos at {r} px (FDr's training set)",
                              [EVAL_REF.command(f"photos:train:{r}", extractor="domain", out=self.train_refs[r],
                                                weights_dir=self.weights, store_features=0, force=True)],
                              [self.train_refs[r]], [self.domain], fresh=[self.train_refs[r]]))
        steps.append(Step("subset", f"{p.pairs_images} training photos at {self.top} px (Stage 2a/3 data)", [],
                          [self.data, self.data_guided],
                          after=lambda: (subset_npz(self.data, p.pairs_images, self.top),
                                         subset_npz(self.data_guided, p.guided_images, self.top))))
        pairs, gpairs = o / "pairs", o / "pairs-guided"
        steps.append(Step("pairs", f"Stage 2a: DDIM inversion of {p.pairs_images} photos and their mirrors",
                          [PAIRS.command(teacher=self.teacher, data=self.data, out=pairs)], [pairs / "index.json"],
                          [self.teacher, self.data], fresh=[pairs]))
        steps.append(Step("pairs-guided", f"Stage 2a: CFG-guided inversion (w in [{p.guidance_range}]) of "
                          f"{p.guided_images} photos", [PAIRS.command(teacher=self.teacher, data=self.data_guided,
                                                                      out=gpairs, guidance=p.guidance_range)],
                          [gpairs / "index.json"], [self.teacher, self.data_guided], fresh=[gpairs]))
        return steps

    def _train_steps(self) -> list[Step]:
        p, o, m = self.plan, self.out, self.model
        pairs, gpairs, g = o / "pairs", o / "pairs-guided", f"G{self.base}"
        steps = [self._train("g", f"Stage 2b: the one-step G at {self.base} px", DISTILL,
                             dict(teacher=self.teacher, pairs=pairs), p.g_steps, o / "g", g, [self.teacher, pairs]),
                 self._train("g-cfg", f"Stage 2b: the guidance-conditioned one-step G, fine-tuned from {g}", DISTILL,
                             dict(teacher=self.teacher, pairs=gpairs, init=m(g)), p.guided_steps, o / "g-cfg",
                             f"{g}-cfg", [self.teacher, gpairs, m(g)], p.guided_set)]
        src = g
        for k, n in enumerate(p.grow_steps, 1):
            r = self.base * 2 ** k
            steps.append(self._train(f"grow{r}", f"Stage 3: G grown to {r} px", GROW, dict(source=m(src), pairs=pairs),
                                     n, o / f"g{r}", f"G{r}", [m(src), pairs]))
            steps.append(self._drift(f"drift{r}", f"drift between G{r} and G{r // 2} (paper Fig. 3)", src, f"G{r}"))
            if k == 1:  # the ablation of paper Fig. 3: the same growth without L_rec drifts further
                steps.append(self._train(f"grow{r}-norec", f"Stage 3 ablation: G grown to {r} px without L_rec", GROW,
                                         dict(source=m(src), pairs=pairs), n, o / f"g{r}-norec", f"G{r}-norec",
                                         [m(src), pairs], ("loss.w_rec=0",)))
                steps.append(self._drift(f"drift{r}-norec", f"drift between G{r}-norec and G{r // 2}", src,
                                         f"G{r}-norec"))
            src = f"G{r}"
        names = [f"pd-{n}" for n in _halvings(p.pd_from)]
        steps.append(Step("pd", f"baseline: progressive distillation {p.pd_from} -> 1 steps",
                          [PD.command(preset=p.preset, teacher=self.teacher, out=o / "pd", set=[
                              f"from_steps={p.pd_from}", "to_steps=1", f"train.steps={p.pd_steps}"])],
                          [o / "pd" / n / f"{n}.safetensors" for n in names], [self.teacher], fresh=[o / "pd"],
                          after=lambda: [_link(o / "pd" / n / f"{n}.safetensors", m(n.upper())) for n in names]))
        return steps

    def _row_files(self) -> list[Path]:
        names = [f"quality-teacher{i or ''}" for i in range(len(self.plan.teacher_cells))] + \
            ["quality-onestep", "quality-guidance", "quality-validation", "cost", "train-cost", "samples"]
        return [self.results / f"{n}.jsonl" for n in names] + \
            [self.results / f"drift-{r}.jsonl" for r in self.resolutions[1:]] + \
            [self.results / f"drift-{self.resolutions[1]}-norec.jsonl"]

    def _train(self, name: str, title: str, tool: Tool, inputs: dict, steps: int, run_dir: Path, link_as: str,
               reads: list[Path], overrides: tuple[str, ...] = ()) -> Step:
        """A training stage into run_dir (its deliverable G.safetensors linked as models/LINK_AS.safetensors)."""
        made = run_dir / "G.safetensors"
        cmd = tool.command(preset=self.plan.preset, **inputs, set=[*overrides, f"train.steps={steps}"], out=run_dir)
        return Step(name, f"{title} ({steps} steps)", [cmd], [made, self.model(link_as)], reads, fresh=[run_dir],
                    after=lambda: _link(made, self.model(link_as)))

    def _drift(self, name: str, title: str, low: str, high: str) -> Step:
        """`pagoda drift` of the model named `high` against `low` (both in models/) over the plan's seeds."""
        m, out = self.model, self.results / f"drift-{high.removeprefix('G')}.jsonl"
        return Step(name, title, [DRIFT.command(low=m(low).name, high=m(high).name,
                                                seeds=f"0-{self.plan.drift_seeds - 1}", out=out)],
                    [out], [m(low), m(high)], fresh=[out], cwd=self.models)

    def _eval(self, name: str, title: str, ckpts: list[Path], out: Path, refs: list[int], **cell) -> Step:
        """eval.run of `ckpts` against the held-out photos (FD, KID, IS, P/R) and FDr against the training photos,
        in units of the held-out set's own FD to them."""
        p = self.plan
        fdr = self._fdr_refs(refs)
        cmd = EVAL_RUN.command(ckpt=[c.name for c in ckpts], ref=[self.refs[r] for r in refs], extractor="domain",
                               metrics=p.metrics, num_samples=p.num_samples, batch=p.eval_batch,
                               weights_dir=self.weights, allow_small=True,
                               estimator=f"kid_subset={min(1000, p.num_samples)}", **fdr, **cell, out=out)
        return Step(name, title, [cmd], [out], [*ckpts, *(self.refs[r] for r in refs), *fdr["train_ref"]],
                    fresh=[out], cwd=self.models)

    def _fdr_refs(self, refs: list[int]) -> dict:
        """eval.run's FDr references at the resolutions `refs`: training photos, held-out photos as validation."""
        return dict(train_ref=[self.train_refs[r] for r in refs], val_ref=[self.refs[r] for r in refs])

    def _validation(self) -> Step:
        """FDr of the held-out photos themselves, the validation line (= 1) of every table that shows FDr."""
        out = self.results / "quality-validation.jsonl"
        cmd = EVAL_RUN.command(images=[f"photos:heldout:{r}" for r in self.resolutions],
                               ref=[self.refs[r] for r in self.resolutions], extractor="domain", metrics="fdr",
                               batch=self.plan.eval_batch, weights_dir=self.weights, allow_small=True,
                               **self._fdr_refs(self.resolutions), out=out)
        return Step("eval-validation", "FDr of the held-out photos themselves (the validation line: 1)", [cmd], [out],
                    [*self.refs.values(), *self.train_refs.values()], fresh=[out])

    def _onestep(self, *, norec: bool) -> list[Path]:
        """G at every resolution (and the no-L_rec ablation), then the PD students PD-4, PD-2, PD-1 there are."""
        pd = [self.model(f"PD-{n}") for n in _halvings(self.plan.pd_from) if n in (1, 2, 4)]
        return [self.model(f"G{r}") for r in self.resolutions] + \
            ([self.model(f"G{self.resolutions[1]}-norec")] if norec else []) + pd

    def _eval_steps(self) -> list[Step]:
        p, m, res = self.plan, self.model, self.results
        g, t = f"G{self.base}", m("teacher")
        steps = [self._eval(f"eval-teacher{i}", f"quality: teacher, {samplers} x {nsteps} steps", [t],
                            res / f"quality-teacher{i or ''}.jsonl", [self.base], sampler=samplers, steps=nsteps,
                            guidance="1")
                 for i, (samplers, nsteps) in enumerate(p.teacher_cells)]
        steps.append(self._eval("eval-onestep", "quality: G per resolution (and without L_rec), PD-N",
                                self._onestep(norec=True), res / "quality-onestep.jsonl", self.resolutions,
                                guidance="1"))
        sampler, nsteps = p.guidance_cell
        steps.append(self._eval("eval-guidance", f"quality vs CFG scale w = {p.guidance}: teacher {sampler}-{nsteps}, "
                                "guided G", [t, m(f"{g}-cfg")], res / "quality-guidance.jsonl", [self.base],
                                guidance=p.guidance, sampler=sampler, steps=nsteps))
        steps.append(self._validation())
        out, ws = res / "moves.jsonl", ",".join(w for w in p.guidance.split(",") if float(w) != 1)
        steps.append(Step("moves", f"guidance moves: G(w) - G(1) against the teacher's {sampler}-{nsteps} at w = {ws}",
                          [MOVES.command(m(f"{g}-cfg").name, teacher=t.name, sampler=sampler, steps=nsteps, w=ws,
                                         seeds=f"0-{p.moves_seeds - 1}", out=out)],
                          [out], [t, m(f"{g}-cfg")], fresh=[out], cwd=self.models))
        return steps

    def _bench_steps(self) -> list[Step]:
        p, m, res = self.plan, self.model, self.results
        cost, tc, grids = res / "cost.jsonl", res / "train-cost.jsonl", self.out / "samples"
        onestep = self._onestep(norec=False)
        samplers = ",".join(sorted({s for c in p.teacher_cells for s in c[0].split(",")}))
        nsteps = ",".join(sorted({s for c in p.teacher_cells for s in c[1].split(",")}, key=int))
        common = dict(reps=p.reps, device="cpu", out=cost)
        models = [m("teacher"), *onestep, m(f"G{self.base}-cfg")]
        return [Step("cost", "cost: NFE, latency, img/s, memory, FLOPs of every model",
                     [COMPARE.command(ckpt=[c.name for c in onestep], batch=[1, 16], **common),
                      COMPARE.command(ckpt=[m("teacher").name], sampler=samplers, steps=nsteps, guidance="1", batch=[1],
                                      **common)], [cost], onestep, fresh=[cost], cwd=self.models),
                Step("train-cost", f"training cost: teacher step at {p.train_cost_factors.replace(',', ', ')}x the "
                     "resolution, pairs vs teacher run",
                     [TRAIN_COST.command(preset=p.preset, factors=p.train_cost_factors,
                                         time_up_to=p.train_cost_time_up_to, reps=5, num_images=p.pairs_images, out=tc)],
                     [tc], [], fresh=[tc]),
                Step("samples", "sample grids of every model", [self._grid(c, grids) for c in models],
                     [res / "samples.jsonl"], models, fresh=[grids, res / "samples.jsonl"],
                     after=lambda: self._grid_rows(models, grids))]

    def _grid(self, ckpt: Path, folder: Path) -> Command:
        """`pagoda sample` of one model's grid (seeds 0..grid_seeds-1; a teacher with Heun-8), in this process."""
        teacher = ckpt == self.model("teacher")
        return SAMPLE.command(ckpt=ckpt, seeds=f"0-{self.plan.grid_seeds - 1}", out=folder / f"{ckpt.stem}.png",
                              device="cpu", **(dict(sampler="heun", steps=8) if teacher else {}), in_process=True)

    def _grid_rows(self, models: list[Path], folder: Path) -> None:
        """One row per grid, naming its PNG for the report."""
        rows, seeds = [], f"0-{self.plan.grid_seeds - 1}"
        for ckpt in models:
            meta = read_meta(ckpt)
            teacher = meta.get("kind") == "teacher"  # sampled with Heun-8; a G or PD student with its own steps
            rows.append({"model": ckpt.name, "method": "heun" if teacher else meta.get("kind"),
                         "resolution": meta.get("resolution"), "sampler": "heun" if teacher else None,
                         "steps": 8 if teacher else None, "metric": "sample_grid", "value": self.plan.grid_seeds,
                         "num_samples": self.plan.grid_seeds, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "extra": {"samples_png": os.path.relpath(folder / f"{ckpt.stem}.png", self.results),
                                   "seeds": seeds}})
        write_atomic(self.results / "samples.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def env(self) -> dict:
        """The steps' environment: the weights folder, and this checkout importable from any working folder."""
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PAGODA_WEIGHTS": str(self.weights), "PYTHONPATH": path}

    def facts(self) -> Facts:
        """What the summary needs to know of the plan (reports.summary reads the rest from the rows)."""
        p = self.plan
        return Facts(base=self.base, resolutions=tuple(self.resolutions), g_steps=p.g_steps, g_batch=self.preset.distill.train.batch,
                     pd_rounds=len(_halvings(p.pd_from)), pd_steps=p.pd_steps, pd_batch=self.preset.pd.train.batch,
                     pairs_items=2 * p.pairs_images, guided_steps=p.guided_steps, guidance=p.guidance,
                     guidance_cell=p.guidance_cell, moves_seeds=p.moves_seeds, domain_resolution=INPUT_RESOLUTION)
