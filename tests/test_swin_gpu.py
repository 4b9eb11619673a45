"""fwagen.swin on the GPU: timm Swin V1 models patched with fwagen's kernels against timm as shipped.

The rule of the core issue, applied to logits and to every parameter's gradient: the patched model's max abs
error against the same model run in float64 is at most twice the error of eager PyTorch (the unpatched model)
in the same dtype, plus a floor of one unit in the last place at the largest value (the rounding of the result
itself). 16-bit runs are autocast from float32 weights, as users train; float32 runs have no autocast.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import fwagen.op  # noqa: E402
from fwagen.swin import patch_timm  # noqa: E402

pytestmark = pytest.mark.gpu

# Batch sizes: several images, so that windows b >= nW exercise mask[b % nW], and small enough for float64.
MODELS = {"swin_tiny_patch4_window7_224": 4, "swin_base_patch4_window12_384": 2}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ULP = {"float16": 2**-10, "bfloat16": 2**-7, "float32": 2**-23}
SWIN_T = "swin_tiny_patch4_window7_224"


def create(name: str) -> torch.nn.Module:
    """Random weights, no drop path (the only randomness of a timm Swin in training), on the GPU."""
    torch.manual_seed(torch.seed() % 2**31)
    return timm.create_model(name, pretrained=False, drop_path_rate=0.0).cuda()


def autocast(dtype: str):
    """16-bit: autocast (weights stay float32); float32 and float64: the model's own dtype."""
    if dtype in ("float16", "bfloat16"):
        return torch.autocast("cuda", dtype=DTYPES[dtype])
    return contextlib.nullcontext()


def logits_and_grads(model, x, w, dtype: str, params_of=None):
    """Logits and every parameter's gradient of the projection sum(logits * w), all as float64."""
    model.zero_grad(set_to_none=True)
    with autocast(dtype):
        logits = model(x)
    (logits.double() * w).sum().backward()
    params = (params_of or model).named_parameters()
    return logits.detach().double(), {name: p.grad.detach().double() for name, p in params}


def violations(got, eager, ref, dtype: str) -> list[str]:
    """Every tensor (logits, then each parameter's gradient) whose error breaks the rule."""
    named = [("logits", got[0], eager[0], ref[0])]
    named += [(f"grad {name}", got[1][name], eager[1][name], ref[1][name]) for name in ref[1]]
    broken = []
    for name, g, e, r in named:
        err, eager_err = (g - r).abs().max().item(), (e - r).abs().max().item()
        allowed = 2 * eager_err + ULP[dtype] * r.abs().max().item()
        if not err <= allowed:  # NaN fails too
            broken.append(f"{name}: error {err:.3g} > allowed {allowed:.3g} (eager {eager_err:.3g})")
    return broken


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """A model as shipped, one input, one projection of the logits, and the float64 run of that model."""
    model = create(request.param)
    batch = MODELS[request.param]
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device="cuda")
    w = torch.randn(batch, model.num_classes, device="cuda", dtype=torch.float64)
    ref = logits_and_grads(copy.deepcopy(model).double(), x.double(), w, "float64")
    yield SimpleNamespace(name=request.param, model=model, x=x, w=w, ref=ref)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_patched_model_logits_and_grads_within_twice_eager_error(case, dtype):
    eager = logits_and_grads(case.model, case.x, case.w, dtype)
    patched = patch_timm(copy.deepcopy(case.model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits_and_grads(patched, case.x, case.w, dtype)
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("fwagen")]
    assert fallbacks == [], "the patched model must run the kernels, not the reference"
    assert violations(got, eager, case.ref, dtype) == []


def test_patched_channels_last_model_within_twice_eager_error():
    model = create(SWIN_T).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(4, model.num_classes, device="cuda", dtype=torch.float64)
    ref = logits_and_grads(copy.deepcopy(model).double(), x.double(), w, "float64")
    eager = logits_and_grads(model, x, w, "float16")
    got = logits_and_grads(patch_timm(copy.deepcopy(model)), x, w, "float16")
    assert violations(got, eager, ref, "float16") == []


def train_losses(model, x, labels, dtype: str, steps: int = 3) -> list[float]:
    """The loss of each of `steps` SGD steps on one batch, as float."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        with autocast(dtype):
            loss = F.cross_entropy(model(x), labels)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def test_training_steps_of_patched_and_shipped_models_stay_close():
    # Three SGD steps in bf16 autocast from the same weights and batch, against the same steps in float64.
    # Each step's loss obeys the rule: its error is at most twice the shipped model's, plus 2^-7 of the loss
    # (bf16 logits carry 8 significant bits; cross-entropy adds rounding of that order) -- a drift of the
    # weights that kernels cause beyond bf16's own would grow past it within three steps at lr 0.05.
    model = create(SWIN_T).train()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, model.num_classes, (8,), device="cuda")
    patched = patch_timm(copy.deepcopy(model))
    ref = train_losses(copy.deepcopy(model).double(), x.double(), labels, "float64")
    eager = train_losses(model, x, labels, "bfloat16")
    got = train_losses(patched, x, labels, "bfloat16")
    assert ref[-1] < ref[0], "the steps must train: the loss goes down"
    for step, (g, e, r) in enumerate(zip(got, eager, ref)):
        allowed = 2 * abs(e - r) + 2**-7 * abs(r)
        assert abs(g - r) <= allowed, f"step {step}: loss {g:.5f}, shipped {e:.5f}, float64 {r:.5f}"


def test_cuda_graph_capture_of_patched_inference():
    model = patch_timm(create(SWIN_T)).half().eval()
    static_x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # compiles and loads the kernels, and settles torch's allocations, before capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = model(static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = model(fresh)
    # The same kernels on the same data: equal up to a few fp16 ulps where a library picks another algorithm.
    assert (static_out.float() - expected.float()).abs().max().item() <= 4 * 2**-10 * expected.abs().max().item()


def test_compiled_patched_model_within_twice_eager_error():
    model = create(SWIN_T)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    w = torch.randn(4, model.num_classes, device="cuda", dtype=torch.float64)
    ref = logits_and_grads(copy.deepcopy(model).double(), x.double(), w, "float64")
    eager = logits_and_grads(model, x, w, "bfloat16")
    patched = patch_timm(copy.deepcopy(model))
    compiled = torch.compile(patched, fullgraph=True)  # no graph break around the op
    got = logits_and_grads(compiled, x, w, "bfloat16", params_of=patched)
    assert violations(got, eager, ref, "bfloat16") == []
