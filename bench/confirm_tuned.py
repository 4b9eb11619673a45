"""Confirm tuned winners with an exhaustive sweep (GPU): for each class, measure every legal variant, then
re-time the tuned winner, the sweep's best and the built-in default interleaved in one run, and report the
winner's distance from the true best.

    python bench/confirm_tuned.py --tuned tuned/nvidia-h200.yaml fwd_n49_d32_float16_bm_x16384 ... --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fwagen import registry
from fwagen.evaluate import GpuEvaluator
from fwagen.registry import ProblemClass
from fwagen.space import backward_candidates, candidates, default_backward, default_variant


def confirm(evaluator: GpuEvaluator, pclass: ProblemClass, winner) -> dict:
    problem = pclass.problem
    if problem.direction == "bwd":
        legal, default = backward_candidates(problem, evaluator.arch)[0], default_backward(problem, evaluator.arch)
    else:
        legal, default = candidates(problem, evaluator.arch)[0], default_variant(problem, evaluator.arch)
    evaluator.prefetch(pclass, legal)
    measured = {v.key(): (v, evaluator.evaluate(pclass, v)) for v in legal}
    ok = sorted((m.median_ms, v.key()) for v, m in measured.values() if m.ok)
    best = measured[ok[0][1]][0]
    finalists = {v.key(): v for v in (winner, best, default)}
    retimed = evaluator.retime(pclass, list(finalists.values()))
    t = {role: retimed[v.key()].median_ms for role, v in (("winner", winner), ("best", best), ("default", default))}
    return {"class": pclass.key(), "variants": len(legal), "measured_ok": len(ok), "winner": winner.key(),
            "sweep_best": best.key(), "winner_ms": t["winner"], "best_ms": t["best"], "default_ms": t["default"],
            "winner_over_best": t["winner"] / t["best"], "winner_sweep_rank": 1 + [k for _, k in ok].index(winner.key())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classes", nargs="+", type=ProblemClass.from_key)
    parser.add_argument("--tuned", required=True, help="the tuned YAML file holding the classes")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    tuned = registry.load(args.tuned)
    evaluator = GpuEvaluator()
    rows = [confirm(evaluator, pclass, tuned.entries[pclass.key()].variant) for pclass in args.classes]
    evaluator.close()
    slug = registry.gpu_slug(evaluator.gpu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug}-tune-confirm.json").write_text(json.dumps({"gpu": evaluator.gpu, "rows": rows}, indent=1))
    lines = [f"# Tuned winners against an exhaustive sweep ({evaluator.gpu})", "",
             "Every legal variant measured; winner, sweep best and default re-timed interleaved in one run.", "",
             "| class | variants | winner | winner ms | best ms | winner / best | rank in sweep | default ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['variants']} | {r['winner']} | {r['winner_ms']:.4f} | {r['best_ms']:.4f} "
                     f"| {r['winner_over_best']:.3f} | {r['winner_sweep_rank']} | {r['default_ms']:.4f} |")
    text = "\n".join(lines) + "\n"
    (out / f"{slug}-tune-confirm.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
