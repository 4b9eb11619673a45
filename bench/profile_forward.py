"""Launch one forward variant a few times on a Swin shape, for `ncu` to profile the last launch.
Usage: ncu ... python3 bench/profile_forward.py SHAPE WPB QC RPW KT STAGES [dtype [nomask]]"""
import sys

import torch

from fwagen.bench import SHAPES
from fwagen.launch import empty_lse, launch_forward
from fwagen.problem import Problem
from fwagen.variant import ForwardVariant

sys.path.insert(0, "tests")
from helpers import make_inputs  # noqa: E402

name, *knobs = sys.argv[1:7]
dtype = sys.argv[7] if len(sys.argv) > 7 else "float16"
masked = sys.argv[8:9] != ["nomask"]
shape = next(s for s in SHAPES if s.name == name)
variant = ForwardVariant(Problem(shape.n, shape.d, dtype, True, masked), *map(int, knobs))
q, k, v, b, m = make_inputs(shape.windows, shape.heads, shape.n, shape.d, getattr(torch, dtype),
                            mask_windows=shape.nw if masked else 0, qkv_strided=True)
out = torch.empty_like(q, memory_format=torch.contiguous_format)
lse = empty_lse(q)
for _ in range(3):
    launch_forward(variant, q, k, v, out, lse, b, m, shape.d ** -0.5)
torch.cuda.synchronize()
print(variant.key())
