"""How the tuner measures one candidate variant of a problem class: a `Measurement`, never an exception.

An evaluator has `evaluate(pclass, variant) -> Measurement` (compile, prune on resources, verify against the
float64 reference, time), `retime(pclass, variants)` (the finalists, interleaved), `prefetch(pclass,
variants)` (compile ahead on CPU threads) and `covers(pclass)` (the variant keys it can measure, or None
for all). `GpuEvaluator` does it on a CUDA device; `fwagen.recording` records and replays measurements.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Protocol

from .registry import ProblemClass
from .variant import Variant

STATUSES = ("ok", "compile_error", "resource", "launch_error", "wrong")
# Heads and windows per image of the Swin stage each window size comes from (bench.SHAPES): a class's timing
# input has bucket / heads windows, so it fills the GPU as a real call of that size does.
SWIN_HEADS = {49: 3, 64: 3, 144: 4, 256: 4, 576: 8}
SWIN_MASK_WINDOWS = {49: 64, 64: 64, 144: 64, 256: 64, 576: 16}


@dataclass(frozen=True)
class Measurement:
    key: str  # the variant's key
    status: str  # one of STATUSES
    reason: str = ""  # why it is not ok
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    error: float | None = None  # max abs error against float64 (of the output, or the worst gradient)
    allowed_error: float | None = None
    seconds: float = 0.0  # wall time of the evaluation, compile wait included

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"measurement status {self.status!r}: expected one of {STATUSES}")
        if self.status == "ok" and not (self.median_ms and self.median_ms > 0):
            raise ValueError(f"{self.key}: an ok measurement needs a positive median_ms")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: differences of medians inside it are ties. 0 where percentiles are unknown."""
        if not self.ok or self.p20_ms is None or self.p80_ms is None:
            return 0.0
        return (self.p80_ms - self.p20_ms) / self.median_ms

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    @classmethod
    def from_json(cls, data: dict) -> Measurement:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_timing(self, timing) -> Measurement:
        """This measurement with the times of a `fwagen.timing.Timing`."""
        return replace(self, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)


class Evaluator(Protocol):
    arch: str  # e.g. sm_90
    gpu: str  # the GPU's name, as torch reports it

    def gpu_identity(self) -> dict: ...  # the `gpu` block of the tuned YAML

    def tuned_with(self) -> dict: ...  # versions and date for each YAML entry

    def evaluate(self, pclass: ProblemClass, variant: Variant) -> Measurement: ...

    def retime(self, pclass: ProblemClass, variants: list[Variant]) -> dict[str, Measurement]: ...

    def prefetch(self, pclass: ProblemClass, variants: list[Variant]) -> None: ...

    def covers(self, pclass: ProblemClass) -> set[str] | None: ...


def class_shape(pclass: ProblemClass) -> tuple[int, int, int]:
    """(windows, heads, mask windows) of the timing input of a class: windows x heads = its bucket."""
    n = pclass.problem.n
    heads = SWIN_HEADS.get(n, 4)
    windows = -(-pclass.bucket // heads)
    mask_windows = SWIN_MASK_WINDOWS.get(n, 64) if pclass.problem.has_mask else 0
    while mask_windows > 1 and mask_windows > windows:
        mask_windows //= 4
    if mask_windows:
        windows = -(-windows // mask_windows) * mask_windows
    return windows, heads, mask_windows


def check_windows(pclass: ProblemClass, windows: int, heads: int, budget: int = 1 << 25) -> int:
    """How many windows the float64 check covers: up to 64, fewer for large windows (budget of float64 logits)."""
    return max(1, min(windows, 64, budget // (heads * pclass.problem.n ** 2)))


class DeviceLost(RuntimeError):
    """The CUDA context died (a kernel faulted): nothing more can run in this process."""


class GpuEvaluator:
    """Measures variants on one CUDA device: compile (prefetched on CPU threads), prune on resources, verify
    on fresh random inputs against float64, time with `fwagen.timing` on an input the size of the class.

    Timings are of CUDA graph replays: the tuner ranks GPU time. Eager launches would let host stalls into
    the numbers of small classes (the compile threads share the interpreter with the launching thread), and
    the host cost of a call is the same for every variant (the bench reports it separately)."""

    def __init__(self, device: int = 0, jobs: int | None = None, reps: int = 50, warmup: int = 10,
                 retime_rounds: int = 30):
        import torch

        from .compiler import device_arch
        from .registry import gpu_identity

        torch.cuda.set_device(device)
        self.device, self.reps, self.warmup, self.retime_rounds = device, reps, warmup, retime_rounds
        self.arch, self.gpu = device_arch(device), torch.cuda.get_device_name(device)
        self._identity = gpu_identity(device)
        # Two cores stay free by default for the thread that launches and times: a starved launcher would put
        # host delays between the timing events.
        jobs = jobs or max(1, (os.cpu_count() or 2) - 2)
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fwagen-nvrtc")
        self._compiles: dict[str, Future] = {}
        self._bench = None  # the inputs of the class measured last
        self._lost: str | None = None

    def gpu_identity(self) -> dict:
        return dict(self._identity)

    def tuned_with(self) -> dict:
        from .registry import tuned_with

        return tuned_with()

    def covers(self, pclass):
        return None

    def prefetch(self, pclass, variants):
        from .compiler import compile_variant

        for variant in variants:
            if variant.key() not in self._compiles:
                self._compiles[variant.key()] = self._pool.submit(compile_variant, variant, self.arch)

    def _compiled(self, variant):
        from .compiler import compile_variant

        future = self._compiles.get(variant.key())
        if future is None or future.cancel():  # not started yet: compile it now, ahead of the queue
            return compile_variant(variant, self.arch)
        return future.result()

    def _bench_for(self, pclass):
        if self._bench is None or self._bench.pclass != pclass:
            self._bench = None  # free the last class's buffers before allocating these
            kind = BackwardBench if pclass.problem.direction == "bwd" else ForwardBench
            self._bench = kind(pclass, self.device, self.arch)
        return self._bench

    def evaluate(self, pclass, variant):
        started = time.perf_counter()
        measurement = self._evaluate(pclass, variant)
        return replace(measurement, seconds=time.perf_counter() - started)

    def _evaluate(self, pclass, variant):
        from .compiler import CompileError
        from .space import resource_violation
        from .timing import time_cuda

        if self._lost:
            raise DeviceLost(self._lost)
        key = variant.key()
        try:
            compiled = self._compiled(variant)
        except CompileError as error:
            return Measurement(key, "compile_error", str(error).splitlines()[0])
        except Exception as error:  # noqa: BLE001 - a render bug in one variant is recorded, the run goes on
            return Measurement(key, "compile_error", f"{type(error).__name__}: {error}")
        resources = dict(registers=compiled.resources.registers, spill_bytes=compiled.resources.spill_bytes)
        reason = resource_violation(variant, compiled.resources)
        if reason is not None:
            return Measurement(key, "resource", reason, **resources)
        try:
            bench = self._bench_for(pclass)
            verdict = bench.verify(variant)
            if verdict.problem is not None:
                return Measurement(key, "wrong", verdict.problem, error=verdict.error, allowed_error=verdict.allowed,
                                   **resources)
            timing = time_cuda(bench.runner(variant), warmup=self.warmup, reps=self.reps, use_graph=True)
        except Exception as error:  # noqa: BLE001 - a launch failure is a measurement
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if not self._context_alive():
                self._lost = f"the CUDA context died after {key} ({reason}); rerun to resume the study"
                reason += " (CUDA context lost)"
            return Measurement(key, "launch_error", reason, **resources)
        return Measurement(key, "ok", "", timing.median_ms, timing.p20_ms, timing.p80_ms, error=verdict.error,
                           allowed_error=verdict.allowed, **resources)

    def _context_alive(self) -> bool:
        import torch

        try:
            torch.cuda.synchronize(self.device)
            return torch.ones(1, device=f"cuda:{self.device}").add_(1).item() == 2
        except Exception:  # noqa: BLE001 - any failure here means the context is gone
            return False

    def retime(self, pclass, variants):
        from .timing import interleaved

        if self._lost:
            raise DeviceLost(self._lost)
        bench = self._bench_for(pclass)
        timings = interleaved({v.key(): bench.runner(v) for v in variants}, rounds=self.retime_rounds,
                              warmup=self.warmup, use_graph=True)
        return {key: Measurement(key, "ok", "", t.median_ms, t.p20_ms, t.p80_ms) for key, t in timings.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- class-sized inputs and the float64 check (GPU) -----------------------------------------------------------

# One unit in the last place at magnitude 1, as tests/helpers.py: the rounding of the output itself.
ERROR_FLOOR = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}
LSE_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # None: the variant computes the right thing
    error: float | None = None
    allowed: float | None = None


class _Inputs:
    """Class-sized q, k, v (views into one (windows, N, 3, heads, d) buffer, as the qkv Linear leaves them),
    float32 bias and 0/-100 mask, and a token-major output; refilled with fresh random values per check."""

    def __init__(self, pclass: ProblemClass, device: int, arch: str):
        import torch

        from .launch import empty_lse

        problem = self.problem = pclass.problem
        self.pclass, self.arch = pclass, arch
        self.windows, self.heads, self.mask_windows = class_shape(pclass)
        self.dtype = getattr(torch, problem.dtype)
        self.device = torch.device("cuda", device)
        w, h, n, d = self.windows, self.heads, problem.n, problem.head_dim
        self.qkv = torch.empty(w, n, 3, h, d, dtype=self.dtype, device=self.device)
        self.q, self.k, self.v = self.qkv.permute(2, 0, 3, 1, 4).unbind(0)
        self.bias = torch.empty(h, n, n, device=self.device) if problem.has_bias else None
        self.mask = torch.empty(self.mask_windows, n, n, device=self.device) if self.mask_windows else None
        self.out = torch.empty(w, n, h * d, dtype=self.dtype, device=self.device)
        self.out_bhnd = self.out.view(w, n, h, d).transpose(1, 2)
        self.lse = empty_lse(self.q)
        self.scale = d ** -0.5
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int.from_bytes(os.urandom(6), "little"))

    def refresh(self) -> None:
        import torch

        self.qkv.normal_(generator=self.generator)
        if self.bias is not None:
            self.bias.normal_(generator=self.generator).mul_(2)
        if self.mask is not None:
            keep = torch.rand(self.mask.shape, generator=self.generator, device=self.device) < 0.7
            keep |= torch.eye(self.problem.n, dtype=torch.bool, device=self.device)  # every row keeps itself
            self.mask.copy_(torch.where(keep, 0.0, -100.0))

    def sample(self):
        """Windows the float64 check covers: the first, the last, and random ones between."""
        import torch

        count = check_windows(self.pclass, self.windows, self.heads)
        picks = torch.randperm(self.windows, generator=self.generator, device=self.device)[:count]
        picks[0], picks[-1] = 0, self.windows - 1
        return picks.unique()

    def select(self, idx):
        """q, k, v, bias and the per-window mask of the windows `idx`, as a call of len(idx) windows."""
        mask = None if self.mask is None else self.mask[idx % self.mask_windows]
        return self.q[idx], self.k[idx], self.v[idx], self.bias, mask

    def runner(self, variant):
        return lambda: self.launch(variant)


class ForwardBench(_Inputs):
    def launch(self, variant) -> None:
        from .launch import launch_forward

        launch_forward(variant, self.q, self.k, self.v, self.out_bhnd, self.lse, self.bias, self.mask, self.scale)

    def verify(self, variant) -> Verdict:
        import torch

        from .reference import log_sum_exp_reference, window_attention_reference

        with torch.no_grad():
            self.refresh()
            self.out.fill_(math.nan)
            self.lse.fill_(math.nan)
            self.launch(variant)
            torch.cuda.synchronize(self.device)
            if not (torch.isfinite(self.out).all() and torch.isfinite(self.lse).all()):
                return Verdict("unwritten or non-finite output")
            idx = self.sample()
            q, k, v, b, m = self.select(idx)
            expected = window_attention_reference(q.double(), k.double(), v.double(),
                                                  None if b is None else b.double(), None if m is None else m.double())
            eager = window_attention_reference(q, k, v, b, m)
            allowed = 2 * (eager.double() - expected).abs().max().item() + ERROR_FLOOR[self.problem.dtype]
            error = (self.out_bhnd[idx].double() - expected).abs().max().item()
            if not error <= allowed:
                return Verdict(f"error {error:.3g} > allowed {allowed:.3g}", error, allowed)
            lse_error = (self.lse[idx].double() - log_sum_exp_reference(q, k, b, m)).abs().max().item()
            if not lse_error < LSE_TOLERANCE:
                return Verdict(f"log-sum-exp error {lse_error:.3g} >= {LSE_TOLERANCE}", error, allowed)
        return Verdict(None, error, allowed)


class BackwardBench(_Inputs):
    """The backward of a class: out and lse from the default forward kernel, a random gradient of the output;
    dq, dk, dv and dbias checked against float64 autograd of the reference over the whole input."""

    def __init__(self, pclass: ProblemClass, device: int, arch: str):
        import torch

        from .space import default_variant

        super().__init__(pclass, device, arch)
        self.forward = default_variant(replace(self.problem, direction="fwd"), arch)
        self.dout = torch.empty_like(self.out)
        self.dout_bhnd = self.dout.view(self.out.shape[0], self.problem.n, self.heads, -1).transpose(1, 2)

    def launch(self, variant):
        from .launch import launch_backward

        return launch_backward(variant, self.q, self.k, self.v, self.out_bhnd, self.dout_bhnd, self.lse, self.bias,
                               self.mask, self.scale)

    def _reference_grads(self, dtype):
        """Gradients of q, k, v (and bias) by autograd of the reference, computed in `dtype` (None: the inputs')."""
        import torch

        from .reference import window_attention_reference

        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        with torch.enable_grad():
            leaves = [cast(t.detach()).requires_grad_() for t in (self.q, self.k, self.v)]
            bias = None if self.bias is None else cast(self.bias.detach()).requires_grad_()
            mask = None if self.mask is None else cast(self.mask)
            out = window_attention_reference(*leaves, bias, mask, self.scale)
            out.backward(cast(self.dout_bhnd))
        return [t.grad for t in leaves] + ([bias.grad] if bias is not None else [])

    def verify(self, variant) -> Verdict:
        import torch

        from .launch import launch_forward

        with torch.no_grad():
            self.refresh()
            self.dout.normal_(generator=self.generator)
            launch_forward(self.forward, self.q, self.k, self.v, self.out_bhnd, self.lse, self.bias, self.mask,
                           self.scale)
            # launch_backward allocates the gradients itself; the caching allocator hands its same-size request
            # this freed block, so they start as NaN and an unwritten element cannot pass (fresh inputs per
            # check catch a block that does come from elsewhere).
            poison = torch.full((self.windows, self.problem.n, 3, self.heads, self.problem.head_dim), math.nan,
                                dtype=self.dtype, device=self.device)
            del poison
            dqkv, dbias = self.launch(variant)
            got = list(dqkv.permute(2, 0, 3, 1, 4).unbind(0)) + ([dbias] if dbias is not None else [])  # (B_, H, N, d)
            torch.cuda.synchronize(self.device)
        if not all(torch.isfinite(g).all() for g in got):
            return Verdict("unwritten or non-finite gradient")
        expected, eager = self._reference_grads(torch.float64), self._reference_grads(None)
        worst = (0.0, None, None)
        for name, g, e, x in zip(("dq", "dk", "dv", "dbias"), got, eager, expected):
            floor = ERROR_FLOOR[self.problem.dtype] * max(x.abs().max().item(), 1.0)
            allowed = 2 * (e.double() - x).abs().max().item() + floor
            error = (g.double() - x).abs().max().item()
            if not error <= allowed:
                return Verdict(f"{name}: error {error:.3g} > allowed {allowed:.3g}", error, allowed)
            worst = max(worst, (error / allowed, error, allowed), key=lambda item: item[0])
        return Verdict(None, worst[1], worst[2])
