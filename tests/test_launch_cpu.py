"""The launcher's side of the kernel ABI, on the CPU: the packed parameter buffers match the parameter lists
of the rendered kernels (a parameter added to a template and not to launch.py would shift every one after it)."""
from __future__ import annotations

import re

import pytest

from fwagen.launch import _BACKWARD_ARGS, _FORWARD_ARGS, _ROW_DELTA_ARGS
from fwagen.problem import Problem
from fwagen.render import render
from fwagen.space import default_backward, default_variant

C_TO_STRUCT = {"long long": "q", "int": "i", "float": "f"}


def packed_codes(source: str) -> str:
    """struct codes of a rendered kernel's parameters: pointers P, long long q, int i, float f."""
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


@pytest.mark.parametrize("n, dtype, kind", [(49, "bfloat16", "bwd_mma"), (144, "bfloat16", "bwd_mma"),
                                             (576, "bfloat16", "bwd_tile"), (576, "float32", "bwd_simt")])
def test_backward_parameters_match_the_packed_buffer(n, dtype, kind):
    variant = default_backward(Problem(n, 32, dtype, True, True, "bwd"))
    assert variant.kind == kind and getattr(variant, "compact_smem", n > 96) == (n > 96)
    assert packed_codes(render(variant)) == _BACKWARD_ARGS.format.lstrip("@")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_row_delta_prepass_parameters_match_the_packed_buffer(dtype):
    variant = default_backward(Problem(576, 32, dtype, True, True, "bwd"))
    assert variant.prepass is not None
    assert packed_codes(render(variant.prepass)) == _ROW_DELTA_ARGS.format.lstrip("@")
