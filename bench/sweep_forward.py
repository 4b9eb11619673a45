"""Time every legal forward variant of a few Swin problems on this GPU (verified first), to see where the
built-in defaults stand. Usage: python3 bench/sweep_forward.py [--shape NAME ...] [--out DIR]"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fwagen.bench import SHAPES, gpu_slug
from fwagen.compiler import CompileError, compile_variant, device_arch
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.reference import window_attention_reference
from fwagen.space import candidates, default_variant, resource_violation
from fwagen.timing import time_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_inputs, reference64  # noqa: E402


def sweep(shape, dtype: str, masked: bool, arch: str):
    problem = Problem(shape.n, shape.d, dtype, True, masked)
    legal, _ = candidates(problem, arch)
    with ThreadPoolExecutor(16) as pool:
        compiled = list(pool.map(lambda v: _try_compile(v, arch), legal))
    q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                                mask_windows=shape.nw if masked else 0, qkv_strided=True)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = empty_lse(q)
    check_slice = slice(0, 64)
    expected = reference64(q[check_slice], k[check_slice], v[check_slice], b, None if m is None else m)
    eager_err = (window_attention_reference(q[check_slice], k[check_slice], v[check_slice], b, m).double()
                 - expected).abs().max().item()
    rows, default_key = [], default_variant(problem).key()
    for variant, result in zip(legal, compiled):
        if isinstance(result, str):
            rows.append((variant.key(), None, result))
            continue
        reason = resource_violation(variant, result.resources)
        if reason:
            rows.append((variant.key(), None, reason))
            continue
        out.fill_(float("nan"))
        launch_forward(variant, q, k, v, out, lse, b, m, shape.d ** -0.5)
        err = (out[check_slice].double() - expected).abs().max().item()
        if not err <= 2 * eager_err + 1e-2:
            rows.append((variant.key(), None, f"wrong: err {err:.3g}"))
            continue
        t = time_cuda(lambda: launch_forward(variant, q, k, v, out, lse, b, m, shape.d ** -0.5), reps=30)
        rows.append((variant.key(), t.median_ms, f"regs {result.resources.registers}"))
    return rows, default_key


def _try_compile(variant, arch):
    try:
        return compile_variant(variant, arch)
    except CompileError as error:
        return f"compile error: {str(error).splitlines()[0][:80]}"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    arch = device_arch()
    names = args.shape or ["swin-t-s1-w7", "w12-n144", "w24-n576"]
    report = {}
    for shape in [s for s in SHAPES if s.name in names]:
        for masked in (True,):
            rows, default_key = sweep(shape, args.dtype, masked, arch)
            timed = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
            default_ms = next((r[1] for r in rows if r[0] == default_key), None)
            print(f"\n## {shape.name} {args.dtype} mask={masked}: {len(timed)} timed of {len(rows)}; "
                  f"default {default_key} = {default_ms}")
            for key, ms, note in timed[: args.top]:
                print(f"{ms:8.4f} ms  {key}  {note}")
            skipped = [r for r in rows if r[1] is None]
            for key, _, note in skipped[:5]:
                print(f"  skipped {key}: {note}")
            report[f"{shape.name}-{args.dtype}-{masked}"] = {"rows": rows, "default": default_key}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{gpu_slug(torch.cuda.get_device_name())}-sweep.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
