"""Launch one forward variant a few times on a Swin shape, for `ncu` to profile the last launch.
Usage: ncu ... python3 bench/profile_forward.py [KIND] SHAPE WPB QC RPW KT STAGES [dtype [mask|nomask [MIN_BLOCKS]]]
KIND: mma (default), mma_stream, wgmma or wgmma_stream."""
import sys

import torch

from fwagen.bench import SHAPES
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.variant import (ForwardStreamVariant, ForwardVariant, ForwardWgmmaStreamTmaVariant, ForwardWgmmaStreamVariant,
                            ForwardWgmmaTmaVariant, ForwardWgmmaVariant)

sys.path.insert(0, "tests")
from helpers import make_inputs  # noqa: E402

KINDS = {"mma": ForwardVariant, "mma_stream": ForwardStreamVariant, "wgmma": ForwardWgmmaVariant,
         "wgmma_stream": ForwardWgmmaStreamVariant, "wgmma_tma": ForwardWgmmaTmaVariant,
         "wgmma_stream_tma": ForwardWgmmaStreamTmaVariant}
args = sys.argv[1:]
kind = args.pop(0) if args[0] in KINDS else "mma"
name, *knobs = args[:6]
dtype = args[6] if len(args) > 6 else "float16"
masked = args[7:8] != ["nomask"]
min_blocks = int(args[8]) if len(args) > 8 else 1
shape = next(s for s in SHAPES if s.name == name)
variant = KINDS[kind](Problem(shape.n, shape.d, dtype, True, masked), *map(int, knobs), min_blocks)
q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                            mask_windows=shape.nw if masked else 0, qkv_strided=True)
out = torch.empty_like(q, memory_format=torch.contiguous_format)
lse = empty_lse(q)
for _ in range(3):
    launch_forward(variant, q, k, v, out, lse, b, m, shape.d ** -0.5)
torch.cuda.synchronize()
print(variant.key())
