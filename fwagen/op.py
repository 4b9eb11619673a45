"""The torch.library op: `fwagen::window_attention_fwd`, its fake implementation and autograd.

The op runs a compiled kernel for CUDA tensors in float16, bfloat16 or float32 whose shape a kernel
covers; anything else (CPU tensors, float64, N > 1024, odd head dims) runs the reference with a one-time
warning that says why. The backward runs a kernel wherever the forward does (see `space.default_backward`:
tensor cores for float16/bfloat16, whole-window up to 144 tokens and tiled past that; CUDA cores for float32)
and differentiates the reference elsewhere.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from . import dispatch
from .compiler import device_arch
from .launch import KERNEL_DTYPES, empty_lse, kernel_ready, launch_backward, launch_forward, validate
from .problem import MAX_HEAD_DIM, MAX_N, Problem
from .reference import log_sum_exp_reference, window_attention_gradients_reference, window_attention_reference

LAYOUTS = ("bhnd", "bnc")
_warned: set[str] = set()


def _warn_once(reason: str, stacklevel: int) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fwagen: {reason}; running the PyTorch reference instead", stacklevel=stacklevel + 1)


def _no_kernel_reason(q: torch.Tensor) -> str | None:
    n, d = q.shape[2], q.shape[3]
    if not q.is_cuda:
        return f"no kernel for {q.device.type} tensors"
    if q.dtype not in KERNEL_DTYPES:
        return f"no kernel for dtype {q.dtype}"
    if not 1 <= n <= MAX_N:
        return f"no kernel for N={n} tokens per window (kernels cover 1..{MAX_N})"
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
        return f"no kernel for head_dim={d} (kernels cover multiples of 8 up to {MAX_HEAD_DIM})"
    if not _cupy_available():
        return "CuPy is not installed (pip install 'fwagen[cuda13]' or 'fwagen[cuda12]')"
    return None


@functools.lru_cache(maxsize=1)
def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _to_layout(out_bhnd: torch.Tensor, token_major: bool) -> torch.Tensor:
    if not token_major:
        return out_bhnd
    windows, heads, n, d = out_bhnd.shape
    return out_bhnd.transpose(1, 2).reshape(windows, n, heads * d)


def _empty_outputs(q: torch.Tensor, token_major: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(returned output, the same memory seen as (windows, heads, N, d), lse)."""
    windows, heads, n, d = q.shape
    if token_major:
        out = q.new_empty(windows, n, heads * d)
        view = out.view(windows, n, heads, d).transpose(1, 2)
    else:
        out = view = q.new_empty(windows, heads, n, d)
    lse = empty_lse(q)
    return out, view, lse


_choices: dict[tuple, object] = {}
_backward_choices: dict[tuple, object] = {}
dispatch.on_reload(_choices.clear)  # after a tune or a changed FWAGEN_TUNED_DIR, forget memoized choices
dispatch.on_reload(_backward_choices.clear)


def _forward_variant(q, has_bias: bool, has_mask: bool):
    """The dispatched forward variant for this call shape, memoized per shape, dtype and device."""
    slot = (q.shape, q.dtype, has_bias, has_mask, q.device.index)
    variant = _choices.get(slot)
    if variant is None:
        problem = Problem(q.shape[2], q.shape[3], KERNEL_DTYPES[q.dtype], has_bias, has_mask)
        variant = dispatch.choose_for(problem, q.shape[0] * q.shape[1], device_arch(q.device.index),
                                      q.device.index).variant
        _choices[slot] = variant
    return variant


def _float32_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or mask as the kernels read it: float32, contiguous, and 16-byte aligned (they copy its rows 16 bytes at
    a time where N is a multiple of 4; a contiguous view can start at any element of its storage)."""
    if t is None:
        return None
    t = t.float().contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _forward(q, k, v, bias, mask, scale: float, token_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in the requested layout, log-sum-exp): a kernel where one covers the inputs, else the reference."""
    if _no_kernel_reason(q) is not None:  # the public wrapper has warned, pointing at the caller
        out = window_attention_reference(q, k, v, bias, mask, scale)
        lse = log_sum_exp_reference(q, k, bias, mask, scale).to(empty_lse(q).dtype)
        return _to_layout(out, token_major).contiguous(), lse
    if not kernel_ready(q, k, v):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias, mask = _float32_operand(bias), _float32_operand(mask)
    variant = _forward_variant(q, bias is not None, mask is not None)
    out, out_bhnd, lse = _empty_outputs(q, token_major)
    launch_forward(variant, q, k, v, out_bhnd, lse, bias, mask, scale)
    return out, lse


@torch.library.custom_op("fwagen::window_attention_fwd", mutates_args=())
def window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                         mask: torch.Tensor | None, scale: float, token_major: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, bias, mask, scale, token_major)


@window_attention_fwd.register_fake
def _(q, k, v, bias, mask, scale, token_major):
    out, _, lse = _empty_outputs(q, token_major)
    return out, lse


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, token_major = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # saved for the backward kernels; not a differentiable output
    ctx.save_for_backward(q, k, v, bias, mask, out, lse)
    ctx.scale, ctx.token_major = scale, token_major


def _backward_kernel(q, bias, mask):
    """The backward variant for these inputs, or None where the reference must be differentiated."""
    if _no_kernel_reason(q) is not None:
        return None
    slot = (q.shape, q.dtype, bias is not None, mask is not None, q.device.index)
    if slot not in _backward_choices:
        problem = Problem(q.shape[2], q.shape[3], KERNEL_DTYPES[q.dtype], bias is not None, mask is not None, "bwd")
        _backward_choices[slot] = dispatch.choose_backward_for(problem, q.shape[0] * q.shape[1],
                                                               device_arch(q.device.index), q.device.index).variant
    return _backward_choices[slot]


def _refuse_second_order() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("fwagen.window_attention: second-order gradients (create_graph=True) are not supported")


def _split_qkv(dqkv: torch.Tensor):
    """Three (windows, heads, N, d) views of a (windows, N, 3, heads, d) gradient buffer."""
    return tuple(g.transpose(1, 2) for g in dqkv.unbind(2))


def _gradients(q, k, v, bias, mask, out, lse, scale: float, token_major: bool, bias_needs_grad: bool, grad_out):
    """(dqkv, dbias or None), dqkv holding the gradients of q, k and v as (windows, N, 3, heads, d): the backward
    kernel where one covers the inputs, else autograd of the reference."""
    windows, heads, n, d = q.shape
    if token_major:
        grad_out = grad_out.contiguous().view(windows, n, heads, d).transpose(1, 2)
        out = out.view(windows, n, heads, d).transpose(1, 2)
    variant = _backward_kernel(q, bias, mask)
    if variant is not None:
        if not kernel_ready(q, k, v):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bias32, mask32 = _float32_operand(bias), _float32_operand(mask)
        dqkv, dbias = launch_backward(variant, q, k, v, out, grad_out.contiguous() if not token_major else grad_out,
                                      lse, bias32, mask32, scale)
        return dqkv, (dbias.to(bias.dtype) if dbias is not None and bias_needs_grad else None)
    dq, dk, dv, dbias = window_attention_gradients_reference(q, k, v, bias, mask, scale, grad_out)
    dqkv = torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2)
    return dqkv, (dbias if bias_needs_grad else None)


@torch.library.custom_op("fwagen::window_attention_bwd", mutates_args=())
def window_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                         mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                         scale: float, token_major: bool, bias_needs_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward as an opaque op, so that torch.compile's backward graph calls it rather than tracing into
    the launch. dbias comes back empty when there is none."""
    dqkv, dbias = _gradients(q, k, v, bias, mask, out, lse, scale, token_major, bias_needs_grad, grad_out)
    return dqkv, (q.new_empty(0, dtype=torch.float32) if dbias is None else dbias)


@window_attention_bwd.register_fake
def _(q, k, v, bias, mask, out, lse, grad_out, scale, token_major, bias_needs_grad):
    windows, heads, n, d = q.shape
    dbias = bias.new_empty(heads, n, n) if bias is not None and bias_needs_grad else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(windows, n, 3, heads, d), dbias


def _backward(ctx, grad_out, grad_lse):
    _refuse_second_order()
    q, k, v, bias, mask, out, lse = ctx.saved_tensors
    dqkv, dbias = torch.ops.fwagen.window_attention_bwd(q, k, v, bias, mask, out, lse, grad_out, ctx.scale,
                                                        ctx.token_major, bool(ctx.needs_input_grad[3]))
    return (*_split_qkv(dqkv), dbias if bias is not None and ctx.needs_input_grad[3] else None, None, None, None)


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v as (windows, heads, N, d) views of a (windows, N, 3, heads, d) tensor."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# The op over the qkv Linear's output itself: its gradient is the backward's (windows, N, 3, heads, d) buffer as it
# comes, where q, k and v taken as views of qkv outside the op make autograd stack their three gradients into a new
# tensor (a copy that took 0.42 ms a training step at Swin's window 12 on an H100, as long as the rest of the
# backward).
@torch.library.custom_op("fwagen::window_attention_qkv_fwd", mutates_args=())
def window_attention_qkv_fwd(qkv: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, scale: float,
                             token_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*_qkv_views(qkv), bias, mask, scale, token_major)


@window_attention_qkv_fwd.register_fake
def _(qkv, bias, mask, scale, token_major):
    out, _, lse = _empty_outputs(_qkv_views(qkv)[0], token_major)
    return out, lse


def _setup_context_qkv(ctx, inputs, output):
    qkv, bias, mask, scale, token_major = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, bias, mask, out, lse)
    ctx.scale, ctx.token_major = scale, token_major


def _backward_qkv(ctx, grad_out, grad_lse):
    _refuse_second_order()
    qkv, bias, mask, out, lse = ctx.saved_tensors
    bias_needs_grad = bias is not None and ctx.needs_input_grad[1]
    dqkv, dbias = torch.ops.fwagen.window_attention_bwd(*_qkv_views(qkv), bias, mask, out, lse, grad_out, ctx.scale,
                                                        ctx.token_major, bias_needs_grad)
    return dqkv, (dbias if bias_needs_grad else None), None, None, None


window_attention_qkv_fwd.register_autograd(_backward_qkv, setup_context=_setup_context_qkv)


class _EagerAutograd(torch.autograd.Function):
    """The same forward and backward for eager calls that need gradients, without the custom ops' dispatch
    layers (about a hundred microseconds of host time per call, measured on an H200 host); torch.compile
    traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, token_major):
        out, lse = _forward(q, k, v, bias, mask, scale, token_major)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.scale, ctx.token_major = scale, token_major
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_second_order()
        dqkv, dbias = _gradients(*ctx.saved_tensors, ctx.scale, ctx.token_major, ctx.needs_input_grad[3], grad_out)
        return (*_split_qkv(dqkv), dbias, None, None, None)


class _EagerAutogradQKV(torch.autograd.Function):
    """_EagerAutograd over the qkv tensor: its gradient is the backward's buffer itself (window_attention_qkv_fwd)."""

    @staticmethod
    def forward(ctx, qkv, bias, mask, scale, token_major):
        out, lse = _forward(*_qkv_views(qkv), bias, mask, scale, token_major)
        ctx.save_for_backward(qkv, bias, mask, out, lse)
        ctx.scale, ctx.token_major = scale, token_major
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_second_order()
        qkv, bias, mask, out, lse = ctx.saved_tensors
        dqkv, dbias = _gradients(*_qkv_views(qkv), bias, mask, out, lse, ctx.scale, ctx.token_major,
                                 ctx.needs_input_grad[1], grad_out)
        return dqkv, dbias, None, None, None


_SMALLEST_SCALE = torch.finfo(torch.float32).tiny
_LARGEST_SCALE = torch.finfo(torch.float32).max


def _checked_scale(scale) -> float:
    """`scale` as a float, which must be a positive, finite, normal float32. The large-window backward divides the
    bias and mask by it (to start its score accumulators in the units of q k^T): zero or a subnormal would make that
    term infinite. Negative scales, which no Swin model uses, are refused with them rather than carried as an
    untested case."""
    try:
        value = float(scale) if not isinstance(scale, (bool, str, bytes)) else None
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None:
        raise TypeError(f"scale: expected a number or None, got {type(scale).__name__}")
    if not (math.isfinite(value) and _SMALLEST_SCALE <= value <= _LARGEST_SCALE):
        raise ValueError(f"scale: expected a positive finite number (a normal float32), got {scale!r}")
    return value


def window_attention(q, k, v, bias=None, mask=None, scale=None, layout="bhnd"):
    """Swin window attention: softmax(scale * q k^T + bias[h] + mask[b % nW]) v.

    q, k, v: (windows, heads, N, head_dim), any strides (the permuted output of a qkv Linear is read in
    place). bias: (heads, N, N) or None. mask: (nW, N, N) or None, 0 / -100 as Swin builds it.
    scale: default head_dim ** -0.5. layout: "bhnd" returns (windows, heads, N, head_dim); "bnc" returns
    (windows, N, heads * head_dim), ready for the output projection. For q, k and v that are views of a qkv
    Linear's output, `window_attention_qkv` saves a copy of their gradients in training.
    """
    validate(q, k, v, bias, mask)
    return _attention((q, k, v), (q, k, v), bias, mask, scale, layout, _EagerAutograd,
                      torch.ops.fwagen.window_attention_fwd)


def window_attention_qkv(qkv, bias=None, mask=None, scale=None, layout="bhnd"):
    """`window_attention` of q, k and v packed as a qkv Linear's output: qkv is (windows, N, 3, heads, head_dim),
    any strides, q = qkv[:, :, 0] and so on (`linear(x).view(windows, N, 3, heads, head_dim)`). In training, the
    gradient of qkv comes back as the backward kernels write it, one tensor of qkv's shape: q, k and v taken as
    views of qkv and passed to `window_attention` make autograd stack their three gradients into a new tensor, a
    copy that costs as much as the rest of the backward at Swin's window 12 (H100)."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (windows, tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    q, k, v = _qkv_views(qkv)
    validate(q, k, v, bias, mask)
    return _attention((qkv,), (q, k, v), bias, mask, scale, layout, _EagerAutogradQKV,
                      torch.ops.fwagen.window_attention_qkv_fwd)


def _attention(inputs, qkv_views, bias, mask, scale, layout, eager_function, op):
    """The public functions' body: `inputs` are (q, k, v) or (qkv,), as `eager_function` and `op` take them;
    qkv_views the q, k and v they hold (validated)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    q = qkv_views[0]
    scale = _checked_scale(q.shape[-1] ** -0.5 if scale is None else scale)
    if not torch.compiler.is_compiling():  # a traced graph cannot warn; the eager call before it has
        reason = _no_kernel_reason(q)
        if reason is not None:
            _warn_once(reason, stacklevel=3)
    token_major = layout == "bnc"
    if torch.compiler.is_compiling():
        return op(*inputs, bias, mask, scale, token_major)[0]
    if torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or (bias is not None and bias.requires_grad)):
        if q.is_cuda and _backward_kernel(q, bias, mask) is None:
            # No backward kernel covers these inputs: plain autograd of the reference costs what eager
            # PyTorch costs, where the kernel forward plus a recomputing backward would cost more.
            return _to_layout(window_attention_reference(*qkv_views, bias, mask, scale), token_major)
        return eager_function.apply(*inputs, bias, mask, scale, token_major)
    return _forward(*qkv_views, bias, mask, scale, token_major)[0]
