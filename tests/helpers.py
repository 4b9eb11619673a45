"""Inputs and the error rule shared by the tests."""
from __future__ import annotations

import torch

from fwagen.reference import window_attention_reference

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def make_inputs(windows, heads, n, d, dtype, *, bias=True, mask_windows=0, qkv_strided=False, device="cuda",
                seed=None):
    """Fresh random q, k, v (optionally as views into one (windows, N, 3, H, d) qkv buffer), float32 bias and
    a 0/-100 mask. Never zeros."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed() % (2**31))
    if qkv_strided:
        qkv = torch.randn(windows, n, 3, heads, d, generator=gen, device=device).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = torch.randn(3, windows, heads, n, d, generator=gen, device=device).to(dtype).unbind(0)
    b = torch.randn(heads, n, n, generator=gen, device=device) * 2 if bias else None
    m = None
    if mask_windows:
        keep = torch.rand(mask_windows, n, n, generator=gen, device=device) < 0.7
        keep |= torch.eye(n, dtype=torch.bool, device=device)  # every row keeps at least itself
        m = torch.where(keep, 0.0, -100.0)
    return q, k, v, b, m


def minus_inf_mask(mask_windows, n, device="cuda"):
    """A mask of -inf (where Swin uses a finite -100): in window w, every third row from row w % 3 blocks its
    first three quarters of keys, so whole leading key tiles of those rows hold nothing but -inf. Every row
    keeps its last quarter, so no row is fully masked."""
    m = torch.zeros(mask_windows, n, n, device=device)
    for w in range(mask_windows):
        m[w, w % 3::3, : (3 * n) // 4] = float("-inf")
    return m


def reference64(q, k, v, b, m, scale=None):
    return window_attention_reference(q.double(), k.double(), v.double(), None if b is None else b.double(),
                                      None if m is None else m.double(), scale)


def eager_error(q, k, v, b, m, expected, scale=None):
    """Max abs error of eager PyTorch in q's dtype (the reference op order) against float64."""
    eager = window_attention_reference(q, k, v, b, m, scale)
    return (eager.double() - expected).abs().max().item()


def allowed_error(q, k, v, b, m, expected, scale=None):
    """The rule: at most twice eager PyTorch's error in the same dtype, plus a small absolute floor."""
    # One unit in the last place at magnitude 1: the rounding of the output itself.
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[q.dtype]
    return 2 * eager_error(q, k, v, b, m, expected, scale) + floor
