"""The tuned YAML and dispatch (CPU): round trip, merge, concurrent writers, broken files, the rule order,
explain, and the host cost of a lookup."""
from __future__ import annotations

import multiprocessing
import time
import warnings
from pathlib import Path

import pytest
import yaml

import fwagen
from fwagen import dispatch, registry
from fwagen.problem import Problem
from fwagen.registry import Entry, ProblemClass, RegistryError
from fwagen.space import candidates, default_backward, default_variant, static_violation
from fwagen.variant import BackwardVariant, ForwardVariant

H200 = {"name": "NVIDIA H200", "compute_capability": "sm_90", "sm_count": 132}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "sm_90", "sm_count": 132}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "sm_80", "sm_count": 108}
P49 = Problem(49, 32, "float16", True, True)
VERSIONS = {"fwagen": "0.1.0", "torch": "2.11", "cuda": "13.0", "driver": "13.0", "date": "2026-01-01T00:00:00+00:00"}


def legal(problem=P49, arch="sm_90"):
    return candidates(problem, arch)[0]


def entry(pclass: ProblemClass, variant=None, ms=0.1, default_ms=0.2, trials=10) -> Entry:
    variant = variant or legal(pclass.problem)[0]
    return Entry(pclass, variant, ms, 0.01, default_variant(pclass.problem).key(), default_ms, trials, 12.5, "tpe",
                 "study", False, VERSIONS)


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """An empty tuned folder that dispatch reads (FWAGEN_TUNED_DIR), with dispatch's memory cleared."""
    folder = tmp_path / "tuned"
    folder.mkdir()
    monkeypatch.setenv(registry.TUNED_DIR_ENV, str(folder))
    dispatch.reload()
    yield folder
    dispatch.reload()


# --- the file ------------------------------------------------------------------------------------------------

def test_entries_round_trip_through_yaml_with_provenance(tuned):
    variants = legal()
    written = [entry(ProblemClass(P49, 4096), variants[3], 0.05, 0.07, 48),
               entry(ProblemClass(Problem(49, 32, "bfloat16", True, False, "bwd"), 1024),
                     default_backward(Problem(49, 32, "bfloat16", True, False, "bwd")), 0.3, None, 5)]
    path = registry.save(written, H200)
    assert path == tuned / "nvidia-h200.yaml"
    loaded = registry.load(path)
    assert (loaded.gpu, loaded.arch, loaded.sm_count) == ("NVIDIA H200", "sm_90", 132)
    assert {k: (e.variant, e.median_ms, e.default_ms, e.trials, e.tuned_with) for k, e in loaded.entries.items()} == \
        {e.pclass.key(): (e.variant, e.median_ms, e.default_ms, e.trials, VERSIONS) for e in written}
    raw = yaml.safe_load(path.read_text())
    assert raw["schema"] == registry.SCHEMA_VERSION
    assert raw["entries"]["fwd_n49_d32_float16_bm_x4096"]["default"] == {"key": default_variant(P49).key(),
                                                                         "median_ms": 0.07}


def test_this_process_provenance_is_plain_yaml(tuned):
    # torch.__version__ is a str subclass that yaml.safe_dump refuses; the real provenance must round trip.
    provenance = registry.tuned_with()
    assert all(value is None or type(value) is str for value in provenance.values()), provenance
    written = Entry(ProblemClass(P49, 1024), legal()[0], 0.05, 0.01, default_variant(P49).key(), 0.07, 3, 1.0,
                    "grid", "study", False, provenance)
    loaded = registry.load(registry.save([written], H200)).entries[written.pclass.key()]
    assert loaded.tuned_with == provenance


def test_a_write_merges_with_the_file_and_replaces_only_its_own_class(tuned):
    first, second = ProblemClass(P49, 1024), ProblemClass(P49, 4096)
    registry.save([entry(first, legal()[0])], H200)
    registry.save([entry(second, legal()[1])], H200)
    registry.save([entry(first, legal()[2], ms=0.01)], H200)
    entries = registry.load(tuned / "nvidia-h200.yaml").entries
    assert set(entries) == {first.key(), second.key()}
    assert entries[first.key()].variant == legal()[2] and entries[first.key()].median_ms == 0.01
    assert entries[second.key()].variant == legal()[1]
    assert not list(tuned.glob("*.tmp")), "no temporary file is left behind"


def _write_entries(folder: str, worker: int, count: int) -> None:
    import os

    os.environ[registry.TUNED_DIR_ENV] = folder
    variants = legal()
    for i in range(count):
        pclass = ProblemClass(Problem(16 + worker, 32, "float16", True, bool(i % 2)), 4 ** (i // 2 + 1))
        variant = ForwardVariant(pclass.problem, **variants[i].knobs())
        registry.save([entry(pclass, variant, ms=0.1 + i)], H200)


def test_concurrent_writers_lose_no_entry(tuned):
    workers, per_worker = 4, 6
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_write_entries, args=(str(tuned), w, per_worker)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    entries = registry.load(tuned / "nvidia-h200.yaml").entries
    assert len(entries) == workers * per_worker


@pytest.mark.parametrize("text, problem", [
    ("entries: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    ("schema: 99\ngpu: {name: NVIDIA H200, compute_capability: sm_90}\n", "schema version 99"),
    ("schema: 1\ngpu: {name: NVIDIA H100}\n", "gpu: expected name and compute_capability"),
    ("schema: 1\ngpu: {name: NVIDIA A100, compute_capability: sm_80}\nentries: {}\n", "whose file is nvidia-a100"),
])
def test_a_broken_file_is_an_error_naming_the_file_and_the_problem(tuned, text, problem):
    path = tuned / "nvidia-h200.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=problem) as error:
        registry.load(path)
    assert str(path) in str(error.value)


def test_a_broken_entry_is_named_and_skipped_when_not_strict(tuned):
    registry.save([entry(ProblemClass(P49, 1024))], H200)
    path = tuned / "nvidia-h200.yaml"
    data = yaml.safe_load(path.read_text())
    data["entries"]["fwd_n49_d32_float16_bm_x4096"] = {"variant": {"kind": "mma", "warp_dance": 3},
                                                       "median_ms": 0.1, "trials": 1}
    data["entries"]["fwd_n49_d32_float16_bm_x16384"] = {"variant": {"kind": "bwd_mma"}, "median_ms": 0.1, "trials": 1}
    data["entries"]["fwd_n49_d32_float16_bm_x64"] = {**data["entries"]["fwd_n49_d32_float16_bm_x1024"],
                                                     "median_ms": -1}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match=r"nvidia-h200.yaml: entry fwd_n49_d32_float16_bm_x\d+"):
        registry.load(path)
    tuned_file = registry.load(path, strict=False)
    assert set(tuned_file.entries) == {"fwd_n49_d32_float16_bm_x1024"}
    problems = "\n".join(tuned_file.problems)
    assert "unknown mma variant knobs: ['warp_dance']" in problems
    assert "cannot serve a fwd class" in problems
    assert "median_ms: expected a finite number >= 0" in problems


def test_a_corrupt_file_is_never_overwritten_by_a_merge(tuned):
    path = tuned / "nvidia-h200.yaml"
    path.write_text("entries: [unclosed\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        registry.save([entry(ProblemClass(P49, 1024))], H200)
    assert path.read_text() == "entries: [unclosed\n"


def test_class_keys_round_trip_and_bad_ones_are_refused():
    for pclass in (ProblemClass(P49, 4096), ProblemClass(Problem(576, 128, "bfloat16", False, False, "bwd"), 1)):
        assert ProblemClass.from_key(pclass.key()) == pclass
    for bad in ("fwd_n49_d32_float16_bm", "fwd_n49_d32_float16_bm_x1000", "sideways_n49_d32_float16_bm_x64"):
        with pytest.raises(ValueError):
            ProblemClass.from_key(bad)


def test_tuned_dir_is_the_checkout_folder_unless_the_environment_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.TUNED_DIR_ENV, raising=False)
    assert registry.tuned_dir() == Path(__file__).resolve().parent.parent / "tuned"
    monkeypatch.setenv(registry.TUNED_DIR_ENV, str(tmp_path))
    assert registry.tuned_dir() == tmp_path


# --- dispatch ------------------------------------------------------------------------------------------------

def test_dispatch_rules_fall_back_in_order(tuned):
    variants = legal()
    exact, near, far, peer = variants[5], variants[6], variants[7], variants[8]
    assert default_variant(P49) not in (exact, near, far, peer)
    registry.save([entry(ProblemClass(P49, 4096), exact), entry(ProblemClass(P49, 256), near),
                   entry(ProblemClass(P49, 1), far)], H200)
    registry.save([entry(ProblemClass(P49, 16384), peer)], H100)
    dispatch.reload()
    h200, h100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"

    choice = dispatch.choose(P49, 4096, "sm_90", h200)
    assert (choice.variant, choice.rule) == (exact, "tuned for this GPU")
    assert "nvidia-h200.yaml: fwd_n49_d32_float16_bm_x4096" in choice.source
    choice = dispatch.choose(P49, 1024, "sm_90", h200)  # 256 and 4096 are equally near: the larger wins
    assert (choice.variant, choice.rule) == (exact, "nearest tuned class on this GPU (x4096)")
    choice = dispatch.choose(P49, 64, "sm_90", h200)
    assert (choice.variant, choice.rule) == (near, "nearest tuned class on this GPU (x256)")
    choice = dispatch.choose(P49, 4, "sm_90", h200)
    assert (choice.variant, choice.rule) == (far, "nearest tuned class on this GPU (x1)")
    choice = dispatch.choose(P49, 4096, "sm_90", "NVIDIA H800")  # untuned GPU of the same architecture
    assert choice.variant == exact and choice.rule.startswith("tuned on NVIDIA H200 (same sm_90")
    choice = dispatch.choose(P49, 16384, "sm_90", "NVIDIA H800")  # the nearest among every same-arch GPU
    assert choice.variant == peer and choice.rule.startswith("tuned on NVIDIA H100 80GB HBM3")
    assert dispatch.choose(P49, 16384, "sm_90", h100).rule == "tuned for this GPU"
    for arch, gpu in (("sm_80", "NVIDIA A100-SXM4-80GB"), ("sm_90", None)):
        if gpu is None:  # no GPU name known: only the architecture rule and the default remain
            assert dispatch.choose(P49, 4096, arch, gpu).rule.startswith("tuned on")
            continue
        choice = dispatch.choose(P49, 4096, arch, gpu)
        assert (choice.variant, choice.rule) == (default_variant(P49, arch), "built-in default")
    other = Problem(49, 32, "float16", True, False)
    assert dispatch.choose(other, 4096, "sm_90", h200).rule == "built-in default"


def test_dispatch_skips_a_tuned_variant_illegal_on_the_architecture(tuned):
    too_big = next(v for v in legal() if static_violation(v, "sm_86") is not None)
    fits = next(v for v in legal() if static_violation(v, "sm_86") is None and v != default_variant(P49, "sm_86"))
    registry.save([entry(ProblemClass(P49, 4096), too_big), entry(ProblemClass(P49, 1024), fits)],
                  {"name": "NVIDIA RTX A6000", "compute_capability": "sm_86", "sm_count": 84})
    dispatch.reload()
    choice = dispatch.choose(P49, 4096, "sm_86", "NVIDIA RTX A6000")
    assert (choice.variant, choice.rule) == (fits, "nearest tuned class on this GPU (x1024)")


def test_a_broken_file_makes_dispatch_fall_back_and_warn_once(tuned):
    registry.save([entry(ProblemClass(P49, 4096), legal()[5])], H100)
    (tuned / "nvidia-h200.yaml").write_text("schema: 1\ngpu: [oops\n")
    dispatch.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = dispatch.choose(P49, 4096, "sm_90", "NVIDIA H200")
        dispatch.choose(Problem(64, 32, "float16", True, True), 4096, "sm_90", "NVIDIA H200")
    assert choice.rule.startswith("tuned on NVIDIA H100")  # the H200 file is skipped, the H100 one still serves
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "nvidia-h200.yaml: not valid YAML" in messages[0]
    assert "falls back" in messages[0]


def test_backward_dispatch_uses_tuned_entries_and_defaults_to_the_tiled_kernel_past_the_whole_window_one(tuned):
    bwd = Problem(49, 32, "float16", True, True, "bwd")
    other = next(v for v in (BackwardVariant(bwd, stages=s, min_blocks=b) for s in (1, 2) for b in (1, 2, 3, 4))
                 if v != default_backward(bwd) and static_violation(v) is None)
    registry.save([entry(ProblemClass(bwd, 4096), other)], H200)
    dispatch.reload()
    assert dispatch.choose_backward_for(P49, 3000, "sm_90") == \
        dispatch.choose_backward(P49, 4096, "sm_90", dispatch.gpu_name())
    assert dispatch.choose_backward(P49, 4096, "sm_90", "NVIDIA H200") .variant == other
    assert dispatch.choose_backward(P49, 4096, "sm_80", "NVIDIA A100").rule == "built-in default"
    large = dispatch.choose_backward(Problem(256, 32, "float16", True, True), 4096, "sm_90")
    assert large.variant.kind == "bwd_tile" and large.rule == "built-in default"


def test_explain_names_the_rule_and_the_source_for_forward_and_backward(tuned):
    registry.save([entry(ProblemClass(P49, 16384), legal()[5])], H200)
    dispatch.reload()
    text = fwagen.explain(P49, 8192 * 3, "sm_90", gpu="NVIDIA H200")
    forward_line, backward_line = text.splitlines()
    assert forward_line == (f"fwd_n49_d32_float16_bm x16384 on sm_90: {legal()[5].key()} (tuned for this GPU from "
                            f"{tuned / 'nvidia-h200.yaml'}: fwd_n49_d32_float16_bm_x16384)")
    assert backward_line.startswith("bwd_n49_d32_float16_bm x16384 on sm_90: fwagen_bwd_mma_")
    assert text.forward.variant == legal()[5] and text.backward.rule == "built-in default"


def test_explain_of_cpu_tensors_says_the_reference_runs():
    import torch

    q = torch.randn(4, 2, 9, 16)
    text = fwagen.explain(q, q, q)
    assert text.forward is None and "no kernel for cpu tensors" in text


def test_a_dispatch_lookup_costs_microseconds(tuned):
    registry.save([entry(ProblemClass(P49, 16384), legal()[5])], H200)
    dispatch.reload()
    dispatch.choose_for(P49, 8192 * 3, "sm_90")
    calls = 20000
    started = time.perf_counter()
    for _ in range(calls):
        dispatch.choose_for(P49, 8192 * 3, "sm_90")
    per_call_us = (time.perf_counter() - started) / calls * 1e6
    # About 2 us here (a kernel launch costs about 5 us of host time); the bound leaves room for a busy CI.
    assert per_call_us < 10, f"{per_call_us:.2f} us per lookup"


def test_reload_also_clears_memos_registered_elsewhere(tuned):
    memo = {"shape": "a variant chosen before the reload"}
    dispatch.on_reload(memo.clear)
    try:
        dispatch.reload()
        assert memo == {}
    finally:
        dispatch._reload_hooks.remove(memo.clear)
