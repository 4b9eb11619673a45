"""CPU tests of the command line and the dry run: counts that add up, a sample that covers every knob value,
failures recorded rather than raised, the no-GPU fallback, and `show` on an empty tuned folder."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fwagen import cli_main, tune
from fwagen.compiler import CompiledKernel, CompileError, Resources
from fwagen.problem import Problem
from fwagen.space import candidates, default_variant, resource_violation

ROOT = Path(__file__).resolve().parent.parent
SMALL = [Problem(49, 32, "float16", has_bias=True, has_mask=True), Problem(64, 32, "float32", has_bias=True)]
HUGE_SPILL = 1 << 20  # bytes of spill stores: past any limit the space may set
COLUMNS = ("candidates", "not sampled", "compiled", "pruned statically", "pruned by resources", "failed")


@pytest.fixture(autouse=True)
def fresh_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FWAGEN_CACHE_DIR", str(tmp_path / "cache"))


def run_cli(*args, env=None, timeout=300):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(output: str) -> dict[str, list[int]]:
    """problem key (or 'total') -> the six counts of its row in the printed table."""
    rows = {}
    for line in output.splitlines():
        found = re.fullmatch(r"(\S+)\s+" + r"\s+".join([r"(\d+)"] * len(COLUMNS)), line.strip())
        if found:
            rows[found.group(1)] = [int(x) for x in found.groups()[1:]]
    return rows


# --- the dry run -------------------------------------------------------------------------------------------


def test_dry_run_counts_add_up_and_compiled_cubins_exist():
    calls = []
    report = tune.dry_run("sm_80", SMALL, jobs=2, sample=4, progress=lambda done, total: calls.append((done, total)))
    assert [o.problem for o in report.outcomes] == SMALL
    for outcome in report.outcomes:
        legal, pruned = candidates(outcome.problem, "sm_80")
        assert outcome.candidates == len(legal) + len(pruned)
        assert outcome.pruned_statically == pruned
        sampled = tune.sample_variants(outcome.problem, legal, 4)
        assert outcome.not_sampled == len(legal) - len(sampled)
        assert set(outcome.compiled) | set(outcome.pruned_by_resources) | set(outcome.failed) == \
            {v.key() for v in sampled}
        assert outcome.candidates == (outcome.not_sampled + len(outcome.compiled) + len(outcome.pruned_statically)
                                      + len(outcome.pruned_by_resources) + len(outcome.failed))
        assert not outcome.failed, outcome.failed
        assert outcome.compiled, "at least one variant of each problem must compile"
        for cubin in outcome.compiled.values():
            assert Path(cubin).stat().st_size > 0
    totals = report.totals()
    assert totals["candidates"] == sum(o.candidates for o in report.outcomes)
    assert sum(v for name, v in totals.items() if name != "candidates") == totals["candidates"]
    compiled_or_rejected = totals["compiled"] + totals["pruned by resources"] + totals["failed"]
    assert calls == [(i, compiled_or_rejected) for i in range(1, compiled_or_rejected + 1)]
    static_reasons = sum(n for (stage, _), n in report.reasons().items() if stage == "static")
    assert static_reasons == totals["pruned statically"]


def test_sample_covers_every_knob_value_includes_the_default_and_is_deterministic():
    problem = Problem(144, 32, "bfloat16", has_bias=True, has_mask=True)
    legal, _ = candidates(problem, "sm_90")
    sample = tune.sample_variants(problem, legal, 3)
    assert sample == tune.sample_variants(problem, legal, 3)
    assert len(set(sample)) == len(sample) < len(legal)
    assert set(sample) <= set(legal)
    if default_variant(problem) in legal:
        assert default_variant(problem) in sample
    for knob in legal[0].knobs():
        assert {v.knobs()[knob] for v in sample} == {v.knobs()[knob] for v in legal}, knob
    bigger = tune.sample_variants(problem, legal, 40)
    assert len(bigger) == 40 and set(sample) <= set(bigger)
    assert tune.sample_variants(problem, legal, len(legal)) == legal


def test_swin_preset_has_every_window_dtype_and_mask_setting():
    preset = tune.swin_preset()
    assert len(preset) == len(set(preset)) == 5 * 3 * 2
    assert {p.n for p in preset} == {49, 64, 144, 256, 576}
    assert {p.head_dim for p in preset} == {32}
    assert {(p.dtype, p.has_mask) for p in preset} == {(d, m) for d in ("float16", "bfloat16", "float32")
                                                        for m in (False, True)}
    assert all(p.has_bias for p in preset)


def test_compile_errors_are_recorded_and_resource_limits_prune(monkeypatch):
    problem = SMALL[1]
    legal, _ = candidates(problem, "sm_90")
    broken, spilling = legal[0].key(), legal[1].key()
    spill_reason = resource_violation(legal[1], Resources(40, HUGE_SPILL, 0, 0))
    assert spill_reason is not None

    def fake_compile(variant, arch):
        if variant.key() == broken:
            raise CompileError(f"NVRTC failed on {broken} for {arch}; source saved to /tmp/x.cu")
        spills = HUGE_SPILL if variant.key() == spilling else 0
        return CompiledKernel(variant.key(), arch, Path("/nonexistent.cubin"), Resources(40, spills, 0, 0))

    monkeypatch.setattr(tune, "compile_variant", fake_compile)
    report = tune.dry_run("sm_90", [problem], jobs=2)
    outcome = report.outcomes[0]
    assert list(outcome.failed) == [broken]
    assert outcome.failed[broken][0] == "compile error"
    assert outcome.pruned_by_resources == {spilling: spill_reason}
    assert len(outcome.compiled) == len(legal) - 2
    assert report.reasons()[("failed", "compile error")] == 1
    assert report.reasons()[("resources", re.sub(r"\d+", "#", spill_reason))] == 1
    assert f"first failure, {broken}" in report.table()


# --- the command line --------------------------------------------------------------------------------------


def test_cli_dry_run_reports_numbers_that_add_up():
    result = run_cli("tune", "--dry-run", "--arch", "sm_80", "--problem", "n49_d32_float32_b",
                     "--problem", "n64_d32_float16_plain", "--sample", "3")
    assert result.returncode == 0, result.stderr
    assert "dry run for sm_80: 2 problems" in result.stdout
    rows = table_rows(result.stdout)
    assert set(rows) == {"fwd_n49_d32_float32_b", "fwd_n64_d32_float16_plain", "total"}
    for key in ("fwd_n49_d32_float32_b", "fwd_n64_d32_float16_plain"):
        total, *parts = rows[key]
        assert total == sum(parts) and parts[1] > 0 and parts[-1] == 0
    assert rows["total"] == [a + b for a, b in zip(rows["fwd_n49_d32_float32_b"], rows["fwd_n64_d32_float16_plain"])]
    assert "reasons" in result.stdout


def test_cli_tune_without_gpu_says_so_and_runs_the_dry_run_for_sm90():
    # CUDA_VISIBLE_DEVICES hides any GPU, so this holds on the GPU machine too.
    result = run_cli("tune", "--problem", "n49_d32_float32_bm", "--sample", "2", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "no CUDA GPU found: compiling the kernel space for sm_90 instead (dry run)"
    assert lines[1].startswith("dry run for sm_90: 1 problems")
    total, *parts = table_rows(result.stdout)["fwd_n49_d32_float32_bm"]
    assert total == sum(parts) and parts[1] >= 1


def test_tune_dry_run_defaults_to_the_gpu_arch(monkeypatch, capsys):
    seen = {}

    def fake_dry_run(arch, problems=None, jobs=2, sample=None, progress=None):
        seen.update(arch=arch, problems=problems, jobs=jobs, sample=sample)
        return tune.DryRunReport(arch, [], 0.0, jobs, sample)

    monkeypatch.setattr(cli_main, "_gpu_arch", lambda: "sm_86")
    monkeypatch.setattr(tune, "dry_run", fake_dry_run)
    assert cli_main.main(["tune", "--dry-run", "--jobs", "3", "--all"]) == 0
    assert seen == {"arch": "sm_86", "problems": None, "jobs": 3, "sample": None}
    assert "dry run for sm_86" in capsys.readouterr().out


def test_show_on_an_empty_tuned_folder_says_nothing_tuned_yet(tmp_path):
    result = run_cli("show", "--tuned-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("nothing tuned yet")


def test_show_lists_tuned_yaml_files_only(tmp_path, capsys):
    (tmp_path / "nvidia-h100.yaml").write_text("{}\n")
    (tmp_path / "README.md").write_text("not a config\n")
    assert cli_main.main(["show", "--tuned-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "nvidia-h100.yaml")]


def test_problem_keys_round_trip_and_bad_keys_name_the_problem():
    for problem in SMALL + [Problem(576, 128, "bfloat16", has_bias=False, has_mask=False),
                            Problem(9, 16, "float16", has_bias=False, has_mask=True)]:
        assert cli_main.problem_from_key(problem.key()) == problem
    for bad in ("n49_d32_float16", "n49_d30_float16_b", "n49_d32_float64_b", "x49_d32_float16_b"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            cli_main.problem_from_key(bad)


def test_bench_arguments_are_forwarded_whole(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_bench_without_gpu_says_so_without_a_traceback():
    # CUDA_VISIBLE_DEVICES hides any GPU, so this holds on the GPU machine too.
    result = run_cli("bench", "--quick", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("fwagen bench: no CUDA GPU found") and "tune --dry-run" in result.stderr


def test_checkout_reads_the_top_level_tuned_folder():
    assert cli_main.tuned_dir() == ROOT / "tuned"


def test_arch_names_are_checked_before_anything_compiles():
    assert cli_main.arch_name("sm_80") == "sm_80"
    assert cli_main.arch_name("sm_90a") == "sm_90a"
    for bad in ("90", "sm90", "compute_90", "sm_9"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a name such as sm_80"):
            cli_main.arch_name(bad)
