"""Which variant runs a call: the rule chain, memoized so a call adds only a dictionary lookup.

Today one rule exists, the built-in default of `space.default_variant`; the tuner's YAML lookups plug in
ahead of it (see the tuner issue). `explain` tells which rule chose which variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .problem import Problem, work_bucket
from .space import default_variant
from .variant import Variant


@dataclass(frozen=True)
class Choice:
    variant: Variant
    rule: str


@lru_cache(maxsize=4096)
def choose(problem: Problem, bucket: int, arch: str) -> Choice:
    return Choice(default_variant(problem, arch), "built-in default")


def choose_for(problem: Problem, items: int, arch: str) -> Choice:
    return choose(problem, work_bucket(items), arch)


def explain(problem: Problem, items: int, arch: str = "sm_90") -> str:
    choice = choose_for(problem, items, arch)
    return f"{problem.key()} x{work_bucket(items)} on {arch}: {choice.variant.key()} ({choice.rule})"
