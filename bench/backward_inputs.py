"""A bench shape's inputs for timing backward kernels directly: q, k, v as views of one qkv buffer, bias, shift mask,
the default forward's output and log-sum-exp, and a random output gradient; a backward variant from its short
name; and the command-line arguments every backward script takes. Shared by the backward scripts here."""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fwagen.bench import SHAPES
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.space import default_variant
from fwagen.variant import BackwardTileVariant, BackwardVariant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_inputs  # noqa: E402


@dataclass
class BackwardInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor
    dout: torch.Tensor
    lse: torch.Tensor
    scale: float
    forward: object  # the forward variant that made out and lse

    def launch_forward(self) -> None:
        launch_forward(self.forward, self.q, self.k, self.v, self.out, self.lse, self.bias, self.mask, self.scale)

    def backward_args(self) -> tuple:
        """launch_backward's arguments after the variant."""
        return self.q, self.k, self.v, self.out, self.dout, self.lse, self.bias, self.mask, self.scale


def backward_inputs(shape, dtype: str) -> BackwardInputs:
    q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                                mask_windows=shape.nw, qkv_strided=True)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    x = BackwardInputs(q, k, v, b, m, out, torch.randn_like(out), empty_lse(q), shape.d ** -0.5,
                       default_variant(Problem(shape.n, shape.d, dtype, True, True)))
    x.launch_forward()
    return x


def backward_variant(problem: Problem, text: str):
    """A backward variant from its short name: 'o64_n32_w4_b1' (tiled: own rows, tile rows, windows per block, min
    blocks) or 's1_b1' (whole-window: stages, min blocks)."""
    tiled = re.fullmatch(r"o(\d+)_n(\d+)_w(\d+)_b(\d+)", text)
    if tiled is not None:
        own, tile, wpb, blocks = map(int, tiled.groups())
        return BackwardTileVariant(problem, own_rows=own, tile_rows=tile, windows_per_block=wpb, min_blocks=blocks)
    whole = re.fullmatch(r"s(\d+)_b(\d+)", text)
    if whole is not None:
        stages, blocks = map(int, whole.groups())
        return BackwardVariant(problem, stages=stages, min_blocks=blocks)
    raise ValueError(f"variant {text!r}: expected o<own rows>_n<tile rows>_w<windows per block>_b<min blocks> (tiled) "
                     "or s<stages>_b<min blocks> (whole-window)")


def short_name(variant) -> str:
    """The inverse of backward_variant: a variant's knobs as in its key, without the problem."""
    return variant.key().rsplit(variant.problem.key() + "_", 1)[1]


def script_arguments() -> argparse.ArgumentParser:
    """The arguments of every backward script: --shape (repeatable) and --dtype; a script adds its own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", choices=[s.name for s in SHAPES])
    parser.add_argument("--dtype", default="bfloat16")
    return parser


def chosen_shapes(names: list[str] | None, default: list[str]) -> list:
    """The bench shapes named on the command line (else `default`), in the bench's order."""
    return [s for s in SHAPES if s.name in (names or default)]
