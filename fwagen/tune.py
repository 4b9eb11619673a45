"""Tuning: every problem class of a run through its Optuna study (fwagen.study), winners into the tuned YAML.

`tune` runs the classes in order, seeding each study with what is known (this GPU's YAML winner for the
class, winners of neighbouring classes from the YAML files and from this run, the built-in default), splits
a time budget over the classes, writes each winner as soon as its class is decided (an interrupted run keeps
what it finished; rerunning resumes the studies), and can plot each study's history. The evaluator decides
where measurements come from: a GPU (`evaluate.GpuEvaluator`) or a recording (`evaluate.RecordingEvaluator`).

`dry_run` is the part that needs no GPU: render and compile the space of each problem for one architecture
with NVRTC, prune on the compiled resources, and report what compiled and why the rest did not.
A failure is a recorded outcome, never an exception that stops the run.
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
from .space import backward_candidates, candidates, default_variant, resource_violation
from .variant import Variant, tma_twin

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
        legal, pruned = (backward_candidates if problem.direction == "bwd" else candidates)(problem, arch)
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


# --- tuning -------------------------------------------------------------------------------------------------

# Work buckets of the preset, from the batch sizes Swin runs at: windows 7 and 8 at 224/256 px with batches of
# 32 to 128 (stage by stage from 24 to 384 windows x heads per image), the larger windows at 384 px with
# batches of 8 to 32. Dispatch serves other buckets from the nearest tuned one.
SWIN_BUCKETS = {49: (1024, 4096, 16384), 64: (1024, 4096, 16384), 144: (1024, 4096), 256: (1024, 4096),
                576: (1024, 4096)}
TUNED_DTYPES = ("float16", "bfloat16")
MAX_SEEDS = 6


def buckets_for(problem: Problem) -> tuple[int, ...]:
    return SWIN_BUCKETS.get(problem.n, (1024, 4096))


def swin_classes(dtypes=TUNED_DTYPES) -> list:
    """The classes of `cli.py tune --preset swin`: every Swin window size, fp16 and bf16, with bias, with and
    without the shift mask, forward and backward, at the buckets of SWIN_BUCKETS."""
    from .registry import ProblemClass

    return [ProblemClass(Problem(n, SWIN_HEAD_DIM, dtype, True, masked, direction), bucket)
            for direction in ("fwd", "bwd") for n in SWIN_TOKENS for dtype in dtypes for masked in (True, False)
            for bucket in sorted(SWIN_BUCKETS[n], reverse=True)]


def seeds_for(pclass, entries: list, found: dict) -> list[Variant]:
    """Known-good variants for a class, best guess first: its own tuned entry, then tuned classes of the same
    N, head dim and direction (nearest bucket first, then the other mask setting, then the other dtype),
    their knobs moved onto this problem. `entries` are registry entries; `found` maps class keys of this run to
    their winners."""
    import dataclasses

    from .search import with_problem

    known = [(e.pclass, e.variant) for e in entries] + [(c, v) for c, v in found.values()]
    problem = pclass.problem

    def closeness(item):
        other = item[0]
        return (other.problem != problem, other.problem.dtype != problem.dtype,
                other.problem.has_mask != problem.has_mask,
                abs(other.bucket.bit_length() - pclass.bucket.bit_length()))

    related = [item for item in known
               if dataclasses.replace(item[0].problem, has_mask=problem.has_mask, dtype=problem.dtype,
                                      has_bias=problem.has_bias) == problem]
    seeds = []
    for other, variant in sorted(related, key=closeness):
        moved = with_problem(variant, pclass)
        # A wgmma pick's twin with K and V by TMA runs the same tiles: a good guess beside it.
        for guess in (moved, tma_twin(moved)):
            if guess is not None and guess not in seeds:
                seeds.append(guess)
    return seeds[:MAX_SEEDS]


@dataclass
class TuneReport:
    gpu: str
    arch: str
    results: list = field(default_factory=list)  # study.ClassResult
    skipped: list = field(default_factory=list)  # (class key, reason)
    yaml_path: object = None
    plots: list = field(default_factory=list)
    seconds: float = 0.0


def tune(classes, evaluator, *, storage: str | None = None, trials: int | None = None, sampler: str = "auto",
         time_budget: float | None = None, out=None, plots=None, seed: int | None = None, write: bool = True,
         on_measure=None, on_class=None) -> TuneReport:
    """Tune each class with `evaluator`; write winners into `out` (default: registry.tuned_dir()); with
    `plots`, save each study's history there as PNG. `storage`: an Optuna storage URL or journal path (default:
    a journal file in fwagen's cache folder). `time_budget` seconds are shared by the classes not yet run."""
    from . import dispatch, registry
    from .study import open_storage, tune_class

    started = time.time()
    slug = registry.gpu_slug(evaluator.gpu)
    store = open_storage(storage, slug)
    report = TuneReport(evaluator.gpu, evaluator.arch)
    catalog = registry.scan(out)
    mine = catalog.files.get(slug)
    entries = list(mine.entries.values()) if mine else []
    entries += [e for f in catalog.files.values() if f is not mine and f.arch == evaluator.arch
                for e in f.entries.values()]
    found: dict = {}
    classes = list(classes)
    # The budget is shared in proportion to planned measurements: a class with no legal variant takes no
    # share, a swept class of 119 variants more than a five-variant backward class.
    shares = [planned_trials([pclass], evaluator, trials, sampler) for pclass in classes]
    for index, pclass in enumerate(classes):
        deadline = None
        if time_budget is not None and shares[index]:
            deadline = time.time() + (started + time_budget - time.time()) * shares[index] / sum(shares[index:])
        result = tune_class(pclass, evaluator, store, slug, seeds=seeds_for(pclass, entries, found), trials=trials,
                            sampler=sampler, seed=seed, deadline=deadline, on_measure=on_measure)
        if result is None:
            report.skipped.append((pclass.key(), f"no legal variant on {evaluator.arch}"))
            continue
        report.results.append(result)
        if result.winner is None:
            report.skipped.append((pclass.key(), "no variant measured ok"))
        else:
            found[pclass.key()] = (pclass, result.winner)
            if write:
                report.yaml_path = registry.save([result.entry(evaluator.tuned_with())], evaluator.gpu_identity(),
                                                 out)
        if plots is not None:
            path = plot_history(result, plots)
            if path is not None:
                report.plots.append(path)
        if on_class is not None:
            on_class(result)
    dispatch.reload()
    report.seconds = time.time() - started
    return report


def short_key(variant: Variant) -> str:
    """The knobs part of a variant key: 'w2_q32_r16_k64_s2_b1'."""
    return variant.key().removeprefix(f"fwagen_{variant.kind}_{variant.problem.key()}_")


def summary_table(report: TuneReport) -> str:
    head = ("class", "sampler", "trials", "winner", "ms", "spread", "default ms", "speedup")
    rows = []
    for r in report.results:
        if r.winner is None:
            rows.append((r.pclass.key(), r.sampler, str(r.trials), "-", "-", "-", "-", "no variant measured ok"))
            continue
        default_ms = r.default_m.median_ms if r.default_m is not None and r.default_m.ok else None
        rows.append((r.pclass.key(), r.sampler + (" (partial)" if r.partial else ""), f"{r.trials}/{r.budget}",
                     short_key(r.winner), f"{r.winner_m.median_ms:.4f}", f"{r.winner_m.spread:.1%}",
                     "-" if default_ms is None else f"{default_ms:.4f}",
                     "-" if r.speedup is None else f"{r.speedup:.2f}x"))
    widths = [max(len(str(c)) for c in column) for column in zip(head, *rows)]
    lines = [f"tuned on {report.gpu} ({report.arch}) in {report.seconds:.0f} s", "",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    tuned = {r.pclass.key() for r in report.results}
    by_reason: dict[str, list[str]] = {}
    for key, reason in report.skipped:
        if key not in tuned:
            by_reason.setdefault(reason, []).append(key)
    lines += [f"skipped ({reason}): {', '.join(keys)}" for reason, keys in by_reason.items()]
    return "\n".join(lines) + "\n"


def plot_history(result, folder) -> object:
    """Save the study's history as folder/<class>.png: every measurement in trial order, the best so far, the
    default's time and the winner. None (with nothing written) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from pathlib import Path

    path = Path(folder) / f"{result.pclass.key()}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = [(i, m.median_ms) for i, (_, m) in enumerate(result.history, start=1) if m.ok]
    failed = [i for i, (_, m) in enumerate(result.history, start=1) if not m.ok]
    fig, ax = plt.subplots(figsize=(7, 4))
    if ok:
        ax.scatter(*zip(*ok), s=12, label="measured")
        best, steps = float("inf"), []
        for i, ms in ok:
            best = min(best, ms)
            steps.append((i, best))
        ax.step(*zip(*steps), where="post", color="black", linewidth=1, label="best so far")
        top = max(ms for _, ms in ok) * 1.05
        if failed:
            ax.scatter(failed, [top] * len(failed), marker="x", color="red", s=14, label="failed")
    if result.default_m is not None and result.default_m.ok:
        ax.axhline(result.default_m.median_ms, linestyle="--", color="gray", label="built-in default")
    if result.winner_m is not None:
        ax.axhline(result.winner_m.median_ms, color="green", linewidth=0.8, label=f"winner {short_key(result.winner)}")
    ax.set_xlabel("measurement")
    ax.set_ylabel("median ms")
    ax.set_title(f"{result.pclass.key()} ({result.sampler}, {result.trials} measured)", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ProgressBar:
    """Progress of a run over its planned measurements: a tqdm bar on a terminal (trials, the class's best time,
    elapsed, remaining); elsewhere (a log file, CI) one line per finished class instead of a line per trial."""

    def __init__(self, total: int, enabled: bool = True):
        import sys

        from tqdm import tqdm

        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="trial", disable=not enabled or self.lines, dynamic_ncols=True)
        self.total, self.done, self.started = total, 0, time.time()
        self._counted: dict[str, int] = {}

    def _advance(self, count: int) -> None:
        self.done += count
        self.bar.update(count)

    def measured(self, worker, measurement) -> None:
        key = worker.pclass.key()
        self._counted[key] = self._counted.get(key, 0) + 1
        best = min((m.median_ms for _, m in worker.measured() if m.ok), default=None)
        self.bar.set_postfix_str(f"{key} best {best:.4f} ms" if best else key)
        self._advance(1)

    def finished(self, result) -> None:
        """Count the class as done: a resumed or cut-short study measures fewer than its budget here."""
        self._advance(max(0, result.budget - self._counted.get(result.pclass.key(), 0)))
        if self.lines:
            import sys

            best = f"{result.winner_m.median_ms:.4f} ms" if result.winner_m else "nothing measured ok"
            elapsed = time.time() - self.started
            left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{self.done}/{self.total} trials, {elapsed:.0f} s elapsed, ~{left:.0f} s left: "
                  f"{result.pclass.key()} {best}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def planned_trials(classes, evaluator, trials: int | None = None, sampler: str = "auto") -> int:
    """Measurements the classes are budgeted (for a progress bar's total)."""
    from .search import Space, make_plan

    total = 0
    for pclass in classes:
        space = Space.build(pclass, evaluator.arch, evaluator.covers(pclass))
        if len(space):
            total += make_plan(space, [], trials, sampler).budget
    return total
