"""The tuner on a GPU (marker gpu): a short real run ends with a verified winner in a temporary YAML that the
op then dispatches to; the evaluator records failures as measurements."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fwagen
from fwagen import dispatch, registry, tune
from fwagen.compiler import CompileError
from fwagen.evaluate import ForwardBench, GpuEvaluator
from fwagen.recording import Recorder, RecordingEvaluator
from fwagen.problem import Problem
from fwagen.registry import ProblemClass
from fwagen.space import candidates

from helpers import allowed_error, make_inputs, reference64

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
FORWARD = ProblemClass(Problem(49, 32, "float16", True, True), 1024)
BACKWARD = ProblemClass(Problem(49, 32, "float16", True, True, "bwd"), 1024)


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    folder = tmp_path / "tuned"
    monkeypatch.setenv(registry.TUNED_DIR_ENV, str(folder))
    forget_choices()
    yield folder
    monkeypatch.delenv(registry.TUNED_DIR_ENV)
    forget_choices()


def forget_choices():
    dispatch.reload()
    # The op memoizes its dispatched variants per call shape; forget them too (until op.py registers them with
    # dispatch.on_reload, after which dispatch.reload() does it).
    for memo in ("_choices", "_backward_choices"):
        getattr(fwagen.op, memo, {}).clear()


@pytest.fixture(scope="module")
def evaluator():
    gpu = GpuEvaluator(jobs=os.cpu_count(), reps=20, warmup=5, retime_rounds=10)
    yield gpu
    gpu.close()


def test_a_short_tuning_run_ends_with_a_verified_winner_the_op_dispatches_to(tuned, tmp_path, evaluator):
    recorder = Recorder(evaluator, tmp_path / "run.jsonl")
    report = tune.tune([FORWARD], recorder, storage=str(tmp_path / "studies.journal"), trials=8, seed=0,
                       plots=tmp_path / "plots")
    result = report.results[0]
    assert result.trials == 8 and result.winner is not None and result.winner_m.ok
    by_key = {m.key: m for _, m in result.history}
    verified = by_key[result.winner.key()]
    assert verified.ok and verified.error <= verified.allowed_error
    assert result.default_m is not None and result.default_m.ok
    entry = registry.load(tuned / f"{registry.gpu_slug(torch.cuda.get_device_name())}.yaml").entries[FORWARD.key()]
    assert entry.variant == result.winner and entry.trials == 8 and entry.tuned_with["torch"] == torch.__version__
    assert RecordingEvaluator(tmp_path / "run.jsonl").covers(FORWARD) == set(by_key)

    forget_choices()
    windows, heads = 384, 3  # 1152 windows x heads: bucket 1024
    q, k, v, b, m = make_inputs(windows, heads, 49, 32, torch.float16, mask_windows=64, qkv_strided=True)
    explained = fwagen.explain(q, k, v, b, m)
    assert explained.forward.variant == result.winner
    assert explained.forward.rule == "tuned for this GPU", str(explained)
    out = fwagen.window_attention(q, k, v, b, m)
    expected = reference64(q, k, v, b, m)
    assert (out.double() - expected).abs().max().item() <= allowed_error(q, k, v, b, m, expected)


def test_a_backward_class_is_swept_and_dispatched(tuned, tmp_path, evaluator):
    report = tune.tune([BACKWARD], evaluator, storage=str(tmp_path / "studies.journal"), seed=0)
    result = report.results[0]
    assert result.sampler == "grid" and result.winner is not None
    assert all(m.status in ("ok", "resource") for _, m in result.history), \
        [(m.key, m.status, m.reason) for _, m in result.history]
    q, k, v, b, m = make_inputs(384, 3, 49, 32, torch.float16, mask_windows=64, qkv_strided=True)
    explained = fwagen.explain(q, k, v, b, m)
    assert explained.backward.variant == result.winner and explained.backward.rule == "tuned for this GPU"


def test_failures_are_measurements(evaluator, monkeypatch):
    legal, _ = candidates(FORWARD.problem, evaluator.arch)
    variant = legal[0]

    def broken(*args):
        raise CompileError("NVRTC failed on purpose; source saved to /dev/null")

    monkeypatch.setattr("fwagen.compiler.compile_variant", broken)
    fresh = ProblemClass(Problem(64, 32, "bfloat16", True, False), 1024)  # nothing of it prefetched before
    measured = evaluator.evaluate(fresh, candidates(fresh.problem, evaluator.arch)[0][0])
    assert measured.status == "compile_error" and "on purpose" in measured.reason
    monkeypatch.undo()

    monkeypatch.setattr("fwagen.space.resource_violation", lambda v, r: "spills 999 B")
    measured = evaluator.evaluate(FORWARD, variant)
    assert (measured.status, measured.reason) == ("resource", "spills 999 B")
    monkeypatch.undo()

    monkeypatch.setattr(ForwardBench, "launch", lambda self, v: None)  # writes nothing: poisoned output stays
    measured = evaluator.evaluate(FORWARD, variant)
    assert measured.status == "wrong" and "unwritten" in measured.reason
    monkeypatch.undo()
    assert evaluator.evaluate(FORWARD, variant).ok


def test_cli_tunes_one_class_on_this_gpu(tmp_path):
    env = {**os.environ, registry.TUNED_DIR_ENV: str(tmp_path / "tuned")}
    result = subprocess.run([sys.executable, "cli.py", "tune", "--problem", FORWARD.key(), "--trials", "4",
                             "--storage", str(tmp_path / "j"), "--plots", str(tmp_path / "plots"), "--seed", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert FORWARD.key() in result.stdout and "wrote" in result.stdout
    assert list((tmp_path / "tuned").glob("*.yaml"))
