"""Error of the dispatched backward against float64 autograd, as a ratio to eager PyTorch's error in the same dtype,
over several seeds: how close a configuration runs to the tests' bound (ratio 2, plus a small floor).
Usage: python3 bench/accuracy_backward.py --n 1024 --d 128 --dtype float32 [--windows 2 --heads 1 --seeds 10]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fwagen
from fwagen.reference import window_attention_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import DTYPES, make_inputs  # noqa: E402


def gradients(q, k, v, b, m, grad_out, fn):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, b)]
    fn(*leaves, m).backward(grad_out)
    return [t.grad for t in leaves]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    print(f"n {args.n} d {args.d} {args.dtype}, {args.windows} windows x {args.heads} heads, bias and mask: "
          "error / eager error of dq dk dv dbias")
    for seed in range(args.seeds):
        q, k, v, b, m = make_inputs(args.windows, args.heads, args.n, args.d, dtype, mask_windows=1, seed=seed)
        grad_out = torch.randn_like(q)
        ours = gradients(q, k, v, b, m, grad_out, lambda *a: fwagen.window_attention(*a[:4], mask=a[4]))
        eager = gradients(q, k, v, b, m, grad_out, window_attention_reference)
        exact = gradients(q.double(), k.double(), v.double(), b.double(), m.double(), grad_out.double(),
                          window_attention_reference)
        ratios = [((o.double() - x).abs().max() / (e.double() - x).abs().max()).item()
                  for o, e, x in zip(ours, eager, exact)]
        print(f"seed {seed}: " + "  ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
