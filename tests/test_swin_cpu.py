"""fwagen.swin on CPU: timm Swin V1 models patched with fwagen against the same models as timm ships them.

On CPU the op runs `fwagen.reference`, whose op order is timm's eager one (scale q, q k^T, + bias, + mask,
softmax, @ v), so a patched model must reproduce timm's logits and parameter gradients to float rounding:
1e-12 relative to the largest value in float64 and 1e-5 in float32 (a different reduction order inside a
matmul is the only licit difference). What these tests pin is the plumbing around the op: strided q, k, v
views, the (B_, N, C) output, the bias gather, which mask each block passes, patching and unpatching.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import fwagen.op  # noqa: E402
import fwagen.swin  # noqa: E402
from fwagen.bench_model import markdown_report, write_reports  # noqa: E402
from fwagen.swin import WindowAttention, is_patched, patch_timm, unpatch  # noqa: E402
from timm.models.swin_transformer import SwinTransformerBlock  # noqa: E402
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention  # noqa: E402

SWIN_T = "swin_tiny_patch4_window7_224"
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}

pytestmark = pytest.mark.filterwarnings("ignore:fwagen. no kernel for cpu tensors")


@pytest.fixture(autouse=True)
def fresh_warning_state():
    """Both modules warn once per reason per process: start every test with no reason seen."""
    saved = set(fwagen.swin._warned), set(fwagen.op._warned)
    fwagen.swin._warned.clear()
    fwagen.op._warned.clear()
    yield
    for module, seen in zip((fwagen.swin, fwagen.op), saved):
        module._warned.clear()
        module._warned.update(seen)


class OpSpy:
    """Wraps fwagen.swin's call of the op: records each call and checks that qkv arrives as a view of the qkv
    Linear's output (no copy), (B_, N, 3, H, d), and that the output is asked for in (B_, N, C) layout."""

    def __init__(self):
        self.calls = []

    def __call__(self, qkv, bias, mask, scale, layout):
        windows, n, three, heads, d = qkv.shape
        assert three == 3 and layout == "bnc"
        assert qkv.is_contiguous() and qkv._base is not None  # a view of the Linear's (B_, N, 3 * H * d) output
        assert bias.shape == (heads, n, n)
        self.calls.append(dict(q_dtype=qkv.dtype, bias_dtype=bias.dtype, mask=None if mask is None else mask.shape))
        return fwagen.op.window_attention_qkv(qkv, bias, mask, scale, layout)


@pytest.fixture
def spy(monkeypatch):
    recorder = OpSpy()
    monkeypatch.setattr(fwagen.swin, "window_attention_qkv", recorder)
    return recorder


def create(name=SWIN_T, dtype=torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(torch.seed() % 2**31)  # fresh weights every test, never a fixed draw
    return timm.create_model(name, pretrained=False, **kwargs).to(dtype)


def images(model, batch=2, size=None, dtype=torch.float64):
    h, w = size or model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, dtype=dtype)


def logits_and_grads(model, x, seed, params_of=None):
    """Logits and every parameter's gradient of a fixed random projection of them; the seed fixes drop path.
    params_of: the module whose parameter names to report (the original under a torch.compile wrapper)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(x)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in (params_of or model).named_parameters()}


def assert_close(got, expected, rtol):
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= rtol * scale, f"max abs diff over {rtol} x {scale:.3g}"


def assert_same_results(a, b, rtol):
    assert_close(a[0], b[0], rtol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert_close(a[1][name], b[1][name], rtol)


def masks_seen(model):
    """Hooks recording, per patched attention call, the mask it received (None or its shape and dtype)."""
    seen = []

    def record(module, args, kwargs):
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        seen.append(None if mask is None else (tuple(mask.shape), mask.dtype, module.window_area))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
               if isinstance(m, WindowAttention)]
    return seen, handles


def blocks(model):
    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


# --- equivalence ---------------------------------------------------------------------------------------


def test_patched_swin_t_matches_timm_logits_and_grads(spy):
    dtype = torch.float64  # float32 runs in the tests below
    model = create(dtype=dtype)  # train mode, drop path 0.1: the seed makes both runs drop alike
    kinds = {any(b.shift_size) for b in blocks(model)}
    assert kinds == {True, False}, "Swin-T at 224 has shifted and unshifted blocks"
    x = images(model, dtype=dtype)
    expected = logits_and_grads(model, x, seed=1)
    assert spy.calls == []

    assert patch_timm(model) is model
    seen, handles = masks_seen(model)
    got = logits_and_grads(model, x, seed=1)
    assert_same_results(got, expected, RTOL[dtype])

    assert len(spy.calls) == 12  # every block of depths (2, 2, 6, 2) went through the op
    assert None in seen and any(s is not None for s in seen)
    for shape, mask_dtype, n in (s for s in seen if s is not None):
        assert len(shape) == 3 and shape[1:] == (n, n) and mask_dtype == dtype  # (nW, N, N), float
    for handle in handles:
        handle.remove()

    model.eval()
    with torch.no_grad():
        patched = model(x)
        assert_close(patched, unpatch(model)(x), RTOL[dtype])


def test_feature_map_smaller_than_window_clamps_window_and_matches():
    # 160 px: maps of 40, 20, 10 and 5 tokens. The last stage's 5x5 map is smaller than the window, so timm
    # clamps its window to 5 (N = 25) and drops the shift; 40 and 10 are padded up to whole windows.
    model = create(img_size=160)
    last = blocks(model)[-1]
    assert last.window_size == (5, 5) and not any(last.shift_size)
    assert last.attn.window_area == 25 and last.attn.relative_position_bias_table.shape == (81, 24)
    padded_shifted = [b for b in blocks(model) if b.input_resolution[0] % b.window_size[0] and any(b.shift_size)]
    assert padded_shifted, "some shifted block pads its map"
    x = images(model)
    expected = logits_and_grads(model, x, seed=2)
    patch_timm(model)
    seen, _ = masks_seen(model)
    assert_same_results(logits_and_grads(model, x, seed=2), expected, RTOL[torch.float64])
    assert seen[-1] is None and seen[-2] is None  # stage 4: both blocks unshifted, N = 25
    assert any(s is not None and s[2] == 49 for s in seen)


def test_dynamic_image_size_builds_masks_in_forward_and_matches():
    # dynamic_img_size: each block builds its mask from the padded map of this input, in the input's dtype.
    model = create(dtype=torch.float32, dynamic_img_size=True).eval()
    assert all(b.dynamic_mask and b.attn_mask is None for b in blocks(model))
    x = images(model, size=(160, 192), dtype=torch.float32)
    with torch.no_grad():
        expected = model(x)
        patch_timm(model)
        seen, _ = masks_seen(model)
        assert_close(model(x), expected, RTOL[torch.float32])
    assert any(s is not None for s in seen) and None in seen


def test_channels_last_and_cpu_autocast_match(spy):
    model = create(dtype=torch.float32, img_size=112).eval().to(memory_format=torch.channels_last)
    x = images(model, dtype=torch.float32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        got = patch_timm(model)(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    # The op gets q, k, v in the Linear's autocast dtype and the bias from the float32 table, like timm's matmul.
    assert {c["q_dtype"] for c in spy.calls} == {torch.bfloat16}
    assert {c["bias_dtype"] for c in spy.calls} == {torch.float32}
    assert_close(got.float(), expected.float(), 2**-8)  # one bf16 ulp of slack; in practice identical


@pytest.mark.parametrize("kwargs", [dict(), dict(head_dim=16), dict(window_size=(7, 5), qkv_bias=False)],
                         ids=["default", "head_dim_16", "window_7x5_no_qkv_bias"])
def test_module_has_timms_constructor_state_dict_and_output(kwargs):
    timm_module = TimmWindowAttention(96, num_heads=3, **kwargs).double()
    module = WindowAttention(96, num_heads=3, **kwargs).double()
    assert module.state_dict().keys() == timm_module.state_dict().keys()
    module.load_state_dict(timm_module.state_dict(), strict=True)
    windows, n = 6, module.window_area
    x = torch.randn(windows, n, 96, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(3, n, n) < 0.6) | torch.eye(n, dtype=torch.bool)
    mask = torch.where(keep, 0.0, -100.0).double()  # 3 windows per image: window b uses mask[b % 3]
    for m in (None, mask):
        expected, got = timm_module(x, m), module(x, m)
        assert got.shape == (windows, n, 96)
        assert_close(got, expected, RTOL[torch.float64])
        grad_x, = torch.autograd.grad(got.sum(), x)
        expected_grad_x, = torch.autograd.grad(expected.sum(), x)
        assert_close(grad_x, expected_grad_x, RTOL[torch.float64])


# --- checkpoints, patching, unpatching -----------------------------------------------------------------


def test_checkpoints_load_both_ways_with_identical_keys():
    shipped, patched = create(dtype=torch.float32).eval(), patch_timm(create(dtype=torch.float32).eval())
    assert list(shipped.state_dict()) == list(patched.state_dict())
    for source, target in ((shipped, patched), (patched, shipped)):
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = images(shipped, dtype=torch.float32)
    with torch.no_grad():
        assert_close(patched(x), shipped(x), RTOL[torch.float32])


def test_patch_swaps_class_in_place_and_unpatch_restores(spy):
    model = create(dtype=torch.float32).eval()
    params = {name: p for name, p in model.named_parameters()}
    x = images(model, dtype=torch.float32)
    with torch.no_grad():
        expected = model(x)
        patch_timm(model)
        patch_timm(model)  # patching twice changes nothing
        attns = [m for m in model.modules() if isinstance(m, TimmWindowAttention)]
        assert len(attns) == 12 and all(type(m) is WindowAttention for m in attns) and is_patched(model)
        assert all(p is params[name] for name, p in model.named_parameters())  # same objects: nothing copied
        model(x)
        calls = len(spy.calls)
        assert unpatch(model) is model and not is_patched(model)
        assert all(type(m) is TimmWindowAttention for m in attns)
        assert_close(model(x), expected, 0)
    assert len(spy.calls) == calls == 12  # the unpatched model never reaches fwagen
    assert all(p is params[name] for name, p in model.named_parameters())


def test_swin_v2_is_refused_naming_the_module_and_left_unchanged():
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False)
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.attn .*Swin V2.*logit_scale"):
        patch_timm(model)
    assert not is_patched(model)


def test_unexpected_structures_are_refused_naming_the_module():
    class Custom(TimmWindowAttention):
        pass

    model = create(dtype=torch.float32)
    model.layers[1].blocks[0].attn.__class__ = Custom
    with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\.attn .*subclasses"):
        patch_timm(model)
    assert not is_patched(model)  # refused as a whole: no module was patched

    model.layers[1].blocks[0].attn.__class__ = TimmWindowAttention
    model.layers[2].blocks[3].attn.qkv = nn.Identity()
    with pytest.raises(ValueError, match=r"layers\.2\.blocks\.3\.attn .*nn\.Linear qkv"):
        patch_timm(model)

    with pytest.raises(ValueError, match="no timm Swin V1 WindowAttention"):
        patch_timm(nn.Sequential(nn.Linear(4, 4)))


def test_attention_dropout_in_training_falls_back_once_and_matches(spy):
    model = create(dtype=torch.float32, attn_drop_rate=0.2, img_size=112)  # 112 px: a quarter of the work
    x = images(model, dtype=torch.float32)
    expected = logits_and_grads(model, x, seed=3)
    patch_timm(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = logits_and_grads(model, x, seed=3)
        logits_and_grads(model, x, seed=4)
    dropout_warnings = [w for w in caught if "attention dropout" in str(w.message)]
    assert len(dropout_warnings) == 1 and "p=0.2" in str(dropout_warnings[0].message)
    assert spy.calls == []  # timm's own forward ran, with its dropout draws
    assert_same_results(got, expected, RTOL[torch.float32])

    model.eval()  # no dropout in eval: the kernels' path again
    with torch.no_grad():
        model(x)
    assert len(spy.calls) == 12


def test_compiled_patched_model_traces_in_one_graph_and_matches():
    # A small Swin (one shifted and one unshifted block per stage, 14x14 then 7x7 maps) keeps compilation short;
    # aot_eager traces forward and backward through the op's fake implementation without inductor's C++ build.
    model = create(dtype=torch.float32, depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=56, num_classes=10)
    x = images(model, dtype=torch.float32)
    expected = logits_and_grads(patch_timm(model), x, seed=5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_same_results(logits_and_grads(compiled, x, seed=5, params_of=model), expected, RTOL[torch.float32])


# --- the end-to-end bench's report ---------------------------------------------------------------------


def test_model_bench_report_names_file_by_gpu_and_model(tmp_path):
    rows = [dict(task="inference", dtype="float16", batch=128, impl=impl, ms=ms, p20_ms=ms, p80_ms=ms, spread=0.01,
                 images_per_s=128 / ms * 1e3, speedup=20.0 / ms, peak_mb=500.0, resident_mb=120.0)
            for impl, ms in (("timm", 20.0), ("fwagen", 14.0))]
    check = {dtype: dict(max_abs_diff=1e-3, timm_err=2e-3, fwagen_err=2e-3, ok=True)
             for dtype in ("float16", "bfloat16")}
    report = dict(model=SWIN_T, device="NVIDIA H100 80GB HBM3", torch="2.11", cuda="13.0", timm="1.0", date="today",
                  image_size=[224, 224], compiled=False, check={**check, "warnings": []}, rows=rows)
    text = markdown_report(report)
    assert "| inference | float16 | 128 | fwagen | 14.00 | 9143 | 1.43 | 500 | 1% |" in text
    json_path, md_path = write_reports(report, tmp_path)
    assert json_path.name == f"nvidia-h100-80gb-hbm3-model-{SWIN_T}.json" and md_path.read_text() == text
