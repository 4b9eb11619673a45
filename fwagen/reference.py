"""The exact Swin V1 window-attention computation in plain PyTorch (DESIGN.md section 1).

Any dtype, float64 included. This is both the correctness oracle of every test and the fallback the op
uses where no kernel applies (CPU tensors, float64, shapes outside the kernels' range).
"""
from __future__ import annotations

import torch


def window_attention_reference(q, k, v, bias=None, mask=None, scale=None):
    """Attention inside each window.

    q, k, v: (B_, H, N, d), B_ = batch * nW windows, batch index outermost.
    bias: (H, N, N) added to every window's logits of head h.
    mask: (nW, N, N) added to the logits of window b at index b % nW.
    scale: multiplies q before the product; d ** -0.5 when None.
    Returns (B_, H, N, d) in q's dtype. Additions follow torch's type promotion, as the reference code does
    (float32 bias on 16-bit logits gives float32 logits, then softmax; the product with v is in v's dtype).
    """
    windows, heads, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        mask_windows = mask.shape[0]
        attn = attn.view(windows // mask_windows, mask_windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    return attn.to(v.dtype) @ v


def log_sum_exp_reference(q, k, bias=None, mask=None, scale=None):
    """Per-row log-sum-exp of the logits, float32 or wider: what the kernels save for the backward."""
    windows, heads, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    attn = (q.double() * scale) @ k.double().transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.double().unsqueeze(0)
    if mask is not None:
        mask_windows = mask.shape[0]
        attn = attn.view(windows // mask_windows, mask_windows, heads, n, n) + mask.double().unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    return attn.logsumexp(dim=-1)


def relative_position_index(window_h: int, window_w: int) -> torch.Tensor:
    """index[i, j] = (hi - hj + Wh - 1) * (2 Ww - 1) + (wi - wj + Ww - 1), token i = hi * Ww + wi."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]
    return (relative[0] + window_h - 1) * (2 * window_w - 1) + (relative[1] + window_w - 1)


def relative_position_bias(table: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """Gather the (H, N, N) bias from a ((2Wh-1)(2Ww-1), H) table."""
    n = window_h * window_w
    index = relative_position_index(window_h, window_w).to(table.device)
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """The (nW, N, N) mask of a shifted Swin block: 0 inside one image region, -100 across regions."""
    region = torch.zeros(height, width)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[hs, ws] = label
            label += 1
    windows = region.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, -100.0)


def window_attention_gradients_reference(q, k, v, bias, mask, scale, grad_out):
    """Explicit gradients (dq, dk, dv, dbias or None) of `window_attention_reference`, computed in float32 (or
    float64 for float64 inputs) without autograd, so that it also runs inside an opaque op where autograd is
    not active. dbias sums dS over every window; the mask gets none."""
    windows, heads, n, d = q.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw, go = (t.to(work) for t in (q, k, v, grad_out))
    logits = (qw * scale) @ kw.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.to(work).unsqueeze(0)
    if mask is not None:
        mask_windows = mask.shape[0]
        logits = logits.view(windows // mask_windows, mask_windows, heads, n, n) + mask.to(work).unsqueeze(1).unsqueeze(0)
        logits = logits.view(-1, heads, n, n)
    p = logits.softmax(dim=-1)
    dv = p.transpose(-2, -1) @ go
    dp = go @ vw.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = (ds @ kw) * scale
    dk = (ds.transpose(-2, -1) @ qw) * scale
    dbias = None if bias is None else ds.sum(dim=0).to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias
