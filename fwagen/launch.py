"""The only place torch tensors become pointers, strides and a stream.

`validate` checks every argument of the public op and raises an error that names the argument and what
was expected. `kernel_ready` says whether tensors can go to a kernel as they are (16-byte aligned rows,
unit stride along the head dim). `launch_forward` launches a compiled variant on torch's current stream.
"""
from __future__ import annotations

import ctypes
import struct
from functools import lru_cache

import torch

from .compiler import load_kernel
from .variant import LSE_TYPE, DbiasSumVariant, Variant

KERNEL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate(q, k, v, bias=None, mask=None) -> None:
    """Raise TypeError/ValueError naming the offending argument; return None when the inputs are usable."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions (windows, heads, tokens, head_dim), got shape {_shape(t)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v: expected the shape of q {_shape(q)}, got k {_shape(k)} and v {_shape(v)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v: expected q's dtype {q.dtype}, got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k and v: expected q's device {q.device}, got k on {k.device} and v on {v.device}")
    windows, heads, n, _ = q.shape
    for name, t, lead in (("bias", bias, heads), ("mask", mask, None)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
        expected = f"({'heads=' + str(heads) if lead else 'windows_per_image'}, {n}, {n})"
        if t.dim() != 3 or t.shape[1:] != (n, n) or (lead is not None and t.shape[0] != lead):
            raise ValueError(f"{name}: expected shape {expected}, got {_shape(t)}")
    if mask is not None:
        if mask.shape[0] == 0 or windows % mask.shape[0]:
            raise ValueError(f"mask: its {mask.shape[0]} windows per image must divide the {windows} windows of q "
                             "(the batch index is outermost: window b uses mask[b % nW])")
        if mask.requires_grad:
            raise ValueError("mask: the shifted-window mask receives no gradient; pass mask.detach()")


def empty_lse(q: torch.Tensor) -> torch.Tensor:
    """The (windows, heads, N) log-sum-exp buffer the forward writes for q's dtype (variant.LSE_TYPE; float64 for
    float64 inputs, which no kernel takes)."""
    dtype = getattr(torch, LSE_TYPE[KERNEL_DTYPES[q.dtype]]) if q.dtype in KERNEL_DTYPES else torch.float64
    return q.new_empty(q.shape[:3], dtype=dtype)


def kernel_ready(*tensors: torch.Tensor) -> bool:
    """True when every tensor has a unit-stride last dim and 16-byte aligned base and row/head/window strides,
    and one window's rows span less than 2^31 elements (in-window offsets are 32-bit in the kernels)."""
    for t in tensors:
        size = t.element_size()
        window, head, token, last = t.stride()
        if last != 1 and t.shape[3] > 1:
            return False
        if (t.data_ptr() | window * size | head * size | token * size) & 15:
            return False
        if t.shape[2] * token >= 2**31:
            return False
    return True


# Kernel parameters packed as the C ABI lays them out (struct's native mode aligns each field as the compiler
# does) and handed to cuLaunchKernel in one buffer: a call costs a few microseconds of host time instead of the
# tens that building one numpy scalar per argument took.
_TENSOR = "Pqqi"  # pointer, window and head strides (64-bit), token stride (32-bit)
_FORWARD_ARGS = struct.Struct("@" + "PPPqqiqqiqqi" + _TENSOR + "PPP" + "iiifi")
_BACKWARD_ARGS = struct.Struct("@" + "PPPqqiqqiqqi" + "PPqqi" + "PPPP" + "PPPqqi" + "P" + "iiifi")
_ROW_DELTA_ARGS = struct.Struct("@" + "PPqqi" + "P" + "ii")
_DBIAS_SUM_ARGS = struct.Struct("@" + "PP" + "iii")
_LAUNCH_END, _LAUNCH_BUFFER, _LAUNCH_SIZE = 0, 1, 2  # CU_LAUNCH_PARAM_END, _BUFFER_POINTER, _BUFFER_SIZE


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(window, head, token) strides in elements; the head dim is contiguous (see kernel_ready)."""
    return t.stride()[:3]


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _launch(loaded, variant: Variant, blocks: int, packed: bytes, device: torch.device,
            offsets: tuple[int, ...] | None = None) -> None:
    """Launch with the parameters in one packed buffer laid out as the kernel's; with `offsets` (where each parameter
    starts in the buffer), as an array of pointers into it instead, for kernels whose layout the driver decides
    (tensor maps)."""
    from cupy_backends.cuda.api import driver

    buffer = ctypes.create_string_buffer(packed, len(packed))
    if offsets is None:
        size = ctypes.c_size_t(len(packed))
        extra = (ctypes.c_void_p * 5)(_LAUNCH_BUFFER, ctypes.addressof(buffer), _LAUNCH_SIZE, ctypes.addressof(size),
                                      _LAUNCH_END)
        params, extra_at = 0, ctypes.addressof(extra)
    else:
        pointers = (ctypes.c_void_p * len(offsets))(*(ctypes.addressof(buffer) + at for at in offsets))
        params, extra_at = ctypes.addressof(pointers), 0
    if device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):
            driver.launchKernel(loaded.handle, blocks, 1, 1, variant.threads, 1, 1, variant.smem_bytes,
                                _current_stream(device), params, extra_at)
    else:
        driver.launchKernel(loaded.handle, blocks, 1, 1, variant.threads, 1, 1, variant.smem_bytes,
                            _current_stream(device), params, extra_at)


_plans: dict[tuple, tuple] = {}


def _plan(variant: Variant, device_index: int, windows: int, heads: int, mask_windows: int):
    """(loaded kernel, blocks, splits) of a call shape, memoized: a repeated call shape costs one lookup."""
    slot = (variant.key(), device_index, windows, heads, mask_windows)
    plan = _plans.get(slot)
    if plan is None:
        loaded = load_kernel(variant, device_index)
        plan = _plans[slot] = (loaded, *variant.grid(windows, heads, mask_windows, loaded.resident_blocks))
    return plan


# TMA tensor maps (CUtensorMap, 128 bytes), passed by value after the scalar parameters. The driver lays such a kernel's
# parameters out itself (the maps at 16-byte boundaries, cuFuncGetParamInfo on an H100), so those kernels take theirs
# as an array of pointers into the packed buffer (`_launch`'s offsets), where each map sits 64-byte aligned.
_TENSOR_MAP_BYTES, _TENSOR_MAP_ALIGN = 128, 64
_TMA_UINT16, _TMA_SWIZZLE_64B, _TMA_L2_PROMOTION_128B = 1, 2, 2  # CUtensorMapDataType, ...Swizzle, ...L2promotion


def _encode_tiled(address: int, dims: tuple[int, ...], strides: tuple[int, ...], box: tuple[int, ...]) -> bytes:
    """cuTensorMapEncodeTiled for 16-bit elements in the 64-byte swizzle, no interleave, zeros outside the tensor.
    dims and box innermost first; strides in bytes of dims 1 and up."""
    rank = len(dims)
    encode = _driver().cuTensorMapEncodeTiled
    storage = ctypes.create_string_buffer(_TENSOR_MAP_BYTES + _TENSOR_MAP_ALIGN)  # the driver wants it 64-byte aligned
    at = ctypes.addressof(storage)
    at += -at % _TENSOR_MAP_ALIGN
    result = encode(ctypes.c_void_p(at), _TMA_UINT16, rank, ctypes.c_void_p(address),
                    (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides),
                    (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)),
                    0, _TMA_SWIZZLE_64B, _TMA_L2_PROMOTION_128B, 0)
    if result != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {result}) for dims {dims}, strides {strides}, "
                           f"box {box} at {address:#x}")
    return ctypes.string_at(at, _TENSOR_MAP_BYTES)


@lru_cache(maxsize=1)
def _driver():
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuTensorMapEncodeTiled.restype = ctypes.c_int
    return driver


@lru_cache(maxsize=256)
def _key_value_map(address: int, shape: tuple[int, ...], strides: tuple[int, ...], element_bytes: int,
                   key_tile: int) -> bytes:
    """The tensor map of a (windows, heads, N, d) k or v view: boxes of key_tile rows of 32 columns (the 64-byte
    swizzle's row), columns past d and rows past N read as zeros. Memoized: a map depends on nothing else."""
    windows, heads, n, d = shape
    window, head, token = (s * element_bytes for s in strides[:3])
    return _encode_tiled(address, (d, n, heads, windows), (token, head, window), (32, key_tile, 1, 1))


def _append_tensor_maps(packed: bytes, maps: list[bytes]) -> bytes:
    """The packed scalars, then the tensor maps, each 64-byte aligned from the buffer's start."""
    return packed + bytes(-len(packed) % _TENSOR_MAP_ALIGN) + b"".join(maps)


@lru_cache(maxsize=None)
def _parameter_offsets(layout: struct.Struct, tensor_maps: int) -> tuple[int, ...]:
    """Where each parameter starts in `layout`'s packed buffer followed by `tensor_maps` maps (_append_tensor_maps)."""
    codes = layout.format.lstrip("@")
    scalars = tuple(struct.calcsize("@" + codes[:i] + "0" + code) for i, code in enumerate(codes))
    first_map = layout.size + -layout.size % _TENSOR_MAP_ALIGN
    return scalars + tuple(first_map + i * _TENSOR_MAP_BYTES for i in range(tensor_maps))


def launch_forward(variant: Variant, q, k, v, out, lse, bias, mask, scale: float) -> None:
    """Launch `variant` writing `out` (any strides with a unit last stride) and `lse` (windows, heads, N)."""
    device = q.device
    windows, heads, _, _ = q.shape
    mask_windows = 0 if mask is None else mask.shape[0]
    loaded, blocks, splits = _plan(variant, device.index, windows, heads, mask_windows)
    if blocks == 0:
        return
    packed = _FORWARD_ARGS.pack(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), *_strides(q), *_strides(k), *_strides(v),
        out.data_ptr(), *_strides(out), lse.data_ptr(), _pointer(bias), _pointer(mask),
        windows, heads, mask_windows, scale, splits,
    )
    if variant.tensor_maps:
        packed = _append_tensor_maps(packed, [_key_value_map(t.data_ptr(), tuple(t.shape), t.stride(),
                                                             t.element_size(), variant.key_tile) for t in (k, v)])
        _launch(loaded, variant, blocks, packed, device, _parameter_offsets(_FORWARD_ARGS, 2))
    else:
        _launch(loaded, variant, blocks, packed, device)


def launch_backward(variant: Variant, q, k, v, out, dout, lse, bias, mask, scale: float):
    """(dqkv, dbias): the gradients of q, k and v in one (windows, N, 3, heads, d) buffer, the layout of a qkv
    Linear's output, and, when `bias` is given, of the bias, summed over windows in a fixed order (per-block
    float32 partials, then one reduction)."""
    device = q.device
    windows, heads, n, d = q.shape
    if dout.stride() != out.stride():
        dout = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=device).copy_(dout)
    mask_windows = 0 if mask is None else mask.shape[0]
    loaded, blocks, splits = _plan(variant, device.index, windows, heads, mask_windows)
    grads = torch.empty(windows, n, 3, heads, d, dtype=q.dtype, device=device)
    dq, dk, dv = (grads[:, :, i].transpose(1, 2) for i in range(3))
    partial_shape = variant.dbias_partials(heads, mask_windows, splits)
    allocate = torch.empty if blocks else torch.zeros  # no windows: nothing runs, and dbias is zero
    partial = allocate(partial_shape, dtype=torch.float32, device=device)
    delta = None
    if variant.prepass is not None and blocks:
        delta = torch.empty(windows, heads, n, dtype=torch.float32, device=device)
        prepass, prepass_blocks, _ = _plan(variant.prepass, device.index, windows, heads, mask_windows)
        _launch(prepass, variant.prepass, prepass_blocks,
                _ROW_DELTA_ARGS.pack(out.data_ptr(), dout.data_ptr(), *_strides(out), delta.data_ptr(), windows, heads),
                device)
    packed = _BACKWARD_ARGS.pack(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), *_strides(q), *_strides(k), *_strides(v),
        out.data_ptr(), dout.data_ptr(), *_strides(out), lse.data_ptr(), _pointer(delta), _pointer(bias),
        _pointer(mask),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), *_strides(dq), partial.data_ptr(),
        windows, heads, mask_windows, scale, splits,
    )
    if blocks:
        _launch(loaded, variant, blocks, packed, device)
    dbias = None
    if bias is not None:
        dbias = torch.empty(heads, n, n, dtype=torch.float32, device=device)
        sum_dbias_partials(variant, partial, dbias)
    return grads, dbias


def sum_dbias_partials(variant: Variant, partial: torch.Tensor, dbias: torch.Tensor) -> None:
    """dbias (heads, N, N, float32) = the (outer, heads, inner, N, N) float32 partial sums of `variant`'s backward,
    summed over outer, then inner, in that order (dbias_sum.cu.j2)."""
    outer, heads, inner, n, _ = partial.shape
    summing = DbiasSumVariant(variant.problem)
    loaded, blocks, _ = _plan(summing, partial.device.index, 0, heads, 0)
    if blocks:
        _launch(loaded, summing, blocks,
                _DBIAS_SUM_ARGS.pack(partial.data_ptr(), dbias.data_ptr(), outer, heads, inner), partial.device)
