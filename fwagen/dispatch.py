"""Which variant runs a call: a chain of rules over the tuned YAML files, memoized per problem class.

For a problem, its work bucket (windows x heads rounded to a power of 4), the architecture and the GPU's name:
  1. "tuned for this GPU": the exact class in this GPU's file (tuned/<gpu-slug>.yaml);
  2. "nearest tuned class on this GPU": the same problem tuned for another bucket; nearest means fewest
     powers of 4 apart, and between two equally near buckets the larger (a winner measured with the GPU
     full degrades more gracefully than one measured on a sliver of it);
  3. "tuned on <GPU> (same sm_XX)": the exact class, else the nearest bucket, in the file of another GPU
     of the same compute capability (nearest first, then by file name);
  4. "built-in default": `space.default_variant` (forward) or `space.default_backward`.
A tuned variant is taken only when it is statically legal on the architecture; else the next candidate is.
The files are read once (`reload()` reads them again); a file or entry that does not validate is skipped
with a warning, once. After the first call for a class, a call costs a dictionary lookup.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import lru_cache

from . import registry
from .problem import Problem, work_bucket
from .space import default_backward, default_variant, static_violation
from .variant import Variant

DEFAULT_RULE = "built-in default"


@dataclass(frozen=True)
class Choice:
    variant: Variant | None  # None: no kernel covers it (backward only; the op differentiates the reference)
    rule: str
    source: str | None = None  # the YAML file and class key a tuned choice came from


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"fwagen: {message}; dispatch ignores it and falls back", stacklevel=3)


@lru_cache(maxsize=1)
def _catalog() -> registry.Catalog:
    catalog = registry.scan()
    for problem in catalog.problems:
        _warn_once(problem)
    return catalog


_reload_hooks: list = []


def on_reload(hook) -> None:
    """Call `hook()` whenever `reload()` runs: for memos of choices kept elsewhere (the op's per-shape memo)."""
    _reload_hooks.append(hook)


def reload() -> None:
    """Forget the tuned files read so far and every memoized choice (after a tune, or FWAGEN_TUNED_DIR changed)."""
    _catalog.cache_clear()
    choose.cache_clear()
    choose_backward.cache_clear()
    _warned.clear()
    for hook in _reload_hooks:
        hook()


@lru_cache(maxsize=16)
def gpu_name(device: int | None = None) -> str | None:
    """torch's name of the CUDA device (the current one when None), or None without CUDA."""
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(torch.cuda.current_device() if device is None else device)
    except (RuntimeError, AssertionError):
        return None


def _distance(wanted: int, tuned: int) -> tuple[float, int]:
    """Sort key of a tuned bucket for a wanted one: powers of 4 apart (exact, from bit lengths), larger first."""
    return abs(wanted.bit_length() - tuned.bit_length()) / 2, -tuned


def _from_file(tuned: registry.TunedFile, problem: Problem, bucket: int, arch: str):
    """(variant, class key, exact?) candidates of one file for this problem, nearest bucket first."""
    matches = [e for e in tuned.entries.values() if e.pclass.problem == problem]
    for entry in sorted(matches, key=lambda e: _distance(bucket, e.pclass.bucket)):
        if static_violation(entry.variant, arch) is None:
            yield entry, entry.pclass.bucket == bucket


def _tuned_choice(problem: Problem, bucket: int, arch: str, gpu: str | None) -> Choice | None:
    catalog = _catalog()
    own = catalog.files.get(registry.gpu_slug(gpu)) if gpu else None
    if own is not None and own.arch == arch:
        for entry, exact in _from_file(own, problem, bucket, arch):
            rule = "tuned for this GPU" if exact else f"nearest tuned class on this GPU (x{entry.pclass.bucket})"
            return Choice(entry.variant, rule, f"{own.path}: {entry.pclass.key()}")
    peers = [f for stem, f in sorted(catalog.files.items()) if f is not own and f.arch == arch]
    found = [(_distance(bucket, entry.pclass.bucket), tuned.path.name, entry, tuned)
             for tuned in peers for entry, _ in _from_file(tuned, problem, bucket, arch)]
    if found:
        _, _, entry, tuned = min(found, key=lambda item: item[:2])
        return Choice(entry.variant, f"tuned on {tuned.gpu} (same {arch}, x{entry.pclass.bucket})",
                      f"{tuned.path}: {entry.pclass.key()}")
    return None


@lru_cache(maxsize=4096)
def choose(problem: Problem, bucket: int, arch: str, gpu: str | None = None) -> Choice:
    """The forward variant for a problem class on a GPU (by name) of an architecture."""
    problem = dataclasses.replace(problem, direction="fwd")
    return _tuned_choice(problem, bucket, arch, gpu) or Choice(default_variant(problem, arch), DEFAULT_RULE)


@lru_cache(maxsize=4096)
def choose_backward(problem: Problem, bucket: int, arch: str, gpu: str | None = None) -> Choice:
    """The backward variant for a problem class, or Choice(None, ...) where no backward kernel covers it."""
    problem = dataclasses.replace(problem, direction="bwd")
    fallback = default_backward(problem, arch)
    if fallback is None:
        return Choice(None, "no backward kernel covers this problem: the op differentiates the reference")
    return _tuned_choice(problem, bucket, arch, gpu) or Choice(fallback, DEFAULT_RULE)


def choose_for(problem: Problem, items: int, arch: str, device: int | None = None) -> Choice:
    """The forward variant for a call over `items` = windows x heads on the CUDA device `device`."""
    return choose(problem, work_bucket(items), arch, gpu_name(device))


def choose_backward_for(problem: Problem, items: int, arch: str, device: int | None = None) -> Choice:
    return choose_backward(problem, work_bucket(items), arch, gpu_name(device))


class Explanation(str):
    """What `explain` returns: readable text (a str, as before) that also carries the choices as attributes:
    problem, bucket, arch, gpu, forward (a Choice, or None where the reference runs) and backward."""

    def __new__(cls, text: str, **fields):
        self = super().__new__(cls, text)
        self.__dict__.update(fields)
        return self


def _line(problem: Problem, bucket: int, arch: str, choice: Choice) -> str:
    where = f" from {choice.source}" if choice.source else ""
    name = choice.variant.key() if choice.variant is not None else "the PyTorch reference"
    return f"{problem.key()} x{bucket} on {arch}: {name} ({choice.rule}{where})"


def explain(*args, arch: str | None = None, device: int | None = None, gpu: str | None = None) -> Explanation:
    """Which rule picks which kernel, forward and backward.

    explain(problem, items, arch="sm_90") for a Problem and windows x heads, or explain(q, k, v, bias=None,
    mask=None) for the tensors of a call (the GPU and architecture are theirs).
    """
    if args and isinstance(args[0], Problem):
        problem, items = args[0], args[1]
        arch = args[2] if len(args) > 2 else (arch or "sm_90")
        name = gpu if gpu is not None else gpu_name(device)
        return _explain(problem, items, arch, name)
    return _explain_tensors(*args, gpu=gpu)


def _explain(problem: Problem, items: int, arch: str, name: str | None) -> Explanation:
    bucket = work_bucket(items)
    forward_problem = dataclasses.replace(problem, direction="fwd")
    forward = choose(forward_problem, bucket, arch, name)
    backward = choose_backward(forward_problem, bucket, arch, name)
    backward_problem = dataclasses.replace(problem, direction="bwd")
    text = (_line(forward_problem, bucket, arch, forward) + "\n"
            + _line(backward_problem, bucket, arch, backward))
    return Explanation(text, problem=forward_problem, bucket=bucket, arch=arch, gpu=name, forward=forward,
                       backward=backward)


def _explain_tensors(q, k, v, bias=None, mask=None, *, gpu: str | None = None) -> Explanation:
    from .compiler import device_arch
    from .launch import KERNEL_DTYPES, validate
    from .op import _no_kernel_reason

    validate(q, k, v, bias, mask)
    reason = _no_kernel_reason(q)
    if reason is not None:
        return Explanation(f"{reason}: the PyTorch reference runs, forward and backward", problem=None,
                           bucket=None, arch=None, gpu=None, forward=None, backward=None)
    windows, heads, n, d = q.shape
    problem = Problem(n, d, KERNEL_DTYPES[q.dtype], bias is not None, mask is not None)
    name = gpu if gpu is not None else gpu_name(q.device.index)
    return _explain(problem, windows * heads, device_arch(q.device.index), name)
