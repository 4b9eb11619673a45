"""A problem class: what a kernel must compute, independent of how.

Batch size, number of windows and heads are *not* part of it: they are runtime arguments of every kernel,
so a new batch never compiles anything. Only the work bucket (windows x heads, rounded to a power of 4)
varies with them, and it only selects among already-compiled variants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32")
MAX_N = 1024
MAX_HEAD_DIM = 128


def pad_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def work_bucket(items: int) -> int:
    """Round windows x heads to a power of 4 so that small and large batches may tune apart."""
    return 4 ** max(0, round(math.log(max(items, 1), 4)))


@dataclass(frozen=True)
class Problem:
    n: int  # tokens per window
    head_dim: int
    dtype: str  # one of DTYPES
    has_bias: bool = True
    has_mask: bool = False
    direction: str = "fwd"

    def __post_init__(self):
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"tokens per window N={self.n}: expected 1..{MAX_N}")
        if self.head_dim % 8 or not 8 <= self.head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"head_dim={self.head_dim}: expected a multiple of 8 in 8..{MAX_HEAD_DIM}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {DTYPES}")
        if self.direction not in ("fwd", "bwd"):
            raise ValueError(f"direction={self.direction!r}: expected 'fwd' or 'bwd'")

    @property
    def uses_tensor_cores(self) -> bool:
        return self.dtype != "float32"

    def key(self) -> str:
        flags = ("b" if self.has_bias else "") + ("m" if self.has_mask else "")
        return f"{self.direction}_n{self.n}_d{self.head_dim}_{self.dtype}_{flags or 'plain'}"
