"""Tuning: the variant space of a problem, compiled, checked and (on a GPU) timed.

Today this holds the CPU-capable part, `dry_run`: render and compile the space of each problem for one
architecture with NVRTC, prune on the compiled resources, and report what compiled and why the rest did
not. No GPU is needed. A failure is a recorded outcome, never an exception that stops the run.
"""
from __future__ import annotations

import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .compiler import CompileError, compile_variant
from .problem import DTYPES, Problem
from .space import candidates, default_variant, resource_violation
from .variant import Variant

SWIN_TOKENS = (49, 64, 144, 256, 576)  # windows 7, 8, 12, 16, 24
SWIN_HEAD_DIM = 32


def swin_preset() -> list[Problem]:
    """The forward problems of released Swin models: every window size and dtype, bias, with and without mask."""
    return [Problem(n, SWIN_HEAD_DIM, dtype, has_bias=True, has_mask=masked)
            for n in SWIN_TOKENS for dtype in DTYPES for masked in (False, True)]


def sample_variants(problem: Problem, legal: list[Variant], cap: int) -> list[Variant]:
    """At most about `cap` of the `legal` variants, chosen deterministically, covering every knob value.

    First a greedy cover: repeatedly take the variant that adds the most (knob, value) pairs not yet
    covered, so every value of every knob that occurs among the legal variants appears at least once;
    the built-in default is always taken first when it is legal. Then the rest of the cap is filled from
    a shuffle seeded by the problem's key (crc32, stable across runs and Python versions). When the
    cover alone needs more than `cap` variants, the cover is kept whole: coverage wins over the cap.
    The result keeps the order of `legal`.
    """
    if cap >= len(legal):
        return list(legal)
    order = list(legal)
    random.Random(zlib.crc32(problem.key().encode())).shuffle(order)
    default = default_variant(problem)
    chosen: list[Variant] = [default] if default in legal else []
    covered = {pair for v in chosen for pair in v.knobs().items()}
    wanted = {pair for v in legal for pair in v.knobs().items()}
    while covered != wanted:
        best = max(order, key=lambda v: len(set(v.knobs().items()) - covered))
        chosen.append(best)
        covered |= set(best.knobs().items())
    for variant in order:
        if len(chosen) >= cap:
            break
        if variant not in chosen:
            chosen.append(variant)
    picked = set(chosen)
    return [v for v in legal if v in picked]


@dataclass
class ProblemOutcome:
    """What became of every candidate variant of one problem. The counts add up to `candidates`."""

    problem: Problem
    candidates: int = 0
    not_sampled: int = 0
    compiled: dict[str, str] = field(default_factory=dict)  # key -> cubin path; compiled within resources
    pruned_statically: dict[str, str] = field(default_factory=dict)  # key -> reason
    pruned_by_resources: dict[str, str] = field(default_factory=dict)  # key -> reason
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (kind, full message)


@dataclass
class DryRunReport:
    arch: str
    outcomes: list[ProblemOutcome]
    seconds: float
    jobs: int
    sample: int | None

    def totals(self) -> dict[str, int]:
        return {
            "candidates": sum(o.candidates for o in self.outcomes),
            "not sampled": sum(o.not_sampled for o in self.outcomes),
            "compiled": sum(len(o.compiled) for o in self.outcomes),
            "pruned statically": sum(len(o.pruned_statically) for o in self.outcomes),
            "pruned by resources": sum(len(o.pruned_by_resources) for o in self.outcomes),
            "failed": sum(len(o.failed) for o in self.outcomes),
        }

    def reasons(self) -> Counter:
        """(stage, reason) -> count, numbers in a reason written as '#' so that alike reasons group."""
        tally: Counter = Counter()
        for o in self.outcomes:
            for stage, reasons in (("static", o.pruned_statically.values()),
                                   ("resources", o.pruned_by_resources.values())):
                tally.update((stage, re.sub(r"\d+", "#", r)) for r in reasons)
            tally.update(("failed", kind) for kind, _ in o.failed.values())
        return tally

    def table(self) -> str:
        columns = ("candidates", "not sampled", "compiled", "pruned statically", "pruned by resources", "failed")
        width = max([len("problem")] + [len(o.problem.key()) for o in self.outcomes])
        head = f"{'problem':<{width}}  " + "  ".join(columns)
        lines = [f"dry run for {self.arch}: {len(self.outcomes)} problems, {self.jobs} compile threads, "
                 f"{'all legal variants' if self.sample is None else f'a sample of {self.sample} per problem'}, "
                 f"{self.seconds:.1f} s", "", head, "-" * len(head)]

        def row(label: str, counts: tuple[int, ...]) -> str:
            return f"{label:<{width}}  " + "  ".join(f"{c:>{len(name)}}" for c, name in zip(counts, columns))

        for o in self.outcomes:
            lines.append(row(o.problem.key(), (o.candidates, o.not_sampled, len(o.compiled),
                                               len(o.pruned_statically), len(o.pruned_by_resources),
                                               len(o.failed))))
        lines += ["-" * len(head), row("total", tuple(self.totals().values())), "",
                  "reasons (numbers shown as #):"]
        for (stage, reason), count in sorted(self.reasons().items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {count:>6}  {stage:<9}  {reason}")
        first_failure = next(((key, message) for o in self.outcomes for key, (_, message) in o.failed.items()),
                             None)
        if first_failure is not None:
            lines += ["", f"first failure, {first_failure[0]}:", first_failure[1].strip()]
        return "\n".join(lines) + "\n"


def _compile_outcome(variant: Variant, arch: str) -> tuple[str, object]:
    """('compiled', cubin path) | ('resources', reason) | ('failed', (kind, message))."""
    try:
        compiled = compile_variant(variant, arch)
    except CompileError as error:
        return "failed", ("compile error", str(error))
    except Exception as error:  # noqa: BLE001 - a render bug in one variant is recorded, the run goes on
        return "failed", (type(error).__name__, f"{type(error).__name__}: {error}")
    reason = resource_violation(variant, compiled.resources)
    if reason is not None:
        return "resources", reason
    return "compiled", str(compiled.cubin_path)


def dry_run(arch: str, problems: list[Problem] | None = None, jobs: int = 2, sample: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> DryRunReport:
    """Compile the variant space of each problem (default: `swin_preset()`) for `arch`, e.g. 'sm_90'.

    Statically illegal variants are counted with their reason and not compiled. The legal ones (or, with
    `sample`, at most about that many per problem: see `sample_variants`) compile on `jobs` threads, since
    NVRTC releases the GIL. A compile error is recorded as a failure; a compiled kernel that spills or
    needs more registers than one SM holds is pruned with its reason. Compiled kernels land in the disk
    cache of `fwagen.compiler`, so a repeated dry run, or a later tuning run, reuses them.
    `progress(done, total)` is called after each compile.
    """
    problems = swin_preset() if problems is None else list(problems)
    started = time.perf_counter()
    outcomes, work = [], []
    for problem in problems:
        legal, pruned = candidates(problem, arch)
        chosen = legal if sample is None else sample_variants(problem, legal, sample)
        outcome = ProblemOutcome(problem, candidates=len(legal) + len(pruned),
                                 not_sampled=len(legal) - len(chosen), pruned_statically=dict(pruned))
        outcomes.append(outcome)
        work += [(outcome, variant) for variant in chosen]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = pool.map(lambda item: _compile_outcome(item[1], arch), work)
        for done, ((outcome, variant), (status, detail)) in enumerate(zip(work, results), start=1):
            target = {"compiled": outcome.compiled, "resources": outcome.pruned_by_resources,
                      "failed": outcome.failed}[status]
            target[variant.key()] = detail
            if progress is not None:
                progress(done, len(work))
    return DryRunReport(arch, outcomes, time.perf_counter() - started, max(1, jobs), sample)
