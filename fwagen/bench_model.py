"""End-to-end benchmark: a timm Swin V1 model as shipped beside the same model patched by `fwagen.swin`.

Random weights, no downloads. One run measures, for both: inference throughput (eval, no_grad, fp16 and bf16
autocast, batch 128) and one training step (forward, cross-entropy, backward, fused AdamW step, bf16
autocast, batch 64), each with its peak memory. The two models are timed round-robin
(`fwagen.timing.interleaved`) so that clock and thermal drift hit both alike; L2 is not flushed, since one
model step moves far more than L2 holds. Before timing, the patched model's logits are set against the
shipped model's on the same weights and input, and both against the shipped model run in float64.

    python cli.py bench --model swin_tiny_patch4_window7_224 [--compile] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .bench import _cell, _json_safe, environment, gpu_slug
from .timing import interleaved, require_cuda

DEFAULT_MODEL = "swin_tiny_patch4_window7_224"
INFERENCE_DTYPES = ("float16", "bfloat16")
TRAIN_DTYPE = "bfloat16"
CHECK_BATCH = 8  # images in the correctness check (the float64 run is the slow part)
ULP = {"float16": 2**-10, "bfloat16": 2**-7}  # the floor of the error rule, relative to the largest logit


def build_models(name: str, compile_models: bool = False) -> dict[str, torch.nn.Module]:
    """{"timm": as shipped, "fwagen": a patched copy with the same weights}, on the current CUDA device."""
    import timm

    from .swin import patch_timm

    torch.manual_seed(0)
    shipped = timm.create_model(name, pretrained=False).cuda()
    models = {"timm": shipped, "fwagen": patch_timm(copy.deepcopy(shipped))}
    if compile_models:
        models = {impl: torch.compile(model) for impl, model in models.items()}
    return models


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself, under torch.compile's wrapper if any."""
    return getattr(model, "_orig_mod", model)


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    return tuple(unwrap(model).patch_embed.img_size)


def check_logits(models: dict[str, torch.nn.Module], batch: int = CHECK_BATCH) -> dict:
    """Per autocast dtype: max |fwagen - timm| over the logits, and each one's max error against timm in
    float64 (the error rule of the tests: fwagen's at most twice timm's plus a floor). Also any fallback
    warning fwagen gave: a model that runs the reference instead of the kernels is not what is being timed.
    Runs the modules uncompiled: a compiled model would also compile for this batch size."""
    models = {impl: unwrap(model) for impl, model in models.items()}
    shipped = models["timm"]
    x = torch.randn(batch, 3, *image_size(shipped), device="cuda")
    with torch.no_grad():
        expected = copy.deepcopy(shipped).double().eval()(x.double())
        result: dict = {"warnings": []}
        for dtype in INFERENCE_DTYPES:
            logits = {}
            for impl, model in models.items():
                model.eval()
                with warnings.catch_warnings(record=True) as caught, torch.autocast("cuda", getattr(torch, dtype)):
                    warnings.simplefilter("always")
                    logits[impl] = model(x).double()
                result["warnings"] += [str(w.message) for w in caught if str(w.message).startswith("fwagen")]
            err = {impl: (out - expected).abs().max().item() for impl, out in logits.items()}
            floor = ULP[dtype] * expected.abs().max().item()
            result[dtype] = {
                "max_abs_diff": (logits["fwagen"] - logits["timm"]).abs().max().item(),
                "timm_err": err["timm"], "fwagen_err": err["fwagen"],
                "ok": err["fwagen"] <= 2 * err["timm"] + floor,
            }
    result["warnings"] = sorted(set(result["warnings"]))
    return result


def inference_step(model, x, dtype: torch.dtype) -> Callable[[], object]:
    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            return model(x)
    return step


def training_step(model, x, labels, optimizer, dtype: torch.dtype) -> Callable[[], None]:
    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # after the step: each step allocates its gradients anew
    return step


def peak_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """(peak memory one call allocates above what is already resident, resident memory), in MiB."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**20, resident / 2**20


def measure(task: str, dtype: str, batch: int, steps: dict[str, Callable[[], object]], rounds: int) -> list[dict]:
    for fn in steps.values():  # first calls compile and load kernels (and with --compile, the models)
        fn()
    memory = {impl: peak_mb(fn) for impl, fn in steps.items()}
    timings = interleaved(steps, rounds=rounds, warmup=3, flush_l2=False)
    base_ms = timings["timm"].median_ms
    rows = []
    for impl, t in timings.items():
        rows.append(dict(task=task, dtype=dtype, batch=batch, impl=impl, ms=t.median_ms, p20_ms=t.p20_ms,
                         p80_ms=t.p80_ms, spread=t.spread, images_per_s=batch / t.median_ms * 1e3,
                         speedup=base_ms / t.median_ms, peak_mb=memory[impl][0], resident_mb=memory[impl][1]))
    return rows


def run(name: str = DEFAULT_MODEL, batch: int = 128, train_batch: int = 64, rounds: int = 30,
        compile_models: bool = False) -> dict:
    require_cuda()
    models = build_models(name, compile_models)
    size = image_size(models["timm"])
    check = check_logits(models)
    print(f"{name}: logits of fwagen vs timm, " + ", ".join(
        f"{dtype} max abs diff {check[dtype]['max_abs_diff']:.2e}" for dtype in INFERENCE_DTYPES), file=sys.stderr)
    rows = []
    x = torch.randn(batch, 3, *size, device="cuda")
    for dtype in INFERENCE_DTYPES:
        for model in models.values():
            model.eval()
        steps = {impl: inference_step(model, x, getattr(torch, dtype)) for impl, model in models.items()}
        rows += measure("inference", dtype, batch, steps, rounds)
    del x
    x = torch.randn(train_batch, 3, *size, device="cuda")
    labels = torch.randint(0, unwrap(models["timm"]).num_classes, (train_batch,), device="cuda")
    steps = {}
    for impl, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        steps[impl] = training_step(model, x, labels, optimizer, getattr(torch, TRAIN_DTYPE))
    rows += measure("train", TRAIN_DTYPE, train_batch, steps, max(rounds // 2, 5))
    import timm
    from timm.layers import use_fused_attn

    # timm's Swin takes its SDPA path only where experimental fused attention is switched on (off by default).
    env = {**environment(), "timm": timm.__version__, "model": name, "image_size": list(size),
           "compiled": compile_models, "timm_fused_attn": use_fused_attn(experimental=True)}
    return {**env, "check": check, "rows": rows}


def markdown_report(report: dict) -> str:
    lines = [
        f"# {report['model']}: timm as shipped vs patched with fwagen, on {report['device']}\n",
        f"torch {report['torch']}, CUDA {report['cuda']}, timm {report['timm']}, {report['date']}; random weights, "
        f"{report['image_size'][0]}x{report['image_size'][1]} images{', torch.compile' if report['compiled'] else ''}. "
        "ms: median of round-robin repetitions; spread: (p80 - p20) / median; speedup: timm's ms / this ms; "
        "peak MB: the most one call allocates above the resident weights and optimizer state.\n",
        "| task | dtype | batch | impl | ms | images/s | speedup | peak MB | spread |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        cells = (r["task"], r["dtype"], str(r["batch"]), r["impl"], _cell(r["ms"], ".2f"),
                 _cell(r["images_per_s"], ".0f"), _cell(r["speedup"], ".2f"), _cell(r["peak_mb"], ".0f"),
                 _cell(r["spread"], ".0%"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nLogits, eval mode, same weights and input, against timm run in float64:\n")
    for dtype in INFERENCE_DTYPES:
        c = report["check"][dtype]
        verdict = "" if c["ok"] else " (WRONG: over twice the error of timm plus the floor)"
        lines.append(f"- {dtype}: max |fwagen - timm| {c['max_abs_diff']:.2e}; error timm {c['timm_err']:.2e}, "
                     f"fwagen {c['fwagen_err']:.2e}{verdict}")
    lines += [f"- fallback: {w}" for w in report["check"]["warnings"]]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{gpu_slug(report['device'])}-model-{report['model']}{'-compiled' if report['compiled'] else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    md_path.write_text(markdown_report(report))
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench --model", description="timm Swin V1 model, as shipped vs patched.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a timm Swin V1 model name (default {DEFAULT_MODEL})")
    parser.add_argument("--batch", type=int, default=128, help="inference batch (default 128)")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--rounds", type=int, default=30, help="timed repetitions of inference (training: half)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models first")
    parser.add_argument("--out", default="bench/results", help="folder for the .json and .md reports")
    args = parser.parse_args(argv)
    report = run(args.model, args.batch, args.train_batch, args.rounds, args.compile)
    json_path, md_path = write_reports(report, args.out)
    print(markdown_report(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
