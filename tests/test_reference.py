"""`fwagen.reference` against a literal transcription of the canonical Swin V1 code (DESIGN.md section 1).

Everything runs in float64 on fresh random inputs, so the only difference allowed between two orders of the
same computation is float64 rounding: 1e-12 absolute on outputs of magnitude ~1 is a thousand times the
unit roundoff accumulated over the few hundred operations of one row.
"""
from __future__ import annotations

import pytest
import torch

from fwagen.reference import (
    log_sum_exp_reference,
    relative_position_bias,
    relative_position_index,
    shifted_window_mask,
    window_attention_reference,
)

F64_ATOL = 1e-12


def fresh_generator() -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(torch.seed() % (2**31))
    return gen


# --- the canonical Swin V1 code, transcribed literally -----------------------------------------------------
# From microsoft/Swin-Transformer models/swin_transformer.py (WindowAttention.__init__/forward,
# window_partition, SwinTransformerBlock.__init__'s attn_mask), with the module state passed as arguments.


def swin_relative_position_index(window_size):
    coords_h = torch.arange(window_size[0])
    coords_w = torch.arange(window_size[1])
    coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))  # 2, Wh, Ww
    coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # 2, Wh*Ww, Wh*Ww
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
    relative_coords[:, :, 0] += window_size[0] - 1  # shift to start from 0
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    return relative_coords.sum(-1)  # Wh*Ww, Wh*Ww


def swin_window_attention_forward(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, window_size,
                                  relative_position_bias_table, relative_position_index, scale, mask=None):
    B_, N, C = x.shape
    qkv = torch.nn.functional.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(B_, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    q = q * scale
    attn = q @ k.transpose(-2, -1)

    bias = relative_position_bias_table[relative_position_index.view(-1)].view(
        window_size[0] * window_size[1], window_size[0] * window_size[1], -1)  # Wh*Ww,Wh*Ww,nH
    bias = bias.permute(2, 0, 1).contiguous()  # nH, Wh*Ww, Wh*Ww
    attn = attn + bias.unsqueeze(0)

    if mask is not None:
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, N, N)
        attn = torch.softmax(attn, dim=-1)
    else:
        attn = torch.softmax(attn, dim=-1)
    # attn_drop: rate 0 in every released config

    x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
    return torch.nn.functional.linear(x, proj_weight, proj_bias)


def swin_window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def swin_attn_mask(H, W, window_size, shift_size):
    img_mask = torch.zeros((1, H, W, 1))  # 1 H W 1
    h_slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    w_slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    cnt = 0
    for h in h_slices:
        for w in w_slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = swin_window_partition(img_mask, window_size)  # nW, window_size, window_size, 1
    mask_windows = mask_windows.view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))


# --- helpers -----------------------------------------------------------------------------------------------


class SwinCall:
    """Fresh random weights and inputs of one WindowAttention call, float64."""

    def __init__(self, batch, window_size, heads, head_dim, *, shift=True, image_windows=(2, 2)):
        gen = fresh_generator()
        wh, ww = window_size
        self.window_size, self.heads, self.head_dim = window_size, heads, head_dim
        self.n, self.c = wh * ww, heads * head_dim
        rows, cols = image_windows
        self.nw = rows * cols
        self.windows = batch * self.nw

        def rand(*shape, std=1.0):
            return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

        self.x = rand(self.windows, self.n, self.c)
        self.qkv_weight = rand(3 * self.c, self.c, std=self.c ** -0.5)
        self.qkv_bias = rand(3 * self.c, std=0.1)
        self.proj_weight = rand(self.c, self.c, std=self.c ** -0.5)
        self.proj_bias = rand(self.c, std=0.1)
        self.table = rand((2 * wh - 1) * (2 * ww - 1), heads, std=2.0)  # large enough to matter
        self.mask = None
        if shift:
            assert wh == ww, "Swin's shift mask is built for square windows"
            self.mask = swin_attn_mask(rows * wh, cols * ww, wh, wh // 2).double()

    def qkv(self):
        """q, k, v of shape (B_, H, N, d): views into the qkv Linear output, as the Swin code makes them."""
        qkv = torch.nn.functional.linear(self.x, self.qkv_weight, self.qkv_bias)
        qkv = qkv.reshape(self.windows, self.n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def swin(self, scale, *, use_mask=True):
        index = swin_relative_position_index(self.window_size)
        return swin_window_attention_forward(self.x, self.qkv_weight, self.qkv_bias, self.proj_weight,
                                             self.proj_bias, self.heads, self.window_size, self.table, index,
                                             scale, self.mask if use_mask else None)

    def fwagen(self, scale, *, use_mask=True):
        q, k, v = self.qkv()
        bias = relative_position_bias(self.table, *self.window_size)
        out = window_attention_reference(q, k, v, bias, self.mask if use_mask else None, scale)
        out = out.transpose(1, 2).reshape(self.windows, self.n, self.c)
        return torch.nn.functional.linear(out, self.proj_weight, self.proj_bias)


def random_qkv(windows, heads, n, d, gen):
    return torch.randn(3, windows, heads, n, d, generator=gen, dtype=torch.float64).unbind(0)


def per_window_attention(q, k, v, bias, mask, scale, mask_index):
    """Attention one (window, head) at a time; the mask of window b is mask[mask_index(b)]."""
    windows, heads, n, _ = q.shape
    out = torch.empty_like(q)
    for b in range(windows):
        for h in range(heads):
            logits = (q[b, h] * scale) @ k[b, h].T
            if bias is not None:
                logits = logits + bias[h]
            if mask is not None:
                logits = logits + mask[mask_index(b)]
            out[b, h] = torch.softmax(logits, dim=-1) @ v[b, h]
    return out


# --- the reference against the Swin code -------------------------------------------------------------------


@pytest.mark.parametrize("window, heads, head_dim", [(7, 3, 32), (4, 2, 8), (3, 4, 5)])
def test_reference_matches_swin_v1_forward_with_bias_and_shift_mask(window, heads, head_dim):
    call = SwinCall(2, (window, window), heads, head_dim)
    scale = head_dim ** -0.5
    expected = call.swin(scale)
    torch.testing.assert_close(call.fwagen(scale), expected, rtol=0, atol=F64_ATOL)
    # The mask has cross-region entries, so it changed the result (the comparison above is not vacuous).
    assert (call.mask == -100).any()
    assert (call.swin(scale, use_mask=False) - expected).abs().max() > 1e-3


def test_reference_matches_swin_v1_forward_without_mask():
    call = SwinCall(3, (7, 7), 3, 32, shift=False)
    torch.testing.assert_close(call.fwagen(32 ** -0.5), call.swin(32 ** -0.5), rtol=0, atol=F64_ATOL)


def test_reference_matches_swin_v1_forward_on_a_non_square_window():
    call = SwinCall(2, (3, 5), 2, 8, shift=False)
    torch.testing.assert_close(call.fwagen(8 ** -0.5), call.swin(8 ** -0.5), rtol=0, atol=F64_ATOL)


def test_custom_scale_is_applied_to_q_before_the_product():
    call = SwinCall(2, (4, 4), 2, 16)
    scale = 0.37  # not d ** -0.5 = 0.25
    expected = call.swin(scale)
    torch.testing.assert_close(call.fwagen(scale), expected, rtol=0, atol=F64_ATOL)
    assert (call.fwagen(None) - expected).abs().max() > 1e-3  # the custom scale really was used


def test_default_scale_is_inverse_square_root_of_head_dim():
    gen = fresh_generator()
    q, k, v = random_qkv(4, 3, 9, 12, gen)
    bias = torch.randn(3, 9, 9, generator=gen, dtype=torch.float64)
    default = window_attention_reference(q, k, v, bias)
    explicit = window_attention_reference(q, k, v, bias, scale=12 ** -0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    other = window_attention_reference(q, k, v, bias, scale=1.0)
    assert (default - other).abs().max() > 1e-3


def test_without_bias_or_mask_is_plain_softmax_attention():
    gen = fresh_generator()
    q, k, v = random_qkv(5, 2, 11, 7, gen)
    scale = 0.6
    expected = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(window_attention_reference(q, k, v, scale=scale), expected, rtol=0, atol=F64_ATOL)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(window_attention_reference(q, k, v, scale=scale), sdpa, rtol=0, atol=F64_ATOL)


def test_mask_applies_per_window_not_per_batch():
    gen = fresh_generator()
    batch, nw, heads, n, d = 2, 3, 2, 6, 4
    q, k, v = random_qkv(batch * nw, heads, n, d, gen)
    bias = torch.randn(heads, n, n, generator=gen, dtype=torch.float64)
    # Every window of the image has a different 0/-100 pattern; every row keeps at least itself.
    keep = (torch.rand(nw, n, n, generator=gen) < 0.5) | torch.eye(n, dtype=torch.bool)
    mask = torch.where(keep, 0.0, -100.0).double()
    scale = d ** -0.5

    out = window_attention_reference(q, k, v, bias, mask, scale)
    per_window = per_window_attention(q, k, v, bias, mask, scale, lambda b: b % nw)
    per_batch = per_window_attention(q, k, v, bias, mask, scale, lambda b: b // nw)
    torch.testing.assert_close(out, per_window, rtol=0, atol=F64_ATOL)
    # b // nW picks a different mask for windows 1, 2, 3 and 5, and that shows in the output.
    for b in (1, 2, 3, 5):
        assert (out[b] - per_batch[b]).abs().max() > 1e-3, f"window {b}"


def test_log_sum_exp_matches_the_logits_it_normalises():
    gen = fresh_generator()
    q, k, v = random_qkv(4, 2, 9, 8, gen)
    bias = torch.randn(2, 9, 9, generator=gen, dtype=torch.float64)
    mask = torch.where(torch.rand(2, 9, 9, generator=gen) < 0.7, 0.0, -100.0).double()
    lse = log_sum_exp_reference(q, k, bias, mask, 0.4)
    logits = (q * 0.4) @ k.transpose(-2, -1) + bias
    logits = (logits.view(2, 2, 2, 9, 9) + mask.unsqueeze(1).unsqueeze(0)).view(4, 2, 9, 9)
    torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=0, atol=F64_ATOL)
    # softmax(S) @ v == exp(S - lse) @ v: what the backward kernels will rely on.
    recomputed = torch.exp(logits - lse.unsqueeze(-1)) @ v
    torch.testing.assert_close(recomputed, window_attention_reference(q, k, v, bias, mask, 0.4),
                               rtol=0, atol=F64_ATOL)


# --- relative position index and bias ----------------------------------------------------------------------


@pytest.mark.parametrize("window_h, window_w", [(3, 5), (5, 3), (7, 7), (1, 4), (1, 1)])
def test_relative_position_index_follows_the_design_formula(window_h, window_w):
    index = relative_position_index(window_h, window_w)
    n = window_h * window_w
    assert index.shape == (n, n)
    for i in range(n):
        hi, wi = divmod(i, window_w)  # token i = hi * Ww + wi, row-major inside the window
        for j in range(n):
            hj, wj = divmod(j, window_w)
            expected = (hi - hj + window_h - 1) * (2 * window_w - 1) + (wi - wj + window_w - 1)
            assert index[i, j].item() == expected, (i, j)


@pytest.mark.parametrize("window_h, window_w", [(3, 5), (7, 7), (8, 8)])
def test_relative_position_index_matches_swin_code(window_h, window_w):
    expected = swin_relative_position_index((window_h, window_w))
    assert torch.equal(relative_position_index(window_h, window_w), expected)
    # Every table row is used, and only table rows exist.
    table_rows = (2 * window_h - 1) * (2 * window_w - 1)
    assert sorted(expected.unique().tolist()) == list(range(table_rows))


@pytest.mark.parametrize("window_h, window_w, heads", [(3, 5, 4), (7, 7, 3)])
def test_relative_position_bias_gathers_the_table_per_head(window_h, window_w, heads):
    gen = fresh_generator()
    table = torch.randn((2 * window_h - 1) * (2 * window_w - 1), heads, generator=gen, dtype=torch.float64)
    bias = relative_position_bias(table, window_h, window_w)
    n = window_h * window_w
    assert bias.shape == (heads, n, n)
    assert bias.dtype == table.dtype
    index = relative_position_index(window_h, window_w)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                assert bias[h, i, j].item() == table[index[i, j], h].item()
    # The same gather as the Swin code.
    swin = table[swin_relative_position_index((window_h, window_w)).view(-1)].view(n, n, -1).permute(2, 0, 1)
    assert torch.equal(bias, swin)


def test_relative_position_bias_passes_the_gradient_to_the_table():
    gen = fresh_generator()
    table = torch.randn(5 * 9, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 15, 15, generator=gen, dtype=torch.float64)
    (relative_position_bias(table, 3, 5) * weights).sum().backward()
    index = relative_position_index(3, 5).view(-1)
    expected = torch.zeros(45, 2, dtype=torch.float64).index_add_(0, index, weights.permute(1, 2, 0).reshape(-1, 2))
    torch.testing.assert_close(table.grad, expected, rtol=0, atol=F64_ATOL)


# --- the shifted-window mask -------------------------------------------------------------------------------

MASK_CASES = [(14, 14, 7, 3), (56, 56, 7, 3), (16, 16, 8, 4), (24, 12, 6, 3), (12, 12, 4, 2)]


@pytest.mark.parametrize("height, width, window, shift", MASK_CASES)
def test_shifted_window_mask_matches_swin_construction(height, width, window, shift):
    mask = shifted_window_mask(height, width, window, shift)
    expected = swin_attn_mask(height, width, window, shift)
    assert mask.shape == ((height // window) * (width // window), window * window, window * window)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("height, width, window, shift", MASK_CASES)
def test_shifted_window_mask_properties(height, width, window, shift):
    mask = shifted_window_mask(height, width, window, shift)
    assert set(mask.unique().tolist()) == {0.0, -100.0}  # finite -100, not -inf
    assert torch.equal(mask, mask.transpose(1, 2))  # "same region" is symmetric
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()  # a token always sees itself
    # Window 0 (top-left) does not reach the rolled-in border: no cross-region pairs.
    assert (mask[0] == 0).all()
    # The bottom-right window holds four regions: it is the most masked one.
    assert (mask[-1] == -100).sum() == (mask == -100).sum(dim=(1, 2)).max()
    columns = width // window
    # Windows of the last column (not the last row) mix two regions left/right, and vice versa.
    assert (mask[columns - 1] == -100).any() and (mask[-columns] == -100).any()
