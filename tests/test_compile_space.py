"""The kernel space renders and compiles with NVRTC for sm_80 and sm_90, on a CPU machine without a GPU.

The full space is several hundred variants per problem: too slow for CI on two cores. What compiles here:
  * a fixed, deterministic sample of each kind's legal variants that covers every value of every knob, in
    fact every legal pair of knob values and every (problem of SPACE_PROBLEMS, knob value) pair, chosen
    greedily from a seeded shuffle, separately per architecture;
  * `default_variant` of every problem of PROBLEMS, a covering sample of N x d x dtype x bias x mask.
Everything legal is rendered (cheap); only the samples go through NVRTC, two threads at a time (NVRTC
releases the GIL), into a fresh cache folder so that every kernel really is compiled.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fwagen
from fwagen import compiler, registry
from fwagen.compiler import CompileError, compile_variant, parse_ptxas_report
from fwagen.problem import Problem
from fwagen.render import render
from fwagen.space import (backward_candidates, candidates, default_backward, default_variant, max_smem,
                          resource_violation, static_violation)
from fwagen.variant import (BackwardSimtVariant, BackwardTileVariant, BackwardVariant, ForwardStreamVariant,
                            ForwardVariant, ForwardWgmmaStreamTmaVariant, ForwardWgmmaStreamVariant,
                            ForwardWgmmaTmaVariant, ForwardWgmmaVariant, SimtVariant, variant_from_dict)

ARCHS = ("sm_80", "sm_90")

# Defaults: every N, d, dtype, and bias/mask on and off appears; the released Swin shapes (d = 32) are in.
PROBLEMS = [
    Problem(1, 8, "float16", False, False),
    Problem(1, 64, "bfloat16", True, True),
    Problem(9, 16, "bfloat16", True, False),
    Problem(9, 128, "float16", True, True),
    Problem(9, 32, "float32", False, True),
    Problem(49, 32, "float16", True, True),
    Problem(49, 32, "bfloat16", True, True),
    Problem(49, 32, "float32", True, True),
    Problem(64, 64, "bfloat16", False, True),
    Problem(64, 16, "float32", True, True),
    Problem(144, 32, "bfloat16", True, False),
    Problem(144, 128, "float32", False, True),
    Problem(256, 32, "float16", True, True),
    Problem(576, 32, "float16", True, True),
    Problem(576, 64, "float32", True, False),
    Problem(576, 8, "bfloat16", False, False),
    Problem(1024, 128, "bfloat16", True, True),
    Problem(1024, 32, "float16", False, True),
    Problem(1024, 8, "float32", False, False),
]
# Whole-window backward kernels (fp16/bf16): every legal one of these compiles for sm_90, the defaults for sm_80 too.
# Windows up to 96 tokens use the small-window layout, 100 and 144 the large-window one (bwd_mma_large.cu.j2).
BACKWARD_PROBLEMS = [
    Problem(1, 16, "float16", True, True, "bwd"),
    Problem(9, 64, "bfloat16", False, True, "bwd"),
    Problem(49, 32, "float16", True, True, "bwd"),
    Problem(49, 32, "bfloat16", True, False, "bwd"),
    Problem(64, 128, "float16", True, False, "bwd"),
    Problem(100, 32, "bfloat16", True, True, "bwd"),
    Problem(144, 32, "float16", True, True, "bwd"),
    Problem(144, 16, "bfloat16", False, False, "bwd"),
]


def backward_jobs():
    """(variant, arch) pairs of the backward kernels compiled here."""
    pairs = [(v, "sm_90") for p in BACKWARD_PROBLEMS for v in backward_candidates(p, "sm_90")[0] if v.kind == "bwd_mma"]
    pairs += [(v, "sm_80") for v in (default_backward(p, "sm_80") for p in BACKWARD_PROBLEMS) if v is not None]
    return pairs


# Sources of the knob-covering sample: small, medium, large N; narrow and wide heads; both kinds.
SPACE_PROBLEMS = [
    Problem(9, 16, "float16", False, False),
    Problem(49, 32, "float16", True, True),
    Problem(64, 64, "bfloat16", False, True),
    Problem(144, 32, "bfloat16", True, False),
    Problem(576, 32, "float16", True, True),
    Problem(1024, 128, "bfloat16", True, True),
    Problem(1, 8, "float32", False, False),
    Problem(49, 32, "float32", True, True),
    Problem(144, 128, "float32", False, True),
    Problem(576, 64, "float32", True, False),
]
# ... and of the tiled tensor-core backward (16-bit) and the CUDA-core backward (float32).
BACKWARD_SPACE_PROBLEMS = [
    Problem(9, 8, "float32", False, False, "bwd"),
    Problem(49, 32, "float32", True, True, "bwd"),
    Problem(144, 128, "float16", True, False, "bwd"),
    Problem(576, 32, "bfloat16", True, True, "bwd"),
    Problem(1024, 128, "float16", False, True, "bwd"),
]


def space_pool(arch: str) -> list:
    """Every legal variant the sample is drawn from."""
    return ([v for problem in SPACE_PROBLEMS for v in candidates(problem, arch)[0]]
            + [v for problem in BACKWARD_SPACE_PROBLEMS for v in backward_candidates(problem, arch)[0]])


def features(variant) -> set:
    """What a sampled variant covers: every pair of its (knob, value) settings and its problem, per kind.
    Pairs, not single values: a knob value that only breaks next to another one is still compiled."""
    settings = [*variant.knobs().items(), ("problem", variant.problem)]
    return {(variant.kind, *a, *b) for a, b in itertools.combinations(settings, 2)}


def covering_sample(arch: str) -> list:
    """Greedy set cover of every legal pair of knob values (and of knob value and problem) of each kind, from a
    seeded shuffle (a str seed hashes the same in every process), so the sample is fixed and deterministic."""
    pool = space_pool(arch)
    random.Random(f"fwagen-compile-sample-{arch}").shuffle(pool)
    uncovered = set().union(*(features(v) for v in pool))
    chosen = []
    while uncovered:
        best = max(pool, key=lambda v: len(features(v) & uncovered))  # first of the ties: the shuffle decides
        chosen.append(best)
        uncovered -= features(best)
    return chosen


SAMPLE = {arch: covering_sample(arch) for arch in ARCHS}


def committed_picks() -> list:
    """(variant, arch) of every entry of the committed tuned files, each once: the kernels dispatch serves."""
    picks = {}
    for path in sorted((Path(__file__).resolve().parent.parent / "tuned").glob("*.yaml")):
        tuned = registry.load(path, strict=True)
        for entry in tuned.entries.values():
            picks.setdefault((entry.variant.key(), tuned.arch), (entry.variant, tuned.arch))
    return list(picks.values())


COMMITTED_PICKS = committed_picks()


# --- compiling, two threads, into a fresh cache -----------------------------------------------------------------


_BACKGROUND: list = []  # every job of compile_jobs, so that tests patching the compiler wait for them first


@pytest.fixture(scope="module")
def compile_jobs(tmp_path_factory):
    """Start compiling the sample and the defaults for both architectures; tests wait for their own kernel."""
    cache = tmp_path_factory.mktemp("fwagen-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWAGEN_CACHE_DIR", str(cache))
        patch.setattr(compiler, "_memory", {})
        jobs = {}
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()

            def timed(variant, arch):
                begin = time.perf_counter()
                compiled = compile_variant(variant, arch)
                return compiled, time.perf_counter() - begin

            for arch in ARCHS:
                for variant in SAMPLE[arch] + [default_or_none(p, arch) for p in PROBLEMS]:
                    if variant is not None and (variant, arch) not in jobs and static_violation(variant, arch) is None:
                        jobs[variant, arch] = pool.submit(timed, variant, arch)
            for variant, arch in backward_jobs() + COMMITTED_PICKS:
                jobs.setdefault((variant, arch), pool.submit(timed, variant, arch))
            for arch in ARCHS:  # (default_backward compiles its CUDA-core choices itself, to check for spills)
                for problem in PROBLEMS:
                    variant = default_backward(dataclasses.replace(problem, direction="bwd"), arch)
                    if variant is not None:
                        jobs.setdefault((variant, arch), pool.submit(timed, variant, arch))
            _BACKGROUND.extend(jobs.values())
            yield jobs
            seconds = sum(job.result()[1] for job in jobs.values() if job.done() and not job.exception())
        wall = time.perf_counter() - started
        print(f"\ncompiled {len(jobs)} kernels: {wall:.1f} s wall, {seconds:.1f} s of NVRTC on 2 threads")


def default_or_none(problem, arch):
    try:
        return default_variant(problem, arch)
    except AssertionError:  # no legal default: reported by test_default_variant_is_legal_and_compiles_...
        return None


def compiled(jobs, variant, arch):
    return jobs[variant, arch].result()[0]


def test_sample_covers_every_pair_of_knob_values_and_every_problem_of_each_kind():
    for arch in ARCHS:
        legal = space_pool(arch)
        covered = set().union(*(features(v) for v in SAMPLE[arch]))
        assert covered == set().union(*(features(v) for v in legal))
        wgmma = {"wgmma": ForwardWgmmaVariant, "wgmma_stream": ForwardWgmmaStreamVariant,
                 "wgmma_tma": ForwardWgmmaTmaVariant, "wgmma_stream_tma": ForwardWgmmaStreamTmaVariant} \
            if arch == "sm_90" else {}
        assert {v.kind for v in SAMPLE[arch]} == {"mma", "mma_stream", "simt", "bwd_simt", "bwd_tile", *wgmma}
        for kind, cls in (("mma", ForwardVariant), ("mma_stream", ForwardStreamVariant), ("simt", SimtVariant),
                          ("bwd_simt", BackwardSimtVariant), ("bwd_tile", BackwardTileVariant), *wgmma.items()):
            knobs = [f.name for f in dataclasses.fields(cls) if f.name != "problem"]
            for knob in knobs:  # more than one value sampled wherever the space offers more than one
                offered = {getattr(v, knob) for v in legal if v.kind == kind}
                assert {getattr(v, knob) for v in SAMPLE[arch] if v.kind == kind} == offered, (arch, knob)
        assert {v.problem for v in SAMPLE[arch]} == set(SPACE_PROBLEMS + BACKWARD_SPACE_PROBLEMS)
        # Small enough for CI, but not degenerate.
        assert 10 <= len(SAMPLE[arch]) <= 160, len(SAMPLE[arch])


def test_default_problems_cover_every_axis_value():
    assert {p.n for p in PROBLEMS} >= {1, 9, 49, 64, 144, 576, 1024}
    assert {p.head_dim for p in PROBLEMS} >= {8, 16, 32, 64, 128}
    assert {p.dtype for p in PROBLEMS} == {"float16", "bfloat16", "float32"}
    assert {p.has_bias for p in PROBLEMS} == {p.has_mask for p in PROBLEMS} == {True, False}


@pytest.mark.parametrize("variant, arch", [pytest.param(v, arch, id=f"{arch}-{v.key()}")
                                            for arch in ARCHS for v in SAMPLE[arch]])
def test_sampled_variant_compiles_with_registers(compile_jobs, variant, arch):
    kernel = compiled(compile_jobs, variant, arch)
    assert kernel.name == variant.key() and kernel.arch == arch
    assert kernel.cubin_path.is_file() and kernel.cubin_path.stat().st_size > 0
    assert kernel.resources.registers > 0, kernel.resources
    assert kernel.resources.registers <= 255


def default_cases():
    return [pytest.param(p, arch, id=f"{p.key()}-{arch}") for p in PROBLEMS for arch in ARCHS]


@pytest.mark.parametrize("problem, arch", default_cases())
def test_default_variant_is_legal_and_compiles_within_resources(compile_jobs, problem, arch):
    variant = default_variant(problem, arch)
    assert variant.problem == problem
    assert static_violation(variant, arch) is None
    kernel = compiled(compile_jobs, variant, arch)
    assert kernel.resources.registers > 0
    assert resource_violation(variant, kernel.resources) is None, kernel.resources


@pytest.mark.parametrize("variant, arch", [pytest.param(v, a, id=f"{a}-{v.key()}") for v, a in backward_jobs()])
def test_backward_variant_compiles_within_resources(compile_jobs, variant, arch):
    assert static_violation(variant, arch) is None
    kernel = compiled(compile_jobs, variant, arch)
    assert kernel.name == variant.key() and 0 < kernel.resources.registers <= 255
    assert resource_violation(variant, kernel.resources) is None, kernel.resources


def test_the_committed_tuned_files_hold_entries_of_both_directions():
    kinds = {variant.kind for variant, _ in COMMITTED_PICKS}
    assert {"mma", "mma_stream", "bwd_mma", "bwd_tile"} <= kinds, kinds


@pytest.mark.parametrize("variant, arch", [pytest.param(v, a, id=f"{a}-{v.key()}") for v, a in COMMITTED_PICKS])
def test_committed_tuned_pick_is_legal_and_compiles_within_resources(compile_jobs, variant, arch):
    """A template or space change that makes a committed pick illegal, or spill, fails here, not on a user's GPU."""
    assert static_violation(variant, arch) is None
    kernel = compiled(compile_jobs, variant, arch)
    assert kernel.name == variant.key() and 0 < kernel.resources.registers <= 255
    assert resource_violation(variant, kernel.resources) is None, kernel.resources


def test_backward_kinds_by_window_and_dtype_and_why_the_whole_window_kernel_stops_at_144():
    for n in (49, 64, 100, 144):
        problem = Problem(n, 32, "float16", True, True, "bwd")
        legal, _ = backward_candidates(problem, "sm_90")
        assert any(v.kind == "bwd_mma" and v.large_window == (n > 96) for v in legal)  # the tuner may pick it
        assert default_backward(problem, "sm_90").kind == "bwd_mma"  # the large-window layout past 96 (measured)
    # Head dim 64 fits the large-window layout up to 128 tokens, but it was not measured there: the tiled kernel.
    assert default_backward(Problem(112, 64, "float16", True, True, "bwd"), "sm_90").kind == "bwd_tile"
    legal, pruned = backward_candidates(Problem(256, 32, "float16", True, True, "bwd"), "sm_90")
    assert legal and {v.kind for v in legal} == {"bwd_tile"}
    assert any("up to 144 tokens" in reason for key, reason in pruned.items() if "_bwd_mma_" in key)
    legal, pruned = backward_candidates(Problem(144, 64, "float16", True, True, "bwd"), "sm_90")
    assert {v.kind for v in legal} == {"bwd_tile"}
    assert all("shared memory" in reason for key, reason in pruned.items() if "_bwd_mma_" in key)
    legal, _ = backward_candidates(Problem(576, 32, "float32", True, True, "bwd"), "sm_90")
    assert {v.kind for v in legal} == {"bwd_simt"}  # float32 stays float32: no TF32 tensor cores


def test_masked_large_window_backward_takes_dbias_sums_into_shared_memory_only_where_no_gpu_loses_the_kernel():
    """Its dbias groups in shared memory never push the whole-window kernel past a limit it fitted before."""
    taken = []
    for n, d, dtype in itertools.product([*range(97, 144, 4), 144], range(8, 129, 8), ("float16", "bfloat16")):
        masked = BackwardVariant(Problem(n, d, dtype, True, True, "bwd"))
        unmasked = BackwardVariant(Problem(n, d, dtype, True, False, "bwd"))
        assert masked.large_window and unmasked.dbias_smem_groups == 0
        assert masked.smem_bytes - unmasked.smem_bytes == masked.dbias_smem_groups * 4 * masked.threads * 4
        for arch in ARCHS:
            fitted_before = unmasked.smem_bytes <= max_smem(arch)
            assert (masked.smem_bytes <= max_smem(arch)) == fitted_before, (n, d, dtype, arch)
        if masked.dbias_smem_groups:
            taken.append((n, d, dtype))
    # Where measured (Swin's window 12), and nowhere below 9 warps (129 tokens), where no register cap binds.
    assert (144, 32, "float16") in taken and (144, 32, "bfloat16") in taken and min(n for n, _, _ in taken) > 128
    assert all(d <= 32 for _, d, _ in taken), taken  # past 32 the groups would cost H100s the kernel


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masked_window12_backward_spills_less_with_dbias_sums_in_shared_memory(compile_jobs, dtype):
    """Why the masked kernel keeps 3 groups of its dbias sums in shared memory: ptxas then spills less of its main
    loop at the 168 registers of 9 warps (a compiled cubin's report, sm_90)."""
    masked = BackwardVariant(Problem(144, 32, dtype, True, True, "bwd"))
    unmasked = BackwardVariant(Problem(144, 32, dtype, True, False, "bwd"))
    assert masked.dbias_smem_groups == 3 and static_violation(masked, "sm_90") is None
    with_groups, without = (compiled(compile_jobs, v, "sm_90").resources for v in (masked, unmasked))
    assert with_groups.registers == without.registers == 168
    assert with_groups.spill_bytes < without.spill_bytes, (with_groups, without)


# Tensor-core backward defaults that ptxas compiles with spills (bytes, sm_90); the tiled and CUDA-core defaults never
# spill (default_backward checks). The list must shrink when they are fixed. The large-window layout at 144 tokens
# with a bias keeps 72 dbias sums a lane under the 168 registers nine warps leave, and ptxas parks a few values around
# the barrier between its phases: 80 B (28 B before its score accumulators started at the bias term, 128 B after, 88 B
# since P and dS are stored by stmatrix and D is formed on the tensor cores:
# bench/results/nvidia-h100-80gb-hbm3-backward-bias-start.md; 80 B since its fill and dbias partial move float4 and
# float2 at a time). (The 16 B of the masked window-7 defaults went when the bias and mask fill moved after the first
# loads.)
KNOWN_BACKWARD_SPILLS_SM90 = {"bwd_n144_d32_bfloat16_b": 80}


@pytest.mark.parametrize("problem, arch", default_cases())
def test_every_forward_problem_has_a_backward_kernel(compile_jobs, problem, arch):
    """The backward covers what the forward covers: fp32, windows past 144 tokens, head dims up to 128."""
    backward = dataclasses.replace(problem, direction="bwd")
    variant = default_backward(backward, arch)
    assert variant is not None and variant.problem == backward
    assert (variant.kind == "bwd_simt") == (not problem.uses_tensor_cores)  # float32: never TF32
    kernel = compiled(compile_jobs, variant, arch)
    known = KNOWN_BACKWARD_SPILLS_SM90.get(backward.key(), 0) if arch == "sm_90" else 0
    assert kernel.resources.spill_bytes == known, kernel.resources
    assert kernel.resources.registers * variant.threads <= 65536


# Defaults that ptxas compiles with spills on sm_90 (within space.MAX_SPILL_BYTES, so resource_violation accepts
# them), listed so that spills stay visible; the list must shrink when they are fixed. Empty since the large-N
# default moved from 4 windows x 4 warps (512 threads, registers capped at 128) to 2 windows.
DEFAULT_SPILLS_SM90: set[str] = set()


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.key())
def test_default_variant_does_not_spill_on_sm90(request, compile_jobs, problem):
    variant = default_or_none(problem, "sm_90")
    if variant is None or static_violation(variant, "sm_90") is not None:
        pytest.skip("no legal default on sm_90 (see test_default_variant_is_legal_and_compiles_within_resources)")
    if problem.key() in DEFAULT_SPILLS_SM90:
        request.applymarker(pytest.mark.xfail(strict=True, reason="ptxas spills the default variant on sm_90"))
    resources = compiled(compile_jobs, variant, "sm_90").resources
    assert resources.spill_bytes == 0, resources


# --- rendering the whole legal space ----------------------------------------------------------------------------


@pytest.mark.parametrize("problem", list(dict.fromkeys(SPACE_PROBLEMS + PROBLEMS)), ids=lambda p: p.key())
def test_every_legal_variant_renders_with_its_key_as_kernel_name(problem):
    seen = set()
    for arch in ARCHS:
        legal, pruned = candidates(problem, arch)
        assert legal, f"no legal variant of {problem.key()} on {arch}"
        assert all(isinstance(reason, str) and reason for reason in pruned.values())
        for variant in legal:
            if variant in seen:
                continue
            seen.add(variant)
            source = render(variant)  # the environment is StrictUndefined: a missing value raises
            assert re.search(r'extern "C" __global__ void __launch_bounds__\([^)]*\)\s+' + variant.key() + r"\(",
                             source), variant.key()
            assert "{{" not in source and "{%" not in source and "None" not in source
            assert f"constexpr int N = {problem.n};" in source
            assert f"constexpr int D = {problem.head_dim};" in source


def test_render_environment_is_strict():
    import jinja2

    from fwagen.render import environment

    assert environment().undefined is jinja2.StrictUndefined
    template = environment().get_template("fwd_mma.cu.j2")
    with pytest.raises(jinja2.UndefinedError):
        template.render(name="fwagen_incomplete")


def test_keys_are_unique_identities():
    for problem in SPACE_PROBLEMS:
        legal, pruned = candidates(problem, "sm_90")
        keys = [v.key() for v in legal] + list(pruned)
        assert len(keys) == len(set(keys)), problem.key()
        for variant in legal:
            assert variant.key().startswith(f"fwagen_{variant.kind}_{problem.key()}_")
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variant.key())  # a valid C identifier


# --- variants as data -------------------------------------------------------------------------------------------


def test_variant_dict_round_trips_for_the_sample_and_defaults():
    variants = {v for arch in ARCHS for v in SAMPLE[arch]} | {default_variant(p, "sm_90") for p in PROBLEMS}
    for variant in variants:
        data = variant.to_dict()
        assert variant_from_dict(data) == variant
        assert variant_from_dict(json.loads(json.dumps(data))) == variant  # survives a text file
        assert variant_from_dict(data).key() == variant.key()


def test_variant_from_dict_names_what_is_wrong():
    data = default_variant(PROBLEMS[5], "sm_90").to_dict()
    with pytest.raises(ValueError, match="kind"):
        variant_from_dict({**data, "kind": "wmma"})
    with pytest.raises(ValueError, match="warps"):
        variant_from_dict({**data, "warps": 4})
    with pytest.raises(ValueError, match="head_dim"):
        variant_from_dict({**data, "problem": {**data["problem"], "head_dim": 12}})


# --- static constraints -----------------------------------------------------------------------------------------

F16_144 = Problem(144, 32, "float16", True, True)


def test_shared_memory_limit_depends_on_the_architecture():
    variant = ForwardVariant(F16_144, windows_per_block=1, query_chunk=144, rows_per_warp=16, key_tile=128,
                             stages=1)
    assert max_smem("sm_80") < variant.smem_bytes <= max_smem("sm_90"), variant.smem_bytes
    reason = static_violation(variant, "sm_80")
    assert reason is not None and "shared memory" in reason and "sm_80" in reason and str(variant.smem_bytes) in reason
    assert static_violation(variant, "sm_90") is None
    assert variant in candidates(F16_144, "sm_90")[0] and variant not in candidates(F16_144, "sm_80")[0]


def test_a_streamed_variant_keeps_two_stages_of_bias_and_mask_tiles_not_the_chunks_whole_row():
    problem = Problem(576, 32, "float16", True, True)
    resident = ForwardVariant(problem, 2, 64, 32, 32, 2, 2)
    streamed = ForwardStreamVariant(problem, 2, 64, 32, 32, 2, 2)
    tiles = resident.smem_bytes - resident.logit_add_bytes
    assert resident.logit_add_bytes == 64 * 576 * 4  # the chunk's rows against every key
    assert streamed.smem_bytes - tiles == 2 * 2 * 64 * (32 + 8) * 4  # stages x (bias, mask) x rows x pitch
    assert static_violation(resident, "sm_90") is not None and static_violation(streamed, "sm_90") is None
    assert streamed.key() != resident.key() and streamed in candidates(problem, "sm_90")[0]
    bias_only = ForwardStreamVariant(Problem(576, 32, "float16", True, False), 2, 64, 32, 32, 2, 2)
    assert bias_only.smem_bytes - tiles == 2 * 64 * (32 + 8) * 4


@pytest.mark.parametrize("variant, words", [
    (ForwardVariant(F16_144, key_tile=24), "key_tile"),
    (ForwardVariant(Problem(9, 32, "float16"), query_chunk=16, key_tile=32), "key_tile"),
    (ForwardVariant(F16_144, query_chunk=16, rows_per_warp=32), "rows_per_warp"),
    (ForwardVariant(Problem(49, 32, "float16"), query_chunk=128), "query_chunk larger"),
    (ForwardVariant(F16_144, windows_per_block=4, query_chunk=144, rows_per_warp=16, key_tile=16), "threads"),
    (ForwardVariant(Problem(256, 128, "float16"), query_chunk=32, rows_per_warp=32, key_tile=128), "register"),
    (ForwardStreamVariant(Problem(576, 32, "float16", False, False), 2, 64, 32, 32, 2, 2), "bias or a mask"),
    (ForwardStreamVariant(Problem(256, 32, "float16", True, False), 1, 64, 32, 128, 2, 1), "three key tiles"),
    (SimtVariant(Problem(49, 24, "float32"), query_chunk=16, threads_per_row=16), "threads_per_row"),
    (SimtVariant(Problem(49, 128, "float32"), query_chunk=64, threads_per_row=2), "32 head-dim columns"),
    (SimtVariant(Problem(49, 32, "float32"), query_chunk=128, threads_per_row=8), "threads"),
], ids=lambda x: x if isinstance(x, str) else x.key())
def test_static_violation_rejects_illegal_combinations_with_a_reason(variant, words):
    for arch in ARCHS:
        reason = static_violation(variant, arch)
        assert reason is not None and words in reason, (arch, reason)


# --- the compile cache ----------------------------------------------------------------------------------------

SMALL = SimtVariant(Problem(9, 8, "float32", False, False), query_chunk=16, threads_per_row=1, key_tile=16)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    for job in _BACKGROUND:  # the module's compiles must not see the patched cache, render or NVRTC
        job.exception()
    monkeypatch.setenv("FWAGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiler, "_memory", {})
    return tmp_path


def test_disk_cache_is_namespaced_and_reused_without_nvrtc(fresh_cache, monkeypatch):
    first = compile_variant(SMALL, "sm_90")
    namespace = fresh_cache / fwagen.__version__ / f"nvrtc-{compiler.nvrtc_version()}" / "sm_90"
    assert first.cubin_path.parent == namespace
    assert first.cubin_path.name.startswith(SMALL.key() + "-") and first.cubin_path.suffix == ".cubin"
    report = first.cubin_path.with_suffix(".json")
    assert report.is_file() and json.loads(report.read_text())["registers"] == first.resources.registers
    stamp = first.cubin_path.stat().st_mtime_ns

    def no_nvrtc(*args):
        raise AssertionError("NVRTC called although the disk cache holds this kernel")

    monkeypatch.setattr(compiler, "_nvrtc_compile", no_nvrtc)
    monkeypatch.setattr(compiler, "_memory", {})  # a new process: only the disk remembers
    second = compile_variant(SMALL, "sm_90")
    assert second == first
    assert second.cubin_path.stat().st_mtime_ns == stamp
    assert compile_variant(SMALL, "sm_90") is compile_variant(SMALL, "sm_90")  # then memoized in memory


def test_disk_cache_separates_architectures(fresh_cache):
    sm90 = compile_variant(SMALL, "sm_90")
    sm80 = compile_variant(SMALL, "sm_80")
    assert sm80.cubin_path != sm90.cubin_path
    assert sm80.cubin_path.parent.name == "sm_80" and sm90.cubin_path.parent.name == "sm_90"
    assert sm80.cubin_path.read_bytes() != sm90.cubin_path.read_bytes()


def test_edited_source_is_never_served_from_the_cache(fresh_cache, monkeypatch):
    first = compile_variant(SMALL, "sm_90")
    calls = []
    real = compiler._nvrtc_compile

    def counting(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(compiler, "_nvrtc_compile", counting)
    monkeypatch.setattr(compiler, "render", lambda variant: render(variant) + "\n// a template edit\n")
    edited = compile_variant(SMALL, "sm_90")
    assert calls == [SMALL.key()]
    assert edited.cubin_path != first.cubin_path and first.cubin_path.is_file()


def test_broken_source_raises_compile_error_naming_the_saved_source(fresh_cache, monkeypatch):
    broken = render(SMALL).replace("extern \"C\"", "this is not CUDA; extern \"C\"", 1)
    monkeypatch.setattr(compiler, "render", lambda variant: broken)
    with pytest.raises(CompileError) as raised:
        compile_variant(SMALL, "sm_90")
    message = str(raised.value)
    assert SMALL.key() in message and "sm_90" in message
    saved = re.search(r"source saved to (\S+)", message)
    assert saved, message
    path = Path(saved.group(1))
    assert path.is_file() and path.read_text() == broken
    assert fresh_cache in path.parents
    assert "error" in message.lower()  # the NVRTC log comes with it
    assert not list(fresh_cache.rglob("*.cubin"))  # nothing cached for a failure


def test_parse_ptxas_report():
    log = (
        "ptxas info    : Compiling entry function 'fwagen_x' for 'sm_90'\n"
        "ptxas info    : Function properties for fwagen_x\n"
        "ptxas         .     8 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size, 1024 bytes smem\n"
    )
    resources = parse_ptxas_report(log)
    assert resources.registers == 128
    assert resources.spill_bytes == 36
    assert resources.stack_bytes == 8
    assert resources.static_smem_bytes == 1024
