"""The launcher's side of the kernel ABI, on the CPU: the packed parameter buffers match the parameter lists
of the rendered kernels (a parameter added to a template and not to launch.py would shift every one after it)."""
from __future__ import annotations

import re
import struct

import pytest
import torch

from fwagen.compiler import compile_variant
from fwagen.launch import (_BACKWARD_ARGS, _DBIAS_SUM_ARGS, _FORWARD_ARGS, _ROW_DELTA_ARGS, _append_tensor_maps,
                           _parameter_offsets, empty_lse)
from fwagen.problem import Problem
from fwagen.render import render
from fwagen.space import default_backward, default_variant, wgmma_variants
from fwagen.variant import BackwardVariant, DbiasSumVariant

C_TO_STRUCT = {"long long": "q", "int": "i", "float": "f", "const __grid_constant__ fwagen::TensorMap": "M"}


def packed_codes(source: str) -> str:
    """struct codes of a rendered kernel's parameters: pointers P, long long q, int i, float f, and M for a TMA tensor
    map passed by value."""
    params = re.search(r'extern "C" __global__ void[^(]*\([^)]*\)\s*\w+\((.*?)\)\s*\{', source, re.S).group(1)
    codes = []
    for param in (p.strip() for p in params.split(",")):
        if "*" in param:
            codes.append("P")
        else:
            codes.append(C_TO_STRUCT[re.sub(r"\s+\w+$", "", param).strip()])
    return "".join(codes)


@pytest.mark.parametrize("problem", [Problem(49, 32, "float16", True, True), Problem(64, 16, "float32", True, False)],
                         ids=lambda p: p.key())
def test_forward_parameters_match_the_packed_buffer(problem):
    assert packed_codes(render(default_variant(problem))) == _FORWARD_ARGS.format.lstrip("@")


def test_tma_forward_takes_the_packed_buffer_then_two_tensor_maps():
    # K and V come by TMA: launch.py packs the scalar parameters, then K's and V's maps, and hands the driver a pointer
    # to each parameter in that buffer. The wgmma kinds that copy K and V themselves take the plain buffer.
    variants = list(wgmma_variants(Problem(256, 32, "bfloat16", True, True)))
    by_tma = next(v for v in variants if v.tensor_maps)
    by_threads = next(v for v in variants if not v.tensor_maps)
    assert packed_codes(render(by_tma)) == _FORWARD_ARGS.format.lstrip("@") + "MM"
    assert packed_codes(render(by_threads)) == _FORWARD_ARGS.format.lstrip("@")
    maps = [bytes(range(128)), bytes(range(128, 256))]
    packed = _FORWARD_ARGS.pack(*([0] * 3 + [0, 0, 0] * 3 + [0, 0, 0, 0] + [0] * 3 + [1, 2, 0, 1.0, 1]))
    params = _append_tensor_maps(packed, maps)
    assert len(params) % 64 == 0 and params[: len(packed)] == packed
    assert params[-256:] == b"".join(maps) and len(params) - 256 == -(-len(packed) // 64) * 64
    offsets = _parameter_offsets(_FORWARD_ARGS, 2)
    assert len(offsets) == len(_FORWARD_ARGS.format.lstrip("@")) + 2
    for code, at, value in zip(_FORWARD_ARGS.format.lstrip("@"), offsets, _FORWARD_ARGS.unpack(packed)):
        assert struct.unpack_from("@" + code, params, at)[0] == value
    assert [params[at:at + 128] for at in offsets[-2:]] == maps


def backward_variants():
    """One variant of every backward kind and of both whole-window layouts."""
    return [default_backward(Problem(49, 32, "bfloat16", True, True, "bwd")),
            BackwardVariant(Problem(144, 32, "bfloat16", True, True, "bwd")),
            default_backward(Problem(576, 32, "bfloat16", True, True, "bwd")),
            default_backward(Problem(576, 32, "float32", True, True, "bwd"))]


def test_backward_parameters_match_the_packed_buffer():
    variants = backward_variants()
    assert {(v.kind, getattr(v, "large_window", None)) for v in variants} == {
        ("bwd_mma", False), ("bwd_mma", True), ("bwd_tile", None), ("bwd_simt", None)}
    for variant in variants:
        assert packed_codes(render(variant)) == _BACKWARD_ARGS.format.lstrip("@"), variant.key()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_row_delta_prepass_parameters_match_the_packed_buffer(dtype):
    variant = default_backward(Problem(576, 32, dtype, True, True, "bwd"))
    assert variant.prepass is not None
    assert packed_codes(render(variant.prepass)) == _ROW_DELTA_ARGS.format.lstrip("@")


@pytest.mark.parametrize("n", [49, 144])
def test_dbias_sum_parameters_match_the_packed_buffer_and_it_compiles(n):
    # N * N odd (49): a float a thread; even (144): a float4. Both compile for sm_90 without spilling.
    variant = DbiasSumVariant(Problem(n, 32, "float16", True, True, "bwd"))
    assert packed_codes(render(variant)) == _DBIAS_SUM_ARGS.format.lstrip("@")
    resources = compile_variant(variant, "sm_90").resources
    assert resources.registers > 0 and resources.spill_bytes == 0
    blocks, _ = variant.grid(0, 3, 0, 0)
    per_thread = 1 if n % 2 else 4
    assert (blocks - 1) * variant.threads * per_thread < 3 * n * n <= blocks * variant.threads * per_thread


@pytest.mark.parametrize("dtype, lse_type", [("float16", "float"), ("bfloat16", "float"), ("float32", "double")])
def test_the_lse_buffer_has_the_type_the_kernels_write_and_read(dtype, lse_type):
    """float32 inputs save lse in double (variant.LSE_TYPE): a buffer of the wrong width would be overrun or misread."""
    q = torch.empty(2, 3, 49, 32, dtype=getattr(torch, dtype))
    assert empty_lse(q).shape == (2, 3, 49) and empty_lse(q).element_size() == {"float": 4, "double": 8}[lse_type]
    assert re.search(rf"\b{lse_type}\* __restrict__ lse\b", render(default_variant(Problem(49, 32, dtype, True, True))))
    for n in (49, 576):
        assert f"typedef {lse_type} Lse;" in render(default_backward(Problem(n, 32, dtype, True, True, "bwd")))
