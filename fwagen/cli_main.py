"""The command line: `python cli.py` in a checkout, `fwagen` once installed. All logic lives elsewhere.

    bench ...               forwards its arguments to `fwagen.bench.main` (needs a GPU)
    tune [--dry-run]        tune for this GPU; without a GPU, compile the kernel space for sm_90 instead
    show [--tuned-dir DIR]  list the tuned configurations
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .problem import Problem

DRY_RUN_ARCH = "sm_90"
# Every legal variant of the Swin preset (about 4,500) takes 15 to 35 minutes on 2 cores; the default
# compiles a sample per problem that covers every knob value (360 variants, under 2 minutes). --all for all.
DEFAULT_SAMPLE = 12
NOT_IMPLEMENTED = 2


def tuned_dir() -> Path:
    """An installed wheel ships tuned configs in the package (fwagen/tuned, mapped from the top-level
    tuned/ folder by pyproject.toml); a source checkout reads tuned/ directly."""
    packaged = Path(__file__).resolve().parent / "tuned"
    checkout = Path(__file__).resolve().parent.parent / "tuned"
    if not packaged.is_dir() and (checkout.parent / "pyproject.toml").is_file():
        return checkout
    return packaged  # a wheel with nothing tuned has no such folder: `show` says so


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


def _tune(args: argparse.Namespace) -> int:
    gpu_arch = _gpu_arch()
    if not args.dry_run:
        if gpu_arch is not None:
            print(f"found a {gpu_arch} GPU, but full tuning is not implemented yet; "
                  f"`tune --dry-run` compiles the kernel space for it", file=sys.stderr)
            return NOT_IMPLEMENTED
        print(f"no CUDA GPU found: compiling the kernel space for {args.arch or DRY_RUN_ARCH} instead (dry run)",
              flush=True)
    from .tune import dry_run

    sample = None if args.all else args.sample
    report = dry_run(args.arch or gpu_arch or DRY_RUN_ARCH, problems=args.problem or None, jobs=args.jobs,
                     sample=sample, progress=_print_progress)
    print(report.table(), end="")
    return 0


def _show(args: argparse.Namespace) -> int:
    folder = Path(args.tuned_dir) if args.tuned_dir else tuned_dir()
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        print(f"nothing tuned yet ({folder})")
        return 0
    for path in files:
        print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fwagen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    # Listed for --help only: main() hands `bench ...` to fwagen.bench.main before parsing.
    commands.add_parser("bench", add_help=False, help="forward benchmark on this GPU (see `bench --help`)")

    tune = commands.add_parser("tune", help="tune for this GPU, or compile the kernel space (--dry-run)")
    tune.add_argument("--dry-run", action="store_true",
                      help="render and compile the variant space with NVRTC and report; needs no GPU")
    tune.add_argument("--arch", type=arch_name, help=f"e.g. sm_80, sm_90; default: this GPU's, or {DRY_RUN_ARCH} without one")
    tune.add_argument("--jobs", type=int, default=2, help="compile threads (default 2)")
    tune.add_argument("--problem", action="append", type=problem_from_key,
                      help="a problem key such as n49_d32_float16_bm; repeat for several; default: the Swin preset")
    size = tune.add_mutually_exclusive_group()
    size.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                      help=f"compile about this many variants per problem, covering every knob value "
                           f"(default {DEFAULT_SAMPLE})")
    size.add_argument("--all", action="store_true", help="compile every legal variant")
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
