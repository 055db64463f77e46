"""`python -m pagoda demo`: the whole story on the bundled photographs, one command, resumable.

    python -m pagoda demo --preset photos            # ~25 min on 2 CPU cores -> runs/demo/report/index.html
    python -m pagoda demo --preset smoke --out runs/smoke   # the same pipeline in miniature (CI, < 6 min)

Steps (each one process; `--dry-run` prints their commands):

 1. the domain classifier (the offline feature network of every metric) unless the weights folder has one;
 2. Stage 1: the EDM teacher at the base resolution (16 px; smoke 8 px) on the preset's data;
 3. reference statistics of the held-out photos at each resolution (`eval.ref`);
 4. Stage 2a: DDIM-inversion pairs of a subset of the training photos (kept at 4x the base resolution as an
    npz, so Stage 3 has the high-resolution crops of the same images), plain and CFG-guided (w in [1, 3]);
 5. Stage 2b: the one-step G, and the guidance-conditioned one-step G (its D judging the teacher's w-guided
    samples as real, loss.adv_real=teacher);
 6. Stage 3: G grown 2x per stage (16 -> 32 -> 64; smoke 8 -> 16) and the drift between stages; the first
    growth again without L_rec (paper Fig. 3's ablation: it drifts further);
 7. the progressive-distillation baseline (16 -> 1 steps; smoke 4 -> 1);
 8. `eval.run`: every model against the held-out references (FD, KID, IS, precision / recall on the domain
    features): the teacher with Euler / Heun / DPM-Solver++ at few and more steps, G per resolution, PD-N,
    the guidance curves of the teacher (CFG) and of the guided G, and `bench.moves` (how far and which way w
    moves the guided G's samples against the teacher's CFG);
 9. `bench.compare` (NFE, latency, img/s, memory, FLOPs) and `bench.train_cost`; sample grids;
10. `reports.build` -> OUT/report/index.html, then a summary of the claims, each with its budget.

pagoda never imports eval, bench or reports (ARCHITECTURE): those steps run as `python -m` subprocesses. A
step is skipped when its stamp (OUT/.steps/NAME.json: the command and the SHA-256 of its inputs) matches and
its outputs exist; a step whose inputs changed starts afresh; an interrupted training step resumes from its
run directory (the stages' own resume). Each step's output goes to OUT/logs/NAME.log.

DESIGN: the demo's sizes (how many photos are inverted, how many steps each stage trains) are the Plan below,
chosen so that the photos pipeline takes about 25 minutes on a 2-core host (measured 23.8; hosts differ by up to
~1.8x); they make small, under-trained models, and
the report says what it measured, not what the paper reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagoda.errors import ArgumentParser, UserError, check_output

STAMP_FORMAT = "pagoda-demo-step-1"


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
    metrics: str = "fid,kid,is,pr"
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


@dataclass
class Step:
    """One process of the pipeline: `argv` after `python -m`, what it writes and what it reads."""

    name: str
    title: str
    argv: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    fresh: list[Path] = field(default_factory=list)  # removed before a (re)run whose inputs changed
    after: object = None  # a callable run in this process after the command (writes extra files)
    cwd: Path | None = None  # where the command runs (the models folder: rows name a model by the path given)


def _sha256_of(path: Path) -> str:
    """SHA-256 of a file, of a folder's index.json (pairs), or 'absent'."""
    from pagoda.weights import sha256_file
    if path.is_dir():
        path = path / "index.json"
    return sha256_file(path) if path.is_file() else "absent"


def _stamp(step: Step) -> dict:
    return {"format": STAMP_FORMAT, "argv": step.argv, "inputs": {str(p): _sha256_of(p) for p in step.inputs}}


def up_to_date(step: Step, stamp_file: Path) -> bool:
    """The step ran to the end with this command and these inputs, and its outputs are still there."""
    try:
        old = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return False
    return old == _stamp(step) and all(p.exists() for p in step.outputs)


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
    import numpy as np

    from pagoda.data import PhotosDataset, save_npz
    ds = PhotosDataset(resolution, split="train")  # images: uint8 N x 3 x H x W
    if images > len(ds.images):
        raise UserError(f"the demo asks for {images} photos but photos has {len(ds.images)}")
    idx = np.linspace(0, len(ds.images) - 1, images).round().astype(np.int64)
    x = ds.images[idx].permute(0, 2, 3, 1).numpy()
    save_npz(out, x, ds.labels[idx].numpy().astype(np.int64))


class Pipeline:
    """The steps of one plan under `out`, and the files they share."""

    def __init__(self, plan: Plan, out: Path, weights: Path):
        from pagoda.config import get_preset
        self.plan, self.out, self.weights = plan, out.resolve(), weights.resolve()
        preset = get_preset(plan.preset)
        self.base = preset.teacher.data.resolution
        self.resolutions = [self.base * 2 ** k for k in range(len(plan.grow_steps) + 1)]
        self.top = self.resolutions[-1]
        o = self.out
        self.teacher = o / "teacher" / "teacher.safetensors"
        self.models = o / "models"
        self.results = o / "results"
        self.data = o / "data" / f"photos-train-{self.top}px-{plan.pairs_images}.npz"
        self.data_guided = o / "data" / f"photos-train-{self.top}px-{plan.guided_images}.npz"
        self.refs = {r: o / "refs" / f"photos-heldout-{r}px-domain.npz" for r in self.resolutions}
        self.domain = self.weights / "domain-photos.safetensors"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.safetensors"

    def steps(self) -> list[Step]:
        p, o, base = self.plan, self.out, self.base
        m, res = self.model, self.results
        steps = []
        if not self.domain.exists() or (o / ".steps" / "domain.json").exists():
            steps.append(Step("domain", "the domain classifier (offline feature network of every metric)",
                              ["pagoda", "domain", "-o", str(self.domain), "--epochs", str(p.domain_epochs)],
                              [self.domain]))
        steps.append(Step("teacher", f"Stage 1: the EDM teacher at {base} px",
                          ["pagoda", "teacher", "--preset", p.preset, "--out", str(o / "teacher"),
                           *sum((["--set", s] for s in p.teacher_set), [])],
                          [self.teacher, m("teacher")], fresh=[o / "teacher"],
                          after=lambda: _link(self.teacher, m("teacher"))))
        for r in self.resolutions:
            steps.append(Step(f"ref{r}", f"reference statistics of the held-out photos at {r} px",
                              ["eval.ref", f"photos:heldout:{r}", "--extractor", "domain", "-o", str(self.refs[r]),
                               "--weights-dir", str(self.weights), "--force"],
                              [self.refs[r]], [self.domain], fresh=[self.refs[r]]))
        steps.append(Step("subset", f"{p.pairs_images} training photos at {self.top} px (Stage 2a/3 data)", [],
                          [self.data, self.data_guided],
                          after=lambda: (subset_npz(self.data, p.pairs_images, self.top),
                                         subset_npz(self.data_guided, p.guided_images, self.top))))
        pairs, gpairs = o / "pairs", o / "pairs-guided"
        steps.append(Step("pairs", f"Stage 2a: DDIM inversion of {p.pairs_images} photos and their mirrors",
                          ["pagoda", "pairs", "--teacher", str(self.teacher), "--data", str(self.data),
                           "-o", str(pairs)], [pairs / "index.json"], [self.teacher, self.data], fresh=[pairs]))
        steps.append(Step("pairs-guided", f"Stage 2a: CFG-guided inversion (w in [{p.guidance_range}]) of "
                          f"{p.guided_images} photos", ["pagoda", "pairs", "--teacher", str(self.teacher), "--data",
                                                        str(self.data_guided), "-o", str(gpairs), "--guidance",
                                                        p.guidance_range],
                          [gpairs / "index.json"], [self.teacher, self.data_guided], fresh=[gpairs]))
        g = f"G{base}"
        steps.append(self._train("g", f"Stage 2b: the one-step G at {base} px", "distill",
                                 ["--teacher", str(self.teacher), "--pairs", str(pairs)], p.g_steps, o / "g",
                                 "G", g, [self.teacher, pairs]))
        steps.append(self._train("g-cfg", f"Stage 2b: the guidance-conditioned one-step G, fine-tuned from {g}",
                                 "distill", ["--teacher", str(self.teacher), "--pairs", str(gpairs), "--init",
                                             str(self.model(g)), *sum((["--set", v] for v in p.guided_set), [])],
                                 p.guided_steps,
                                 o / "g-cfg", "G", f"{g}-cfg", [self.teacher, gpairs, self.model(g)]))
        src = g
        for k, n in enumerate(p.grow_steps, 1):
            r = base * 2 ** k
            steps.append(self._train(f"grow{r}", f"Stage 3: G grown to {r} px", "grow",
                                     ["--from", str(m(src)), "--pairs", str(pairs)], n, o / f"g{r}", "G",
                                     f"G{r}", [m(src), pairs]))
            steps.append(self._drift(f"drift{r}", f"drift between G{r} and G{r // 2} (paper Fig. 3)", src, f"G{r}",
                                     res / f"drift-{r}.jsonl"))
            if k == 1:  # the ablation of paper Fig. 3: the same growth without L_rec drifts further
                steps.append(self._train(f"grow{r}-norec", f"Stage 3 ablation: G grown to {r} px without L_rec",
                                         "grow", ["--from", str(m(src)), "--pairs", str(pairs), "--set",
                                                  "loss.w_rec=0"], n, o / f"g{r}-norec", "G", f"G{r}-norec",
                                         [m(src), pairs]))
                steps.append(self._drift(f"drift{r}-norec", f"drift between G{r}-norec and G{r // 2}", src,
                                         f"G{r}-norec", res / f"drift-{r}-norec.jsonl"))
            src = f"G{r}"
        pd_names = [f"pd-{n}" for n in _halvings(p.pd_from)]
        steps.append(Step("pd", f"baseline: progressive distillation {p.pd_from} -> 1 steps",
                          ["pagoda", "pd", "--preset", p.preset, "--teacher", str(self.teacher), "--out",
                           str(o / "pd"), "--set", f"from_steps={p.pd_from}", "--set", "to_steps=1",
                           "--set", f"train.steps={p.pd_steps}"],
                          [o / "pd" / n / f"{n}.safetensors" for n in pd_names], [self.teacher], fresh=[o / "pd"],
                          after=lambda: [_link(o / "pd" / n / f"{n}.safetensors", m(n.upper())) for n in pd_names]))
        pd_models = [m(n.upper()) for n in pd_names if n in ("pd-1", "pd-2", "pd-4")]
        steps += self._eval_steps(g, pd_models)
        steps += self._bench_steps(g, pd_models)
        steps.append(Step("report", "the report (tables, plots, sample grids)",
                          ["reports.build", str(res), "-o", str(o / "report"), "--title",
                           f"PaGoDA demo ({p.preset})"], [o / "report" / "index.html"],
                          self._row_files()))
        return steps

    def _row_files(self) -> list[Path]:
        names = [f"quality-teacher{i or ''}" for i in range(len(self.plan.teacher_cells))] + \
            ["quality-onestep", "quality-guidance", "cost", "train-cost", "samples"]
        return [self.results / f"{n}.jsonl" for n in names] + \
            [self.results / f"drift-{r}.jsonl" for r in self.resolutions[1:]] + \
            [self.results / f"drift-{self.resolutions[1]}-norec.jsonl"]

    def _train(self, name, title, stage, inputs, steps, run_dir, made, link_as, reads) -> Step:
        made_path = run_dir / f"{made}.safetensors"
        return Step(name, f"{title} ({steps} steps)",
                    ["pagoda", stage, "--preset", self.plan.preset, *inputs, "--out", str(run_dir),
                     "--set", f"train.steps={steps}"],
                    [made_path, self.model(link_as)], reads, fresh=[run_dir],
                    after=lambda: _link(made_path, self.model(link_as)))

    def _drift(self, name, title, low: str, high: str, out: Path) -> Step:
        """`pagoda drift` of the model named `high` against `low` (both in models/) over the plan's seeds."""
        m = self.model
        return Step(name, title, ["pagoda", "drift", "--low", m(low).name, "--high", m(high).name, "--seeds",
                                  f"0-{self.plan.drift_seeds - 1}", "--out", str(out)], [out], [m(low), m(high)],
                    fresh=[out], cwd=self.models)

    def _eval(self, name, title, ckpts, out, extra, refs) -> Step:
        p = self.plan
        argv = ["eval.run", *sum((["--ckpt", c.name] for c in ckpts), []),
                *sum((["--ref", str(self.refs[r])] for r in refs), []), "--extractor", "domain",
                "--metrics", p.metrics, "--num-samples", str(p.num_samples), "--batch", str(p.eval_batch),
                "--weights-dir", str(self.weights), "--allow-small", "--estimator",
                f"kid_subset={min(1000, p.num_samples)}", *extra, "-o", str(out)]
        return Step(name, title, argv, [out], [*ckpts, *(self.refs[r] for r in refs)], fresh=[out], cwd=self.models)

    def _eval_steps(self, g: str, pd_models: list[Path]) -> list[Step]:
        p, m, res = self.plan, self.model, self.results
        steps, t = [], m("teacher")
        for i, (samplers, nsteps) in enumerate(p.teacher_cells):
            steps.append(self._eval(f"eval-teacher{i}", f"quality: teacher, {samplers} x {nsteps} steps", [t],
                                    res / f"quality-teacher{i or ''}.jsonl",
                                    ["--sampler", samplers, "--steps", nsteps, "--guidance", "1"], [self.base]))
        onestep = [m(g), *(m(f"G{r}") for r in self.resolutions[1:]), m(f"G{self.resolutions[1]}-norec"),
                   *pd_models]
        steps.append(self._eval("eval-onestep", "quality: G per resolution (and without L_rec), PD-N", onestep,
                                res / "quality-onestep.jsonl", ["--guidance", "1"], self.resolutions))
        sampler, nsteps = p.guidance_cell
        steps.append(self._eval("eval-guidance", f"quality vs CFG scale w = {p.guidance}: teacher "
                                f"{sampler}-{nsteps}, guided G", [t, m(f"{g}-cfg")], res / "quality-guidance.jsonl",
                                ["--guidance", p.guidance, "--sampler", sampler, "--steps", str(nsteps)],
                                [self.base]))
        out, ws = res / "moves.jsonl", ",".join(w for w in p.guidance.split(",") if float(w) != 1)
        steps.append(Step("moves", f"guidance moves: G(w) - G(1) against the teacher's {sampler}-{nsteps} at w = "
                          f"{ws}", ["bench.moves", m(f"{g}-cfg").name, "--teacher", t.name, "--sampler", sampler,
                                    "--steps", str(nsteps), "--w", ws, "--seeds", f"0-{p.moves_seeds - 1}", "-o",
                                    str(out)], [out], [t, m(f"{g}-cfg")], fresh=[out], cwd=self.models))
        return steps

    def _bench_steps(self, g: str, pd_models: list[Path]) -> list[Step]:
        p, m, res, o = self.plan, self.model, self.results, self.out
        cost, tc = res / "cost.jsonl", res / "train-cost.jsonl"
        onestep = [m(g), *(m(f"G{r}") for r in self.resolutions[1:]), *pd_models]
        samplers = ",".join(sorted({s for c in p.teacher_cells for s in c[0].split(",")}))
        nsteps = ",".join(sorted({s for c in p.teacher_cells for s in c[1].split(",")}, key=int))
        common = ["--reps", str(p.reps), "--device", "cpu", "-o", str(cost)]
        steps = [Step("cost", "cost: NFE, latency, img/s, memory, FLOPs of every model",
                      ["bench.compare", *sum((["--ckpt", c.name] for c in onestep), []), "--batch", "1,16", *common],
                      [cost], onestep, fresh=[cost], cwd=self.models,
                      after=lambda: self._run_more(["bench.compare", "--ckpt", m("teacher").name, "--sampler",
                                                    samplers, "--steps", nsteps, "--guidance", "1", "--batch", "1",
                                                    *common], "cost"))]
        steps.append(Step("train-cost", f"training cost: teacher step at {p.train_cost_factors.replace(',', ', ')}x "
                          "the resolution, pairs vs teacher run",
                          ["bench.train_cost", "--preset", p.preset, "--factors", p.train_cost_factors,
                           "--time-up-to", str(p.train_cost_time_up_to), "--reps", "5", "--num-images",
                           str(p.pairs_images), "-o", str(tc)], [tc], [], fresh=[tc]))
        grids = o / "samples"
        models = [m("teacher"), *onestep, m(f"{g}-cfg")]
        steps.append(Step("samples", "sample grids of every model", [], [res / "samples.jsonl"],
                          models, fresh=[grids, res / "samples.jsonl"],
                          after=lambda: self._grids(models, grids)))
        return steps

    def _run_more(self, argv: list[str], name: str) -> None:
        """A second command of a step (same log)."""
        run_logged(argv, self.out / "logs" / f"{name}.log", self.env(), append=True, cwd=self.models)

    def _grids(self, models, folder: Path) -> None:
        """One PNG grid per model (`pagoda sample` in this process, seeds 0..grid_seeds-1) and a row naming it for
        the report."""
        import contextlib

        from pagoda.__main__ import main as pagoda_main
        from pagoda.checkpoint import read_meta, write_atomic
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        log = self.out / "logs" / "samples.log"
        seeds = f"0-{self.plan.grid_seeds - 1}"
        for ckpt in models:
            png = folder / f"{ckpt.stem}.png"
            meta = read_meta(ckpt)
            teacher = meta.get("kind") == "teacher"  # sampled with Heun-8; a G or PD student with its own steps
            argv = ["sample", "--ckpt", str(ckpt), "--seeds", seeds, "-o", str(png), "--device", "cpu"]
            with open(log, "a") as f, contextlib.redirect_stdout(f):
                pagoda_main(argv + (["--sampler", "heun", "--steps", "8"] if teacher else []))
            rows.append({"model": ckpt.name, "method": "heun" if teacher else meta.get("kind"),
                         "resolution": meta.get("resolution"), "sampler": "heun" if teacher else None,
                         "steps": 8 if teacher else None, "metric": "sample_grid", "value": self.plan.grid_seeds,
                         "num_samples": self.plan.grid_seeds, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "extra": {"samples_png": os.path.relpath(png, self.results), "seeds": seeds}})
        write_atomic(self.results / "samples.jsonl",
                     lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def env(self) -> dict:
        """The steps' environment: the weights folder, and this checkout importable from any working folder."""
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PAGODA_WEIGHTS": str(self.weights), "PYTHONPATH": path}


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


def run_logged(argv: list[str], log: Path, env: dict, *, append: bool = False, cwd: Path | None = None) -> None:
    """Run `python -m argv...` with its output in `log`; UserError (exit 2 passes through) on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w") as f:
        f.write(f"$ python -m {' '.join(argv)}\n")
        f.flush()
        code = subprocess.call([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["?"]
        raise StepFailed(code, f"`python -m {' '.join(argv[:2])} ...` exited {code}: {tail[0].strip()} "
                               f"(full output: {log})")


class StepFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def run(pipeline: Pipeline, *, only: set[str] | None = None) -> list[tuple[str, str, float]]:
    """Run every step that is not up to date; returns (name, 'ran' | 'up to date', seconds) per step."""
    steps = pipeline.steps()
    stamps = pipeline.out / ".steps"
    stamps.mkdir(parents=True, exist_ok=True)
    done = []
    t_all = time.perf_counter()
    for i, step in enumerate(steps, 1):
        head = f"[{i:2d}/{len(steps)}] {step.name}: {step.title}"
        stamp_file = stamps / f"{step.name}.json"
        if only is not None and step.name not in only:
            print(f"{head} ... left as it is (--only)", flush=True)
            done.append((step.name, "left", 0.0))
            continue
        if only is None and up_to_date(step, stamp_file):
            print(f"{head} ... up to date", flush=True)
            done.append((step.name, "up to date", 0.0))
            continue
        print(f"{head} ...", end="", flush=True)
        t0 = time.perf_counter()
        if stamp_file.exists():  # it ran before (other inputs, another command, or --only): start afresh
            for p in step.fresh:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        stamp_file.unlink(missing_ok=True)
        pipeline.results.mkdir(parents=True, exist_ok=True)
        if step.argv:
            run_logged(step.argv, pipeline.out / "logs" / f"{step.name}.log", pipeline.env(), cwd=step.cwd)
        if step.after is not None:
            step.after()
        stamp_file.write_text(json.dumps(_stamp(step), indent=1))
        dt = time.perf_counter() - t0
        print(f" done in {dt:.0f} s (total {(time.perf_counter() - t_all) / 60:.1f} min)", flush=True)
        done.append((step.name, "ran", dt))
    return done


# ---------------------------------------------------------------------------------------------
# The summary.

def _rows(folder: Path) -> list[dict]:
    """Every row under `folder`, the model named by its file's stem (the rows name it `G16.safetensors`)."""
    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append(dict(row, model=Path(str(row.get("model"))).stem))
    return rows


def _pick(rows, **want) -> dict | None:
    hit = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    return hit[-1] if hit else None


def summary(pipeline: Pipeline) -> list[str]:
    """Up to eight lines, each a like-for-like comparison or saying what differs: one-step G vs the teacher at NFE 1
    and at its best, vs PD-1 at an equal training budget, growth (with the drift, and without L_rec), guidance
    curves of the guided G and the teacher's CFG, how far w moves each (bench.moves), how far each model's
    training moved it (lr units), cost ratio."""
    from pagoda.config import get_preset
    from pagoda.networks.domain import INPUT_RESOLUTION

    rows, plan = _rows(pipeline.results), pipeline.plan
    base, g = pipeline.base, f"G{pipeline.base}"
    fid = [r for r in rows if r.get("metric") == "fid" and r.get("guidance") in (1, 1.0, None)]
    lines = []
    gq = _pick(fid, model=g)
    t1 = min((r for r in fid if r["model"] == "teacher" and r.get("nfe") == 1), key=lambda r: r["value"], default=None)
    teacher = [r for r in fid if r["model"] == "teacher"]
    best = min(teacher, key=lambda r: r["value"], default=None)
    pd1 = _pick(fid, model="PD-1")
    if gq and t1:
        lines.append(f"one-step G{base}: FD {gq['value']:.2f} vs the teacher at NFE 1 ({t1['sampler']}-1): "
                     f"FD {t1['value']:.2f}")
    if gq and best:
        lines.append(f"teacher's best FD {best['value']:.2f} ({best['sampler']}-{best['steps']}, NFE "
                     f"{best.get('nfe'):g}); G{base} is {gq['value'] - best['value']:+.2f} from it at NFE 1")
    if gq and pd1:
        preset, rounds = get_preset(plan.preset), len(_halvings(plan.pd_from))
        lines.append(f"at NFE 1 and an equal budget ({plan.g_steps} updates of {preset.distill.train.batch} images "
                     f"for G, {rounds} rounds x {plan.pd_steps} of {preset.pd.train.batch} for PD; G also needs "
                     f"the inversion of its {2 * plan.pairs_images} items): PaGoDA G{base} FD {gq['value']:.2f} vs "
                     f"progressive distillation PD-1 FD {pd1['value']:.2f}")
    grown = [(r, _pick(fid, model=f"G{r}")) for r in pipeline.resolutions[1:]]

    def grown_text(r: int, q: dict) -> str:  # FD and drift of G{r}, and of its no-L_rec ablation where there is one
        drift = _pick(rows, metric="drift_rms", model=f"G{r}")
        nq, nd = _pick(fid, model=f"G{r}-norec"), _pick(rows, metric="drift_rms", model=f"G{r}-norec")
        return f"G{r} FD {q['value']:.2f}" + (f" (drift {drift['value']:.1f} levels)" if drift else "") + (
            f"; without L_rec FD {nq['value']:.2f} (drift {nd['value']:.1f})" if nq and nd else "")
    if grown and all(q for _, q in grown):
        scored = grown[0][1].get("extractor")
        lines.append("grown: " + ", ".join(grown_text(r, q) for r, q in grown) + (
            f" (each FD against held-out photos of its own size; the {scored} features see every size at "
            f"{INPUT_RESOLUTION} px)" if scored == "domain" else ""))
    sampler, nsteps = plan.guidance_cell
    ws = [float(w) for w in plan.guidance.split(",")]
    curve = {}
    for r in rows:
        if r.get("metric") == "fid" and r.get("guidance") in ws and (
                r["model"] == f"{g}-cfg" or (r["model"] == "teacher" and (r.get("sampler"), r.get("steps"))
                                              == (sampler, nsteps))):
            curve[(r["model"], r["guidance"])] = r
    if all((name, w) in curve for name in ("teacher", f"{g}-cfg") for w in ws):
        fds = {name: " / ".join(f"{curve[(name, w)]['value']:.2f}" for w in ws) for name in ("teacher", f"{g}-cfg")}
        nfe = curve[("teacher", ws[-1])].get("nfe")
        lines.append(f"guidance w = {' / '.join(f'{w:g}' for w in ws)}: guided {g}-cfg (NFE 1, {plan.guided_steps} "
                     f"updates from {g}) FD {fds[g + '-cfg']}; teacher CFG ({sampler}-{nsteps}, NFE "
                     f"{nfe:g} at w != 1) FD {fds['teacher']} (FD against the photos, which CFG moves away from)")
    moves = {(r["model"], r["metric"], r.get("guidance")): r["value"] for r in rows
             if r.get("metric") in ("guidance_move", "guidance_move_cosine")}
    mw = sorted({w for _, _, w in moves if w is not None})
    if mw and all((k, "guidance_move", w) in moves for k in (f"{g}-cfg", "teacher") for w in mw):
        text = {k: " / ".join(f"{moves[(k, 'guidance_move', w)]:.1f}" for w in mw) for k in (f"{g}-cfg", "teacher")}
        cos = " / ".join(f"{moves.get((f'{g}-cfg', 'guidance_move_cosine', w), float('nan')):.2f}" for w in mw)
        lines.append(f"what w does (RMS uint8 levels of X(w) - X(1), {plan.moves_seeds} seeds) at w = "
                     f"{' / '.join(f'{w:g}' for w in mw)}: {g}-cfg {text[g + '-cfg']}, teacher {sampler}-{nsteps} "
                     f"{text['teacher']}; cosine of G's move with the teacher's {cos}")
    moved = [(r["model"], r["extra"]["displacement_lr"], r["extra"].get("train_step")) for r in fid
             if r["model"] != "teacher" and isinstance((r.get("extra") or {}).get("displacement_lr"), (int, float))]
    if moved:  # one entry per model (a model's rows at several resolutions carry the same budget)
        text = {m: f"{m} {d:.1f} ({n} steps)" for m, d, n in moved}
        lines.append("trained (RMS weight change from the start, in lr units; <~5: barely trained): "
                     + ", ".join(text.values()))
    lat = {(r["model"], r.get("sampler"), r.get("steps")): r["value"] for r in rows
           if r.get("metric") == "latency_ms" and r.get("batch") == 1}
    if gq and best and (g, None, None) in lat and ("teacher", best["sampler"], best["steps"]) in lat:
        ratio = lat[("teacher", best["sampler"], best["steps"])] / lat[(g, None, None)]
        lines.append(f"cost: G{base} {lat[(g, None, None)]:.1f} ms per image at batch 1, {ratio:.1f}x faster than "
                     f"the teacher's best cell ({best['sampler']}-{best['steps']})")
    return lines


# ---------------------------------------------------------------------------------------------
# CLI.

def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m pagoda demo", description=__doc__.split("\n\n")[0],
                       epilog="Steps: " + "; ".join(("domain", "teacher", "refs", "pairs (plain, guided)",
                                                     "G", "guided G", "grow + drift", "PD", "eval", "cost",
                                                     "samples", "report")))
    p.add_argument("--preset", choices=sorted(PLANS), default="photos", help="photos (default; ~25 min on 2 CPU "
                   "cores) or smoke (< 6 min: the CI pipeline)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo, runs/smoke for smoke)")
    p.add_argument("--weights-dir", default=None, help="folder of the domain classifier's weights (default "
                   "$PAGODA_WEIGHTS, else ./weights; trained there if absent)")
    p.add_argument("--dry-run", action="store_true", help="print each step's command and whether it is up to "
                   "date, run nothing")
    p.add_argument("--only", default=None, help="comma list of step names to run again, from scratch (the others "
                   "are left as they are)")
    args = p.parse_args(argv)
    plan = PLANS[args.preset]
    out = Path(args.out or ("runs/demo" if args.preset == "photos" else f"runs/{args.preset}"))
    weights = Path(args.weights_dir or os.environ.get("PAGODA_WEIGHTS") or "weights")
    for folder, what in ((out, "--out"), (weights, "--weights-dir")):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {folder} is a file: give a folder")
        check_output(folder / "x", what)
    if out.is_dir() and not (out / ".steps").is_dir():  # not a demo run's folder (run() makes .steps first)
        from pagoda.train import refuse_foreign_files

        refuse_foreign_files(out, what="a demo run")
    pipeline = Pipeline(plan, out, weights)
    steps = pipeline.steps()
    only = None
    if args.only is not None:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = sorted(only - {s.name for s in steps})
        if not only:
            raise UserError(f"--only {args.only!r} names no step: give step names, e.g. --only report")
        if unknown:
            raise UserError(f"--only {args.only!r}: unknown step(s) {unknown}; steps: "
                            f"{', '.join(s.name for s in steps)}")
    if args.dry_run:
        for s in steps:
            state = "up to date" if up_to_date(s, out / ".steps" / f"{s.name}.json") else "to run"
            cmd = f"python -m {' '.join(s.argv)}" if s.argv else "(in process)"
            print(f"{s.name:14s} {state:10s} {cmd}")
        return 0
    weights.mkdir(parents=True, exist_ok=True)
    print(f"demo {plan.preset}: {len(steps)} steps into {out} (sized for ~{plan.budget_min} min on 2 CPU cores, up to ~2x on a slow host; "
          f"logs in {out / 'logs'})", flush=True)
    t0 = time.perf_counter()
    try:
        run(pipeline, only=only)
    except StepFailed as e:
        print(" failed", flush=True)
        raise UserError(str(e)) if e.code == 2 else SystemExit(f"error: {e}") from None
    report = out / "report" / "index.html"
    print(f"demo {plan.preset}: done in {(time.perf_counter() - t0) / 60:.1f} min; report: "
          f"{report if report.exists() else 'not built yet (run without --only)'}")
    for line in summary(pipeline):
        print(f"  {line}")
    return 0
