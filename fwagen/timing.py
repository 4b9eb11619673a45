"""The one timing function of fwagen, shared by the tuner, the benchmarks and the tests.

Each repetition is bracketed by its own pair of CUDA events; the L2 cache is flushed before each
repetition, outside the event pair, so that small shapes do not run from a warm cache. Results are
order statistics (median, 20th and 80th percentiles), never means: one launch is microseconds and a
single hiccup would dominate a mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Width of the middle 60% relative to the median; differences inside it are ties."""
        if self.median_ms <= 0:
            return math.inf
        return (self.p80_ms - self.p20_ms) / self.median_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        if not samples_ms:
            raise ValueError("no samples to summarise")
        ordered = sorted(samples_ms)
        return cls(
            median_ms=_percentile(ordered, 0.5),
            p20_ms=_percentile(ordered, 0.2),
            p80_ms=_percentile(ordered, 0.8),
            min_ms=ordered[0],
            reps=len(ordered),
        )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class NoCudaDevice(RuntimeError):
    """Timing was asked for where torch sees no CUDA device."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise NoCudaDevice("fwagen timing needs a CUDA device, and torch.cuda.is_available() is False")


_flush_buffers: dict[int, torch.Tensor] = {}


def _flush_l2() -> None:
    """Write a buffer twice the size of L2 on the current device, evicting whatever the last rep left."""
    device = torch.cuda.current_device()
    buf = _flush_buffers.get(device)
    if buf is None:
        nbytes = 2 * torch.cuda.get_device_properties(device).L2_cache_size
        buf = _flush_buffers[device] = torch.empty(nbytes, dtype=torch.int8, device="cuda")
    buf.zero_()


def _as_graph_replay(fn: Callable[[], object], warmup: int) -> Callable[[], None]:
    """Capture fn in a CUDA graph after warming it up on a side stream, as PyTorch's docs do."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _measure(
    fns: Sequence[Callable[[], object]], *, rounds: int, warmup: int, flush_l2: bool, use_graph: bool
) -> list[Timing]:
    """Time fns round-robin: every round runs each fn once, the starting fn rotating per round."""
    require_cuda()
    if rounds < 1:
        raise ValueError(f"need at least one repetition, got {rounds}")
    if use_graph:
        fns = [_as_graph_replay(fn, warmup) for fn in fns]
    for fn in fns:
        for _ in range(warmup):
            fn()
    events = [
        [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        for _ in fns
    ]
    torch.cuda.synchronize()
    for r in range(rounds):
        for i in _rotated(len(fns), r):
            if flush_l2:
                _flush_l2()
            start, end = events[i][r]
            start.record()
            fns[i]()
            end.record()
    torch.cuda.synchronize()
    return [Timing.from_samples([start.elapsed_time(end) for start, end in pairs]) for pairs in events]


def _rotated(count: int, shift: int) -> list[int]:
    shift %= count
    return list(range(shift, count)) + list(range(shift))


def time_cuda(
    fn: Callable[[], object], *, warmup: int = 10, reps: int = 50, flush_l2: bool = True, use_graph: bool = False
) -> Timing:
    """Time fn on the current stream; with use_graph, time replays of a CUDA graph of fn instead."""
    return _measure([fn], rounds=reps, warmup=warmup, flush_l2=flush_l2, use_graph=use_graph)[0]


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int = 30,
    warmup: int = 10,
    flush_l2: bool = True,
    use_graph: bool = False,
) -> dict[str, Timing]:
    """Time several candidates round-robin, so that clock and thermal drift hit them all alike."""
    names = list(fns)
    timings = _measure(
        [fns[name] for name in names], rounds=rounds, warmup=warmup, flush_l2=flush_l2, use_graph=use_graph
    )
    return dict(zip(names, timings))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of nbytes through torch, in GB/s counting bytes read plus bytes written."""
    require_cuda()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), warmup=3, reps=20, flush_l2=False)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(dtype: torch.dtype | str, n: int = 8192) -> float:
    """Rate of an n x n x n matrix product on random data (zeros run faster), in TFLOP/s."""
    require_cuda()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    timing = time_cuda(lambda: a @ b, warmup=3, reps=20, flush_l2=False)
    return 2 * n**3 / (timing.median_ms * 1e-3) / 1e12
