"""Time a fwagen training step (forward plus backward, gradients of the inputs and the bias) in the three ways a
model can hand it q, k and v, as CUDA-graph replays interleaved in one run:
  * contiguous: q, k, v separate (B_, H, N, d) tensors, as `python cli.py bench --train` times them;
  * views: q, k, v views of one (B_, N, 3, H, d) qkv leaf, passed to `window_attention` (timm's layout; autograd
    stacks their three gradients into qkv's);
  * qkv: the same leaf passed to `window_attention_qkv`, whose gradient is the backward's buffer as it comes
    (what fwagen.swin runs).
Usage: python3 bench/train_layouts.py [--shape NAME ...] [--dtype bfloat16 ...]"""
from __future__ import annotations

import argparse

import torch

import fwagen
from fwagen.bench import SHAPES, Case, make_inputs
from fwagen.timing import interleaved


def steps(shape, dtype: str, masked: bool) -> dict:
    """The three training steps of one bench case, on the same random values."""
    x = make_inputs(Case(shape, dtype, masked))
    windows, heads, n, d = x.q.shape
    bias = x.bias.clone().requires_grad_()
    contiguous = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]
    qkv = torch.stack([x.q, x.k, x.v]).permute(1, 3, 0, 2, 4).contiguous().requires_grad_()  # (B_, N, 3, H, d)
    grad_bhnd = torch.randn_like(x.q)
    grad_bnc = grad_bhnd.transpose(1, 2).reshape(windows, n, heads * d)

    def with_contiguous():
        out = fwagen.window_attention(*contiguous, bias, x.mask)
        return torch.autograd.grad(out, (*contiguous, bias), grad_bhnd)

    def with_views():
        out = fwagen.window_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), bias, x.mask, layout="bnc")
        return torch.autograd.grad(out, (qkv, bias), grad_bnc)

    def with_qkv():
        out = fwagen.window_attention_qkv(qkv, bias, x.mask, layout="bnc")
        return torch.autograd.grad(out, (qkv, bias), grad_bnc)

    return {"contiguous": with_contiguous, "views": with_views, "qkv": with_qkv}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES])
    parser.add_argument("--dtype", action="append", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape | dtype | mask | contiguous ms | views ms | qkv ms | views / qkv |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape in [s for s in SHAPES if s.name in (args.shape or ["swin-t-s1-w7", "w8-n64", "w12-n144"])]:
        for dtype in args.dtype or ["float16", "bfloat16"]:
            for masked in (False, True):
                ms = {name: t.median_ms for name, t in interleaved(steps(shape, dtype, masked), use_graph=True).items()}
                print(f"| {shape.name} | {dtype} | {'yes' if masked else 'no'} | {ms['contiguous']:.3f} | "
                      f"{ms['views']:.3f} | {ms['qkv']:.3f} | {ms['views'] / ms['qkv']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
