"""A/B of the forward template against an earlier version of it, in one process on one GPU:
    git show REV:templates/fwd_mma.cu.j2 > /tmp/before.cu.j2
    python3 bench/ab_forward.py /tmp/before.cu.j2 [--shape w12-n144 ...] [--variant w1_q48_r16_k48_s2_b1 ...]
Both templates render the same variants (the earlier one under kernel names of its own, so both compile and load
side by side); every output is checked against the float64 reference before anything is timed, then the two are
timed interleaved (`fwagen.timing.interleaved`). bf16, bias, with and without the shift mask. A variant named
'S_...' is the streamed kind (bias and mask tiles beside K and V)."""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

import fwagen.render
from fwagen.bench import SHAPES
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.timing import interleaved
from fwagen.variant import ForwardStreamVariant, ForwardVariant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import allowed_error, make_inputs, reference64  # noqa: E402

BEFORE = "fwd_mma_before.cu.j2"  # the earlier template's name in this process's Jinja environment

# The H100's and H200's tuned picks at each shape (tuned/*.yaml), and neighbours.
DEFAULT_VARIANTS = {
    "swin-t-s1-w7": ["w2_q64_r32_k32_s2_b1", "w1_q64_r16_k64_s2_b1"],
    "w8-n64": ["w2_q64_r16_k32_s2_b1", "w1_q64_r32_k16_s2_b1", "w4_q64_r16_k64_s2_b1"],
    "w12-n144": ["w1_q48_r16_k48_s2_b1", "w2_q48_r16_k48_s2_b1", "w2_q48_r16_k32_s2_b1"],
    "w16-n256": ["w2_q128_r32_k64_s2_b1", "w2_q128_r16_k64_s2_b1", "S_w2_q128_r32_k64_s2_b1"],
    "w24-n576": ["S_w2_q64_r32_k32_s2_b3", "S_w4_q64_r32_k64_s2_b1"],
}


@dataclass(frozen=True)
class Before(ForwardVariant):
    template = BEFORE

    def key(self):
        return super().key().replace("fwagen_mma_", "fwagen_mmabefore_")


@dataclass(frozen=True)
class BeforeStream(ForwardStreamVariant):
    template = BEFORE

    def key(self):
        return super().key().replace("fwagen_mma_stream_", "fwagen_mmastreambefore_")


def use_before_template(path: str) -> None:
    """Serve `path` as BEFORE beside the package's templates (nothing is written to the template folder)."""
    text = Path(path).read_text()
    if "gridDim.x" not in text:  # a template from before the streamed kind's even shares: its own grid
        BeforeStream.grid = ForwardVariant.grid
    loader = jinja2.ChoiceLoader([jinja2.DictLoader({BEFORE: text}),
                                  jinja2.FileSystemLoader(str(fwagen.render.template_dir()))])
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    fwagen.render.environment = lambda: env


def pair_of(problem: Problem, text: str) -> dict | None:
    match = re.fullmatch(r"(S_)?w(\d+)_q(\d+)_r(\d+)_k(\d+)_s(\d)_b(\d)", text)
    if match is None:
        raise SystemExit(f"variant {text!r}: expected [S_]w<wpb>_q<chunk>_r<rows>_k<tile>_s<stages>_b<blocks>")
    streamed = match.group(1) is not None
    if streamed and not (problem.has_bias or problem.has_mask):
        return None
    w, qc, r, kt, st, mb = map(int, match.groups()[1:])
    knobs = dict(windows_per_block=w, query_chunk=qc, rows_per_warp=r, key_tile=kt, stages=st, min_blocks=mb)
    return {"before": (BeforeStream if streamed else Before)(problem, **knobs),
            "after": (ForwardStreamVariant if streamed else ForwardVariant)(problem, **knobs)}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("before", help="the earlier fwd_mma.cu.j2")
    parser.add_argument("--shape", action="append", choices=list(DEFAULT_VARIANTS))
    parser.add_argument("--variant", action="append", help="default: the shape's list in DEFAULT_VARIANTS")
    args = parser.parse_args(argv)
    use_before_template(args.before)
    print(torch.cuda.get_device_name())
    print("| shape | mask | variant | before ms | after ms | after / before |\n|---|---|---|---:|---:|---:|")
    for shape in [s for s in SHAPES if s.name in (args.shape or list(DEFAULT_VARIANTS))]:
        for masked in (True, False):
            problem = Problem(shape.n, shape.d, "bfloat16", True, masked)
            q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, torch.bfloat16,
                                        mask_windows=shape.nw if masked else 0, qkv_strided=True)
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            lse = empty_lse(q)
            checked = slice(0, 64)
            expected = reference64(q[checked], k[checked], v[checked], b, m)
            allowed = allowed_error(q[checked], k[checked], v[checked], b, m, expected)
            for text in args.variant or DEFAULT_VARIANTS[shape.name]:
                pair = pair_of(problem, text)
                if pair is None:
                    continue
                calls = {}
                for label, variant in pair.items():
                    out.fill_(float("nan"))
                    launch_forward(variant, q, k, v, out, lse, b, m, shape.d ** -0.5)
                    error = (out[checked].double() - expected).abs().max().item()
                    assert error <= allowed, f"{label} {text}: error {error:.3g} > {allowed:.3g}"
                    calls[label] = lambda variant=variant: launch_forward(variant, q, k, v, out, lse, b, m,
                                                                         shape.d ** -0.5)
                t = interleaved(calls, rounds=60)
                before, after = t["before"].median_ms, t["after"].median_ms
                print(f"| {shape.name} | {'yes' if masked else 'no'} | {text} | {before:.4f} | {after:.4f} | "
                      f"{after / before:.3f} |", flush=True)


if __name__ == "__main__":
    main()
