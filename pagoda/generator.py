"""One interface for every model that makes images: `Generator.sample(seeds, labels, guidance) -> uint8`.

eval/ and bench/ see only this. Sample i is a function of seed i alone (its noise, and its label
when none is given, come from a torch.Generator seeded with it, on the CPU), so results do not
depend on the batch size, the device count or the order of the seeds.

`load_generator(path)` reads a checkpoint's meta and dispatches on its kind: "teacher" becomes a
`DiffusionGenerator` (EDM denoiser + Heun or Euler/DDIM on the Karras grid). One-step generators
add a line to `LOADERS`.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pagoda.checkpoint import diffusion_config, load_network, load_teacher, read_meta
from pagoda.config import SampleConfig, from_dict, split_sampler_spec
from pagoda.data import to_uint8
from pagoda.diffusion import EDMPrecond, one_step, sigma_grid
from pagoda.errors import UserError
from pagoda.samplers import MAX_GUIDANCE, SAMPLER_NFE, get_sampler


def finite_images(x: torch.Tensor, name: str, seeds: torch.Tensor | None, w: float) -> torch.Tensor:
    """x (float [N, ...], the model's output in [-1, 1] units) unchanged, or a UserError naming the first sample
    with NaN/inf (its seed when given) and w: NaN would become black pixels in the uint8 images."""
    bad = (~torch.isfinite(x.detach()).reshape(len(x), -1).all(dim=1)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        at = f"seed {int(seeds[i])}" if seeds is not None else f"item {i}"
        raise UserError(f"{name}: the model produced NaN/inf at {at} (guidance {w:.10g}): the checkpoint is broken "
                        "(diverged training?) or w is too large; use an earlier snapshot or a smaller w")
    return x


# Per-seed draws on the CPU (EDM generate.py's convention): eps_i ~ N(0, I) of `shape` from
# torch.Generator(seed_i), then, when num_classes > 0, label_i = randint(num_classes) from the same
# generator. Returns (eps float32 [N, *shape] on device, labels int64 [N] on device or None).
def seeded_draws(seeds: torch.Tensor, shape, device, num_classes: int = 0):
    eps, labels = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        eps.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
        if num_classes > 0:
            labels.append(torch.randint(num_classes, (), generator=g))
    eps = torch.stack(eps).to(device) if eps else torch.empty(0, *shape, device=device)
    return eps, (torch.stack(labels).to(device) if labels else None)


# The noise of sample i depends on seed i only: identical across devices, batch sizes and GPU counts.
def seeded_noise(seeds: torch.Tensor, shape, device="cpu") -> torch.Tensor:
    return seeded_draws(as_seeds(seeds), shape, device)[0]


# Seeds as a 1-D int64 CPU tensor of non-negative values (a list, range or tensor is accepted).
def as_seeds(seeds) -> torch.Tensor:
    seeds = torch.as_tensor(seeds if isinstance(seeds, torch.Tensor) else list(seeds)).cpu()
    if seeds.ndim != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
        raise UserError(f"seeds must be a 1-D list of integers, got a {seeds.dtype} tensor of shape "
                        f"{tuple(seeds.shape)}: pass e.g. torch.arange(64)")
    if len(seeds) and int(seeds.min()) < 0:
        raise UserError(f"seed {int(seeds.min())} is negative: seeds must be integers >= 0")
    return seeds.to(torch.int64)


class Generator(abc.ABC):
    """Anything that turns seeds (and labels, a CFG scale) into uint8 images [N, 3, H, W]."""

    name: str  # how result rows name the model
    kind: str  # the checkpoint kind it was loaded from
    method: str = "generator"  # how result rows name the method ("heun", "ddim", "pagoda", "pd", ...)
    sampler: str | None = None  # the ODE solver of a multi-step model; None for a one-step generator
    sweepable: bool = False  # True where sampler and steps may be chosen per call (a diffusion teacher)
    steps: int | None = None  # its number of steps; None for a one-step generator
    resolution: int
    num_classes: int  # 0 = unconditional
    nfe: float  # declared network evaluations per sample at the default guidance
    guidance: float = 1.0  # the default CFG scale (used when sample() gets guidance=None)
    supports_guidance: bool = False  # whether a CFG scale w != 1 means anything to this model
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    # The module one NFE evaluates (a diffusion generator's denoiser, a one-step generator's UNet); assignable, e.g.
    # by its torch.compile'd version; None where the images come from elsewhere (a callable)
    network: nn.Module | None = None
    grid: str | None = None  # a multi-step sampler's sigma grid: "karras rho=7", "loguniform", "given" (a PD student)
    guidance_range: tuple[float, float] | None = None  # [lo, hi] of a guidance-conditioned one-step G (w is an input)
    # The training budget its file records (train_step, train_images, displacement_lr: TRAINING_KEYS), for rows
    training: dict = {}
    # Its protocol, for rows (pagoda.rows.PROTOCOL): where it works, how its floats become uint8 (pagoda.data.to_uint8),
    # and the frozen feature networks its training losses used (None = unknown, () = none)
    space: str | None = "pixel"
    uint8: str | None = "round"
    feature_nets: tuple[str, ...] | None = ()

    @abc.abstractmethod
    def sample(self, seeds, labels=None, guidance: float | None = None) -> torch.Tensor:
        """uint8 [N, 3, resolution, resolution] on self.device; sample i depends on seeds[i] (and labels[i])."""

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """Shape of the per-seed noise (a grown generator keeps its base resolution's, so z stays the same)."""
        return (3, self.resolution, self.resolution)

    def nfe_for(self, guidance: float | None) -> float:
        """Declared NFE per sample at CFG scale `guidance` (None = the default)."""
        return self.nfe

    def check_guidance(self, guidance: float | None) -> float:
        """The CFG scale a sample() call uses (None = the default); UserError for w != 1 on a model that cannot
        use it (supports_guidance False: unconditional, or trained without label dropout)."""
        w = self.guidance if guidance is None else float(guidance)
        if w != 1.0 and not self.supports_guidance:
            raise UserError(f"guidance {w:.10g}: {self.name} was not trained for classifier-free guidance "
                            "(unconditional, or no label dropout): sample it with guidance 1")
        if not 0 <= w <= MAX_GUIDANCE:  # NaN too
            raise UserError(f"guidance {w:.10g} for {self.name}: pick a CFG scale w in [0, {MAX_GUIDANCE:g}]")
        return w

    def seed_labels(self, seeds) -> torch.Tensor | None:
        """The labels sample() draws from the seeds when given none (None for unconditional models)."""
        return seeded_draws(as_seeds(seeds), self.noise_shape, "cpu", self.num_classes)[1]

    def check_labels(self, labels, n: int) -> torch.Tensor | None:
        """Labels as int64 [n] in [0, num_classes] (num_classes = the null class), or None."""
        if labels is None:
            return None
        if self.num_classes == 0:
            raise UserError(f"{self.name} is unconditional (num_classes=0) but labels were given: drop them")
        labels = torch.as_tensor(labels).reshape(-1).to(torch.int64).cpu()
        if labels.numel() == 1:
            labels = labels.expand(n)
        if labels.numel() != n:
            raise UserError(f"got {labels.numel()} labels for {n} seeds: give one label or one per seed")
        if n and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise UserError(f"labels must be class ids in [0, {self.num_classes - 1}] ({self.num_classes} = "
                            f"unconditional) for {self.name}, got {labels.min().item()}..{labels.max().item()}")
        return labels.contiguous()

    def sample_batches(self, seeds, labels=None, guidance: float | None = None,
                       batch: int = 64) -> Iterator[torch.Tensor]:
        """sample() over consecutive chunks of `batch` seeds; the images equal one big call's."""
        seeds = as_seeds(seeds)
        if batch < 1:
            raise UserError(f"batch={batch} must be >= 1")
        labels = self.check_labels(labels, len(seeds))
        for i in range(0, len(seeds), batch):
            yield self.sample(seeds[i:i + batch], None if labels is None else labels[i:i + batch], guidance)


def _alias(name: str) -> property:
    """A read-write property for the attribute `name` under another name (a subclass's `network`)."""
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value),
                    doc=f"the module one NFE evaluates: self.{name}")


class Clamped(nn.Module):
    """A denoiser whose output is clipped to [-1, 1] at every call (the original PD sampler's clip_x)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        self.num_classes = getattr(denoiser, "num_classes", 0)

    def forward(self, x, sigma, labels=None):
        return self.denoiser(x, sigma, labels).clamp(-1, 1)


class DiffusionGenerator(Generator):
    """An EDM denoiser sampled by a deterministic ODE solver (EDM Alg. 1, S_churn = 0; DPM-Solver++(2M)).

    `sampler` is a spec 'name[:grid]' (`pagoda.config.split_sampler_spec`); the grid has `steps` nonzero sigmas then 0, unless
    `sigmas` gives the grid itself (a PD student's). NFE per sample: N (euler / ddim / dpmpp2m on a grid of N
    steps) or 2N - 1 (heun), doubled under CFG (w != 1; one batched call of 2N rows per evaluation).
    """

    kind = "teacher"
    network = _alias("denoiser")

    def __init__(self, denoiser: EDMPrecond, *, resolution: int, num_classes: int, sampler: str = "heun",
                 steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 guidance: float = 1.0, supports_guidance: bool | None = None, name: str = "diffusion",
                 sigmas: torch.Tensor | None = None, method: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        base, schedule, spec_rho = split_sampler_spec(sampler)
        self.sampler_fn = get_sampler(base)
        default_rho, rho = rho, rho if spec_rho is None else spec_rho
        if sigmas is None:
            self.sigmas = sigma_grid(schedule, steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
            self.grid = "loguniform" if schedule == "loguniform" else f"karras rho={rho:g}"
        else:
            self.sigmas, self.grid = torch.as_tensor(sigmas, dtype=torch.float64), "given"
        # One label per distinct sampling (rows are matched on it): ddim is euler, the default grid is implicit.
        label = "euler" if base == "ddim" else base
        if schedule == "loguniform":
            label += ":loguniform"
        elif rho != default_rho:
            label += f":karras-rho{rho:g}"
        self.sampler, self.steps, self.name, self._method = label, len(self.sigmas) - 1, name, method
        self.sweepable = sigmas is None  # eval.run may sweep sampler and steps unless the grid is the model's own
        self.base_sampler = base
        self.resolution, self.num_classes, self.guidance = int(resolution), int(num_classes), float(guidance)
        self.supports_guidance = num_classes > 0 if supports_guidance is None else bool(supports_guidance)
        self.device, self.dtype = torch.device(device), dtype
        self.denoiser = denoiser.to(self.device).eval().requires_grad_(False)

    def nfe_for(self, guidance: float | None) -> float:
        w = self.guidance if guidance is None else float(guidance)
        return float(SAMPLER_NFE[self.base_sampler](self.steps) * (2 if w != 1 and self.num_classes > 0 else 1))

    @property
    def nfe(self) -> float:
        return self.nfe_for(None)

    @property
    def method(self) -> str:
        """How result rows name the method: "heun" (EDM), "ddim" (Euler on the PF-ODE), "dpmpp2m", or the
        model's own (e.g. "pd" for a progressive-distillation student)."""
        if self._method:
            return self._method
        return {"heun": "heun", "dpmpp2m": "dpmpp2m"}.get(self.base_sampler, "ddim")

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def sample(self, seeds, labels=None, guidance: float | None = None) -> torch.Tensor:
        """Images of the seeds. To count NFE, wrap the denoiser: `gen.denoiser = NFECounter(gen.denoiser)`."""
        seeds = as_seeds(seeds)
        labels = self.check_labels(labels, len(seeds))
        w = self.guidance if guidance is None else float(guidance)
        eps, drawn = seeded_draws(seeds, self.noise_shape, self.device, self.num_classes if labels is None else 0)
        labels = drawn if labels is None else labels.to(self.device)
        with self._autocast():
            x = self.sampler_fn(self.denoiser, eps * self.sigmas[0].item(), self.sigmas,
                                labels=labels, guidance=None if w == 1 else w)
        return to_uint8(finite_images(x, self.name, seeds, w))


class OneStepGenerator(Generator):
    """PaGoDA's one-step G: x = F(c_in(sigma_max) z; c_noise(sigma_max), y[, w]), z = sigma_max * eps, one
    network call, clamped to [-1, 1] (METHOD §2, Stage 2b). NFE = 1 at every resolution and every w (a grown G
    keeps its base-resolution noise; see `noise_shape`).

    guidance_range (lo, hi): a guidance-conditioned G (its UNet embeds w) samples any w in that closed range,
    the default being 1 when inside it, else lo; None: an unguided G, which samples w = 1 only. Any other w is a
    UserError naming the range.
    """

    kind = method = "pagoda"
    nfe = 1.0
    network = _alias("net")

    def __init__(self, net: nn.Module, *, resolution: int, num_classes: int, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, noise_resolution: int | None = None, name: str = "pagoda",
                 guidance_range: tuple[float, float] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.resolution, self.num_classes, self.name = int(resolution), int(num_classes), name
        self.sigma_max, self.sigma_data = float(sigma_max), float(sigma_data)
        self.noise_resolution = int(noise_resolution or resolution)
        self.device, self.dtype = torch.device(device), dtype
        self.net = net.to(self.device).eval().requires_grad_(False)
        guided = getattr(net, "guidance_emb", None) is not None
        if guided != (guidance_range is not None):
            raise UserError(f"{name}: a guidance range is given for a G {'with' if guided else 'without'} a guidance "
                            "embedding (or none for one with it): the checkpoint's meta is damaged")
        self.guidance_range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))
        self.supports_guidance = guided
        lo, hi = self.guidance_range or (1.0, 1.0)
        self.guidance = 1.0 if lo <= 1.0 <= hi else lo

    def check_guidance(self, guidance: float | None) -> float:
        """The CFG scale w a sample() call uses (None = the default), refused outside the trained range."""
        w = self.guidance if guidance is None else float(guidance)
        if self.guidance_range is None:
            if w != 1.0:
                raise UserError(f"guidance {w:.10g}: {self.name} was trained without guidance (its range is 1 only): "
                                "sample it with guidance 1, or train a G on guided pairs (pagoda pairs --guidance)")
            return w
        lo, hi = self.guidance_range
        if not lo <= w <= hi:
            raise UserError(f"guidance {w:.10g} is outside the range [{lo:g}, {hi:g}] {self.name} was trained on: pick "
                            "w in it")
        return w

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (3, self.noise_resolution, self.noise_resolution)

    def nfe_for(self, guidance: float | None) -> float:
        return 1.0

    @torch.no_grad()
    def sample(self, seeds, labels=None, guidance: float | None = None) -> torch.Tensor:
        """Images of the seeds (uint8 [N, 3, R, R]); labels drawn from the seeds when not given."""
        seeds = as_seeds(seeds)
        labels = self.check_labels(labels, len(seeds))
        w = self.check_guidance(guidance)
        eps, drawn = seeded_draws(seeds, self.noise_shape, self.device, self.num_classes if labels is None else 0)
        return self.decode(eps * self.sigma_max, drawn if labels is None else labels.to(self.device), w, seeds=seeds)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None, w: float = 1.0,
               seeds: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [N, 3, R, R] of latents z float [N, *noise_shape] (sigma_max * eps, or an inversion's) and labels
        int64 [N] (None for an unconditional G) at a checked CFG scale w: one network call, clamped; a UserError
        for NaN/inf output (naming seeds[i] when given)."""
        ctx = contextlib.nullcontext() if self.dtype == torch.float32 else \
            torch.autocast(self.device.type, dtype=self.dtype)
        with ctx:
            w_in = torch.full((len(z),), w, device=self.device) if self.guidance_range else None
            x = one_step(self.net, z, labels, sigma_max=self.sigma_max, sigma_data=self.sigma_data, guidance=w_in)
        return to_uint8(finite_images(x.float(), self.name, seeds, w).clamp(-1, 1))


# ---------------------------------------------------------------------------------------------
# Loading by checkpoint kind.

def _load_teacher(path: str, meta: dict, *, sampler: str | None, steps: int | None, device,
                  dtype: torch.dtype) -> DiffusionGenerator:
    """A teacher file -> DiffusionGenerator with the file's `sample` settings unless overridden."""
    teacher = load_teacher(path, device=device)
    net, meta, diffusion = teacher.net, teacher.meta, teacher.diffusion
    sample = from_dict(SampleConfig, meta.get("sample", {}), where=f"checkpoint {path} sample")
    steps = sample.steps if steps is None else int(steps)
    if steps < 1:
        raise UserError(f"steps={steps} must be >= 1 for {path}")
    # CFG needs a teacher trained with label dropout; the imported EDM teacher (no 'diffusion' entry) was not.
    label_dropout = meta.get("diffusion", {}).get("label_dropout", 0.0)
    return DiffusionGenerator(teacher.denoiser(), resolution=meta.get("resolution", net.resolution),
                              num_classes=net.num_classes, sampler=sampler or sample.sampler, steps=steps,
                              sigma_min=diffusion.sigma_min, sigma_max=diffusion.sigma_max, rho=diffusion.rho,
                              guidance=sample.guidance, supports_guidance=net.num_classes > 0 and label_dropout > 0,
                              name=Path(path).stem, device=device, dtype=dtype)


def _check_guidance_range(path: str, g) -> None:
    """UserError unless a G file's guidance_range is None or [lo, hi] with 0 <= lo <= hi <= MAX_GUIDANCE."""
    if g is not None and not (isinstance(g, list) and len(g) == 2 and all(isinstance(v, (int, float)) for v in g)
                              and 0 <= g[0] <= g[1] <= MAX_GUIDANCE):
        raise UserError(f"{path}: its guidance_range {g!r} is not [lo, hi] with 0 <= lo <= hi <= {MAX_GUIDANCE:g}: "
                        "the file was edited or is damaged; use the G.safetensors a distill run wrote")


def _load_one_step(path: str, meta: dict, *, sampler: str | None, steps: int | None, device,
                   dtype: torch.dtype) -> OneStepGenerator:
    """A PaGoDA G file -> OneStepGenerator; a sampler or step count is refused (one network call)."""
    if sampler is not None or steps is not None:
        raise UserError(f"{path} is a one-step generator (kind {meta.get('kind')!r}): it takes no sampler or steps; "
                        "drop --sampler / --steps for it")
    net, meta = load_network(path, device=device)
    diffusion = diffusion_config(path, meta)
    _check_guidance_range(path, meta.get("guidance_range"))
    res = meta.get("resolution", net.resolution)
    if not isinstance(res, int) or res != net.output_resolution:
        raise UserError(f"{path}: its resolution {res!r} is not its network's output size {net.output_resolution}: "
                        "the file was edited or is damaged; use the G.safetensors a distill or grow run wrote")
    return OneStepGenerator(net, resolution=res, num_classes=net.num_classes,
                            sigma_max=diffusion.sigma_max, sigma_data=diffusion.sigma_data,
                            noise_resolution=meta.get("noise_resolution"), name=Path(path).stem,
                            guidance_range=meta.get("guidance_range"), device=device, dtype=dtype)


def _load_pd(path: str, meta: dict, *, sampler: str | None, steps: int | None, device,
             dtype: torch.dtype) -> DiffusionGenerator:
    """A progressive-distillation student -> DiffusionGenerator on its own grid: Euler (= DDIM, NFE = its steps)
    with D clipped to [-1, 1] at each step (consistency-models' sampler with clip_denoised, the original's
    clip_x); another sampler or step count is refused."""
    from pagoda.baselines.progressive_distillation import student_sigmas

    pd = meta.get("pd") or {}
    if not isinstance(pd.get("steps"), int) or pd.get("formulation") not in ("edm", "vp-cosine"):
        raise UserError(f"{path} is a PD checkpoint without its 'pd' entry (steps, formulation): the file was "
                        "edited or is damaged; use the pd-<N>.safetensors a pd run wrote")
    if sampler is not None or steps is not None:
        raise UserError(f"{path} is a {pd['steps']}-step progressive-distillation student sampled on its own grid: "
                        "drop --sampler / --steps for it")
    net, meta = load_network(path, kind="pd", device=device)
    diffusion = diffusion_config(path, meta)
    sigmas = student_sigmas(pd["steps"], pd["formulation"], sigma_min=diffusion.sigma_min,
                            sigma_max=diffusion.sigma_max, rho=diffusion.rho)
    denoiser = EDMPrecond(net, sigma_data=diffusion.sigma_data)
    return DiffusionGenerator(Clamped(denoiser),
                             resolution=meta.get("resolution", net.resolution), num_classes=net.num_classes,
                             sampler="euler", sigmas=sigmas, method="pd", supports_guidance=False,
                             name=Path(path).stem, device=device, dtype=dtype)


LOADERS = {"teacher": _load_teacher, "pagoda": _load_one_step, "pd": _load_pd}


def load_generator(path: str | os.PathLike, *, sampler: str | None = None, steps: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Generator:
    """The Generator stored in a checkpoint file, picked by the kind in its metadata."""
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind not in LOADERS:
        raise UserError(f"checkpoint {path} holds kind={kind!r}, which is not an image generator: pass a "
                        f"checkpoint of kind {' or '.join(repr(k) for k in sorted(LOADERS))}")
    gen = LOADERS[kind](str(path), meta, sampler=sampler, steps=steps, device=device, dtype=dtype)
    gen.training, gen.feature_nets = training_budget(meta), feature_nets(meta)
    return gen


# What a model file says of its training, as row `extra` keys: optimizer steps, images seen, and how far the
# trainable weights moved from their start in learning-rate units (pagoda.schedule.displacement_lr).
TRAINING_KEYS = {"step": "train_step", "train_images": "train_images", "displacement_lr": "displacement_lr"}


def feature_nets(meta: dict) -> tuple[str, ...]:
    """The frozen feature networks a model file's own training used (config loss.backbone and disc.backbone,
    pagoda.networks.features; "paper" = DeiT + EfficientNet-lite0, "random" = none): a metric on one of them is
    not a held-out test of the model. The stages before it (a grown G's base) are not read."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    names = set()
    for part in ("loss", "disc"):
        name = (config.get(part) or {}).get("backbone") if isinstance(config.get(part), dict) else None
        if isinstance(name, str) and name != "random":
            names.update(("deit", "efficientnet-lite0") if name == "paper" else (name,))
    return tuple(sorted(names))


def training_budget(meta: dict) -> dict:
    """The TRAINING_KEYS a model file's meta holds, under their row names (an imported model holds none)."""
    return {row: meta[key] for key, row in TRAINING_KEYS.items() if isinstance(meta.get(key), (int, float))}
