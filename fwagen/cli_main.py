"""The command line: `python cli.py` in a checkout, `fwagen` once installed. All logic lives elsewhere.

    bench ...               forwards its arguments to `fwagen.bench.main` (needs a GPU)
    tune [--dry-run]        tune for this GPU; without a GPU, compile the kernel space for sm_90 instead
    tune --replay FILE      run the search on a recording (no GPU needed)
    show [--tuned-dir DIR]  list the tuned configurations
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .problem import Problem
from .registry import ProblemClass, tuned_dir

DRY_RUN_ARCH = "sm_90"
# Every legal variant of the Swin preset (about 4,500) takes 15 to 35 minutes on 2 cores; the default
# compiles a sample per problem that covers every knob value (360 variants, under 2 minutes). --all for all.
DEFAULT_SAMPLE = 12


def problem_from_key(text: str) -> Problem:
    """Inverse of `Problem.key()` for forward problems: 'n49_d32_float16_bm' (the 'fwd_' prefix optional;
    flags 'b' bias, 'm' mask, 'bm' both, 'plain' neither)."""
    parts = text.removeprefix("fwd_").split("_")
    if len(parts) != 4 or not parts[0].startswith("n") or not parts[1].startswith("d") \
            or parts[3] not in ("b", "m", "bm", "plain"):
        raise argparse.ArgumentTypeError(
            f"problem {text!r}: expected N_D_DTYPE_FLAGS like n49_d32_float16_bm (flags b, m, bm or plain)")
    try:
        return Problem(int(parts[0][1:]), int(parts[1][1:]), parts[2],
                       has_bias="b" in parts[3], has_mask="m" in parts[3] and parts[3] != "plain")
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"problem {text!r}: {error}") from None


def target_from_key(text: str) -> Problem | ProblemClass:
    """A `--problem` value: a class key (fwd_n49_d32_float16_bm_x4096), or a problem key with an optional
    fwd_/bwd_ prefix (bwd_n49_d32_float16_bm, n49_d32_float16_bm)."""
    if "_x" in text:
        try:
            return ProblemClass.from_key(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    direction = "bwd" if text.startswith("bwd_") else "fwd"
    problem = problem_from_key(text.removeprefix("bwd_"))
    return Problem(problem.n, problem.head_dim, problem.dtype, problem.has_bias, problem.has_mask, direction)


def arch_name(text: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", text):
        raise argparse.ArgumentTypeError(f"architecture {text!r}: expected a name such as sm_80 or sm_90")
    return text


def _gpu_arch() -> str | None:
    """The architecture of the current CUDA device, or None when there is none."""
    import torch

    if not torch.cuda.is_available():
        return None
    from .compiler import device_arch

    return device_arch()


def _print_progress(done: int, total: int) -> None:
    if done == total or done % 50 == 0:
        print(f"{done}/{total} variants through NVRTC", file=sys.stderr, flush=True)


def _classes(targets) -> list[ProblemClass]:
    from .tune import buckets_for, swin_classes

    if not targets:
        return swin_classes()
    classes = []
    for target in targets:
        if isinstance(target, ProblemClass):
            classes.append(target)
        else:
            classes += [ProblemClass(target, bucket) for bucket in sorted(buckets_for(target), reverse=True)]
    return list(dict.fromkeys(classes))


def _dry_run(args: argparse.Namespace, arch: str) -> int:
    from .tune import dry_run

    problems = [t.problem if isinstance(t, ProblemClass) else t for t in args.problem or []]
    sample = None if args.all else args.sample
    report = dry_run(arch, problems=list(dict.fromkeys(problems)) or None, jobs=args.jobs or 2, sample=sample,
                     progress=_print_progress)
    print(report.table(), end="")
    return 0


def _tune(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args, args.arch or _gpu_arch() or DRY_RUN_ARCH)
    if args.replay:
        from .recording import RecordingEvaluator

        evaluator = RecordingEvaluator(args.replay)
        classes = _classes(args.problem) if args.problem else evaluator.classes()
    else:
        gpu_arch = _gpu_arch()
        if gpu_arch is None:
            print(f"no CUDA GPU found: compiling the kernel space for {args.arch or DRY_RUN_ARCH} instead (dry run)",
                  flush=True)
            return _dry_run(args, args.arch or DRY_RUN_ARCH)
        from .evaluate import GpuEvaluator

        evaluator = GpuEvaluator(device=args.device, jobs=args.jobs)
        classes = _classes(args.problem)
    if args.record:
        from .recording import Recorder

        evaluator = Recorder(evaluator, args.record)
    return _run_tuning(args, evaluator, classes)


def _run_tuning(args: argparse.Namespace, evaluator, classes) -> int:
    import optuna

    from .compiler import cache_root
    from .evaluate import DeviceLost
    from .registry import RegistryError, gpu_slug
    from .tune import ProgressBar, planned_trials, summary_table, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plots = Path(args.plots) if args.plots else cache_root() / "tune" / gpu_slug(evaluator.gpu) / "plots"
    print(f"tuning {len(classes)} classes on {evaluator.gpu} ({evaluator.arch}); studies in "
          f"{args.storage or cache_root() / 'tune' / (gpu_slug(evaluator.gpu) + '.journal')}", file=sys.stderr)
    bar = ProgressBar(planned_trials(classes, evaluator, args.trials, args.sampler), enabled=not args.quiet)
    try:
        report = tune(classes, evaluator, storage=args.storage, trials=args.trials, sampler=args.sampler,
                      time_budget=args.time_budget, out=args.out, plots=plots, seed=args.seed,
                      on_measure=bar.measured, on_class=bar.finished)
    except RegistryError as error:
        bar.close()
        print(f"error: {error}\nthe studies keep every measurement: fix or move the file and rerun to write "
              "the winners", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: rerun the same command to resume (finished classes are already written)",
              file=sys.stderr)
        return 130
    except DeviceLost as error:
        bar.close()
        print(f"error: {error}", file=sys.stderr)
        return 1
    bar.close()
    print(summary_table(report), end="")
    if report.yaml_path is not None:
        print(f"wrote {report.yaml_path}")
    if report.plots:
        print(f"history plots in {plots}")
    elif report.results:
        print("no history plots: matplotlib is not installed (pip install 'fwagen[tune]')")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .registry import RegistryError, load

    folder = Path(args.tuned_dir) if args.tuned_dir else tuned_dir()
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        print(f"nothing tuned yet ({folder})")
        return 0
    for path in files:
        print(path)
        try:
            tuned = load(path, strict=False)
        except RegistryError as error:
            print(f"  unusable: {error}", file=sys.stderr)
            continue
        for problem in tuned.problems:
            print(f"  skipped: {problem}", file=sys.stderr)
        print(f"  {tuned.gpu} ({tuned.arch}, {tuned.sm_count or '?'} SMs): {len(tuned.entries)} classes")
        for key, entry in sorted(tuned.entries.items()):
            speedup = f"{entry.speedup:.2f}x the default" if entry.speedup else "default not measured"
            date = entry.tuned_with.get("date", "")
            print(f"  {key:<34} {entry.variant.key()}  {entry.median_ms:.4f} ms, {speedup}, "
                  f"{entry.trials} trials{' (partial)' if entry.partial else ''} {date}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .timing import NoCudaDevice

    try:
        if any(a == "--model" or a.startswith("--model=") for a in args.bench_args):
            from .bench_model import main as bench_model_main  # end to end: a timm Swin model, shipped vs patched

            return bench_model_main(args.bench_args)
        from .bench import main as bench_main

        return bench_main(args.bench_args)
    except NoCudaDevice:
        print("fwagen bench: no CUDA GPU found (torch.cuda.is_available() is False); the bench times kernels, so it "
              "needs one. Without a GPU, `python cli.py tune --dry-run` compiles the kernel space.", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwagen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    # Listed for --help only: main() hands `bench ...` to fwagen.bench.main before parsing.
    commands.add_parser("bench", add_help=False, help="kernel benchmark on this GPU (see `bench --help`); `bench --model NAME` times a timm Swin model")

    tune = commands.add_parser("tune", help="tune for this GPU, or compile the kernel space (--dry-run)")
    tune.add_argument("--dry-run", action="store_true",
                      help="render and compile the variant space with NVRTC and report; needs no GPU")
    tune.add_argument("--arch", type=arch_name, help=f"e.g. sm_80, sm_90; default: this GPU's, or {DRY_RUN_ARCH} without one")
    tune.add_argument("--jobs", type=int, help="compile threads (default: 2 for the dry run, all cores but two for tuning)")
    tune.add_argument("--problem", action="append", type=target_from_key,
                      help="a class key such as fwd_n49_d32_float16_bm_x4096, or a problem key such as "
                           "n49_d32_float16_bm or bwd_n49_d32_float16_bm (tuned at the preset's buckets for its N); "
                           "repeat for several; default: the Swin preset")
    tune.add_argument("--preset", choices=["swin"], default="swin",
                      help="the released Swin shapes: N 49/64/144/256/576, d 32, fp16 and bf16, bias, with and "
                           "without mask, forward and backward (the default when no --problem is given)")
    tune.add_argument("--trials", type=int, help="measurements per class (default: the whole space up to "
                                                 "128 legal variants, else 48)")
    tune.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="for the whole run; shared by the classes not yet tuned")
    tune.add_argument("--storage", help="an Optuna storage URL (postgresql://...) or journal file shared by workers "
                                        "(default: a journal file in the fwagen cache folder)")
    tune.add_argument("--out", help="folder of the tuned YAML files (default: the package's tuned/)")
    tune.add_argument("--sampler", choices=["auto", "grid", "tpe", "random"], default="auto",
                      help="auto: an exhaustive sweep where the budget covers the space, else TPE")
    tune.add_argument("--record", metavar="FILE.jsonl", help="append every measurement to this file")
    tune.add_argument("--replay", metavar="FILE.jsonl", help="measure from a recording instead of a GPU")
    tune.add_argument("--plots", metavar="DIR", help="where each study's history PNG goes "
                                                     "(default: the fwagen cache folder)")
    tune.add_argument("--device", type=int, default=0, help="CUDA device index (one worker per GPU)")
    tune.add_argument("--seed", type=int, help="sampler seed (default: random)")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    size = tune.add_mutually_exclusive_group()
    size.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                      help=f"dry run: compile about this many variants per problem, covering every knob value "
                           f"(default {DEFAULT_SAMPLE})")
    size.add_argument("--all", action="store_true", help="dry run: compile every legal variant")
    tune.set_defaults(run=_tune)

    show = commands.add_parser("show", help="list the tuned configurations")
    show.add_argument("--tuned-dir", help="folder of tuned YAML files (default: the package's)")
    show.set_defaults(run=_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Forwarded whole: argparse would claim options such as --help before a REMAINDER argument.
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
