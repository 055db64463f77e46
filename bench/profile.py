"""The cost of sampling a Generator: NFE, latency, images/s, peak memory, FLOPs, parameters, as result rows.

Everything is measured on the generator as `eval` samples it (`Generator.sample(seeds)`, uint8 out), never
assumed from what it declares:

- NFE: a forward pre-hook on the network a sample() call evaluates (`network_of`) counts the rows it sees;
  NFE = rows / images. A CFG step evaluates cond + uncond rows in one call of 2N rows, so it counts 2.
- Latency: `reps` (>= 30) timed calls of one batch after `warmup` untimed ones; on CUDA between two CUDA
  events after a synchronise, on a CPU by `time.perf_counter` (the CPU has nothing to synchronise). Median
  and p90 in ms per call; images/s = batch / median.
- Peak memory: the weights plus the peak of what one call allocates beyond what was allocated before it.
  CUDA: from `torch.cuda.max_memory_allocated` (mem_kind "cuda_max_allocated"). CPU:
  DESIGN: the peak of live tensor bytes during one call, weights included, counted by a dispatch mode that
  follows every storage an op creates until it is freed (mem_kind "tensor_peak"). RSS would mostly show
  the allocator's caching (glibc keeps freed blocks; a second call often adds nothing), and this is the same
  quantity as CUDA's allocated bytes.
- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` over one sample() call of one image (2 FLOPs
  per multiply-add; convolutions, matmuls and attention, counted on attention's math backend because the fused
  CPU kernels have no FLOP formula; elementwise ops are not counted, as in fvcore and every paper's GFLOPs).
  Under --compile, FLOPs and CPU memory are counted on the uncompiled module (inductor bypasses the dispatcher).
- Parameters: of the network(s) evaluated.

Rows: metrics nfe, latency_ms (extra p90_ms, reps, warmup), img_per_s (these two: num_samples = the images
timed, batch x reps), peak_mem_mb (extra mem_kind),
gflops_per_image, params; every row carries batch, dtype, device, extra.device_name and extra.compile.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pagoda.errors import UserError

MIN_REPS = 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def network_of(gen) -> nn.Module:
    """The module one NFE evaluates (`Generator.network`). UserError for a generator without one (a callable)."""
    if not isinstance(gen.network, nn.Module):
        raise UserError(f"{gen.name}: no network to profile (its images come from a callable): profile a generator "
                        "loaded by pagoda.generator.load_generator")
    return gen.network


def set_network(gen, module: nn.Module) -> None:
    """Replace the generator's network (e.g. by its torch.compile'd version)."""
    gen.network = module


def count_params(module: nn.Module) -> int:
    """Number of parameters of `module` (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@contextlib.contextmanager
def count_rows(module: nn.Module):
    """Yields a one-element list holding the number of rows (batch entries) `module` is called on inside."""
    rows = [0]

    def hook(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        rows[0] += int(x.shape[0])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def sampler_call(gen, batch: int, guidance: float | None = None, seed: int = 0) -> Callable[[], torch.Tensor]:
    """A no-argument function sampling `batch` images of seeds seed..seed+batch-1 (labels from the seeds)."""
    seeds = torch.arange(seed, seed + batch)

    def call():
        with torch.no_grad():
            return gen.sample(seeds, guidance=guidance)
    return call


def count_nfe(gen, *, guidance: float | None = None, batch: int = 2) -> float:
    """Network evaluations per image of one sample() call of `batch` images, counted by a hook."""
    with count_rows(network_of(gen)) as rows:
        sampler_call(gen, batch, guidance)()
    return rows[0] / batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, device: torch.device, reps: int = MIN_REPS, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `reps` calls of fn after `warmup` untimed ones (see the module docstring)."""
    times = []
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(warmup):
            fn()
        synchronize(device)
        for _ in range(reps):
            if device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages while active, counting `base` bytes (the weights) as live throughout.

    Every op output whose storage is new is tracked by a weak reference until the storage is freed, so views
    and in-place results are not counted twice and a storage is released when its last view dies."""

    def __init__(self, base: int = 0):
        super().__init__()
        self.live: dict[int, tuple[object, int]] = {}
        self.base, self.peak = base, base

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._purge()  # first: a freed storage's address may already hold one of this op's outputs
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.base + sum(n for _, n in self.live.values()))
        return out

    def _purge(self) -> None:
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[k]


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def peak_memory_mb(gen, fn: Callable[[], object]) -> tuple[float, str]:
    """(peak MiB of one call of fn, mem_kind) as the module docstring defines it."""
    weights = tensor_bytes(network_of(gen))
    if gen.device.type == "cuda":  # what else lives on the GPU (e.g. eval's extractors) is not the model's
        synchronize(gen.device)
        before = torch.cuda.memory_allocated(gen.device)
        torch.cuda.reset_peak_memory_stats(gen.device)
        fn()
        synchronize(gen.device)
        return (torch.cuda.max_memory_allocated(gen.device) - before + weights) / 2**20, "cuda_max_allocated"
    mode = TensorMemory(weights)
    with uncompiled(gen), mode:
        fn()
    return mode.peak / 2**20, "tensor_peak"


@contextlib.contextmanager
def flop_counter():
    """A FlopCounterMode (2 FLOPs per multiply-add) with attention on its math backend: the fused CPU kernels
    of scaled_dot_product_attention have no FLOP formula and would count 0."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        yield counter


@contextlib.contextmanager
def uncompiled(gen):
    """The generator with its torch.compile'd network swapped for the original module while inside (inductor's
    kernels bypass the dispatcher, so neither FLOPs nor tensor memory could be counted through them)."""
    net = network_of(gen)
    set_network(gen, getattr(net, "_orig_mod", net))
    try:
        yield gen
    finally:
        set_network(gen, net)


def flops_per_image(gen, guidance: float | None = None) -> float:
    """FLOPs of one sample() call of one image (2 per multiply-add; `flop_counter`)."""
    with uncompiled(gen), flop_counter() as counter:
        sampler_call(gen, 1, guidance)()
    return float(counter.get_total_flops())


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one) and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def profile(gen, *, batches: list[int], guidance: float | None = None, reps: int = MIN_REPS, warmup: int = 3,
            compiled: bool = False, make_row: Callable[..., dict], fields: dict | None = None) -> list[dict]:
    """The cost rows of one generator setting at each batch size (see the module docstring).

    gen: a loaded Generator (its device and dtype are what is measured); batches: images per sample() call;
    guidance: the CFG scale (None = the model's default); reps >= 30 timed calls per batch; compiled: whether
    the network was torch.compile'd (recorded; compile it before calling); make_row: eval.rows.make_row;
    fields: row fields to add (e.g. model). Raises UserError for reps < 30 or a batch < 1.
    """
    if reps < MIN_REPS:
        raise UserError(f"--reps {reps}: latency needs at least {MIN_REPS} timed repetitions for a median and p90")
    if any(b < 1 for b in batches):
        raise UserError(f"--batch {batches}: batch sizes must be >= 1")
    w = gen.check_guidance(guidance)
    net = network_of(gen)
    nfe, flops = count_nfe(gen, guidance=guidance), flops_per_image(gen, guidance)
    base = dict(method=gen.method, resolution=gen.resolution, guidance=w, sampler=gen.sampler, steps=gen.steps,
                nfe=nfe, dtype=dtype_name(gen.dtype), device=str(gen.device), num_samples=None, seed=0)
    base.update(fields or {})
    extra = dict(device_name=device_name(gen.device), compile=compiled, nfe_declared=gen.nfe_for(guidance))
    if gen.noise_shape[-1] != gen.resolution:
        extra["noise_resolution"] = gen.noise_shape[-1]
    rows = []
    for batch in batches:
        fn = sampler_call(gen, batch, guidance)
        times = time_call(fn, device=gen.device, reps=reps, warmup=warmup)
        median = statistics.median(times)
        mem, kind = peak_memory_mb(gen, fn)
        row, timed = dict(base, batch=batch), dict(base, batch=batch, num_samples=batch * reps)
        rows += [make_row(metric="nfe", value=nfe, extra=extra, **row),
                 make_row(metric="latency_ms", value=median, extra=dict(extra, p90_ms=percentile(times, 90),
                                                                        reps=reps, warmup=warmup), **timed),
                 make_row(metric="img_per_s", value=batch / median * 1e3, extra=extra, **timed),
                 make_row(metric="peak_mem_mb", value=mem, extra=dict(extra, mem_kind=kind), **row),
                 make_row(metric="gflops_per_image", value=flops / 1e9, extra=extra, **row),
                 make_row(metric="params", value=count_params(net), extra=extra, **row)]
    return rows
