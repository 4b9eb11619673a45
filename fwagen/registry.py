"""Tuned configurations: one YAML file per GPU model, validated on load, merged on write.

A file `tuned/<gpu-slug>.yaml` holds a schema version, the GPU it was measured on (name, compute capability,
SM count) and one entry per problem class (a Problem plus a work bucket): the winning variant's knobs, its
median time and spread, the built-in default's time on the same class, how many trials the study ran, how
long tuning took, and the versions it was tuned with. Writes take a file lock, re-read the file, merge (an
entry replaces only the entry of its own class) and replace the file atomically, so concurrent tuners lose
nothing. A file that does not parse or validate raises `RegistryError` naming the file and the problem;
dispatch skips such a file (or entry) and warns once.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import __version__
from .bench import gpu_slug  # 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', the file name of its YAML
from .problem import Problem
from .variant import BACKWARD_KINDS, Variant, variant_from_dict

SCHEMA_VERSION = 1
TUNED_DIR_ENV = "FWAGEN_TUNED_DIR"
_CLASS_KEY = re.compile(r"(fwd|bwd)_n(\d+)_d(\d+)_(float16|bfloat16|float32)_(b|m|bm|plain)_x(\d+)")


class RegistryError(ValueError):
    """A tuned YAML file that cannot be used; the message names the file and what is wrong."""


def tuned_dir() -> Path:
    """Where tuned YAML files live: $FWAGEN_TUNED_DIR if set; else an installed wheel's fwagen/tuned (mapped
    from the top-level tuned/ folder by pyproject.toml); else, in a source checkout, tuned/ itself."""
    override = os.environ.get(TUNED_DIR_ENV)
    if override:
        return Path(override)
    packaged = Path(__file__).resolve().parent / "tuned"
    checkout = Path(__file__).resolve().parent.parent / "tuned"
    if not packaged.is_dir() and (checkout.parent / "pyproject.toml").is_file():
        return checkout
    return packaged  # a wheel with nothing tuned has no such folder: `show` says so


@dataclass(frozen=True)
class ProblemClass:
    """What a tuned entry is for: a problem and a work bucket (windows x heads rounded to a power of 4)."""

    problem: Problem
    bucket: int

    def __post_init__(self):
        if self.bucket < 1 or self.bucket & (self.bucket - 1) or (self.bucket.bit_length() - 1) % 2:
            raise ValueError(f"work bucket {self.bucket}: expected a power of 4")

    def key(self) -> str:
        return f"{self.problem.key()}_x{self.bucket}"

    @classmethod
    def from_key(cls, text: str) -> ProblemClass:
        found = _CLASS_KEY.fullmatch(text)
        if found is None:
            raise ValueError(f"problem class {text!r}: expected DIR_nN_dD_DTYPE_FLAGS_xBUCKET such as "
                             "fwd_n49_d32_float16_bm_x4096")
        direction, n, d, dtype, flags, bucket = found.groups()
        try:
            problem = Problem(int(n), int(d), dtype, has_bias="b" in flags,
                              has_mask="m" in flags and flags != "plain", direction=direction)
            return cls(problem, int(bucket))
        except ValueError as error:
            raise ValueError(f"problem class {text!r}: {error}") from None


@dataclass(frozen=True)
class Entry:
    """One tuned class: the winner and what it was measured against."""

    pclass: ProblemClass
    variant: Variant
    median_ms: float
    spread: float
    default_key: str | None
    default_ms: float | None  # None where the default failed or was not measured
    trials: int
    tuning_s: float
    sampler: str = ""
    study: str = ""
    partial: bool = False  # the study stopped on its time budget before its trial budget
    tuned_with: dict = field(default_factory=dict)  # versions and date

    @property
    def speedup(self) -> float | None:
        return None if not self.default_ms else self.default_ms / self.median_ms

    def to_yaml(self) -> dict:
        knobs = {"kind": self.variant.kind, **self.variant.knobs()}
        return {"variant": knobs, "key": self.variant.key(), "median_ms": round(self.median_ms, 5),
                "spread": round(self.spread, 4),
                "default": {"key": self.default_key,
                            "median_ms": None if self.default_ms is None else round(self.default_ms, 5)},
                "trials": self.trials, "tuning_s": round(self.tuning_s, 1), "sampler": self.sampler,
                "study": self.study, "partial": self.partial, "tuned_with": dict(self.tuned_with)}


def entry_from_yaml(class_key: str, data) -> Entry:
    """Inverse of `Entry.to_yaml`; raises ValueError saying what is wrong (without the file name)."""
    try:
        pclass = ProblemClass.from_key(str(class_key))
    except ValueError as error:
        raise ValueError(str(error)) from None
    if not isinstance(data, dict):
        raise ValueError(f"entry {class_key}: expected a mapping, got {type(data).__name__}")
    missing = {"variant", "median_ms", "trials"} - set(data)
    if missing:
        raise ValueError(f"entry {class_key}: missing {sorted(missing)}")
    knobs = data["variant"]
    if not isinstance(knobs, dict):
        raise ValueError(f"entry {class_key}: variant: expected a mapping of knobs")
    try:
        variant = variant_from_dict({**knobs, "problem": asdict(pclass.problem)})
    except (TypeError, ValueError) as error:
        raise ValueError(f"entry {class_key}: variant: {error}") from None
    if (pclass.problem.direction == "bwd") != (variant.kind in BACKWARD_KINDS):
        raise ValueError(f"entry {class_key}: a {variant.kind} variant cannot serve a {pclass.problem.direction} class")
    default = data.get("default") or {}
    numbers = {"median_ms": data["median_ms"], "spread": data.get("spread", 0.0),
               "trials": data["trials"], "tuning_s": data.get("tuning_s", 0.0)}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"entry {class_key}: {name}: expected a finite number >= 0, got {value!r}")
    if data["median_ms"] <= 0:
        raise ValueError(f"entry {class_key}: median_ms must be positive, got {data['median_ms']!r}")
    default_ms = default.get("median_ms") if isinstance(default, dict) else None
    if default_ms is not None and (not isinstance(default_ms, (int, float)) or default_ms <= 0):
        raise ValueError(f"entry {class_key}: default.median_ms: expected a positive number, got {default_ms!r}")
    return Entry(pclass, variant, float(data["median_ms"]), float(numbers["spread"]),
                 default.get("key") if isinstance(default, dict) else None,
                 None if default_ms is None else float(default_ms), int(data["trials"]), float(numbers["tuning_s"]),
                 str(data.get("sampler", "")), str(data.get("study", "")), bool(data.get("partial", False)),
                 dict(data.get("tuned_with") or {}))


@dataclass(frozen=True)
class TunedFile:
    path: Path
    gpu: str  # the GPU's name as torch reports it
    arch: str  # e.g. sm_90
    sm_count: int | None
    entries: dict[str, Entry]  # class key -> entry
    problems: tuple[str, ...] = ()  # entries skipped, each message naming the file and the entry


def load(path: str | Path, strict: bool = True) -> TunedFile:
    """Read and validate one tuned file. Raises RegistryError for a file that cannot be used at all; an entry
    that does not validate raises too when `strict`, else it is left out and described in `problems`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise RegistryError(f"{path}: cannot read: {error}") from None
    except yaml.YAMLError as error:
        raise RegistryError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a mapping with schema, gpu and entries; got {type(data).__name__}")
    if data.get("schema") != SCHEMA_VERSION:
        raise RegistryError(f"{path}: schema version {data.get('schema')!r}; this fwagen reads {SCHEMA_VERSION}")
    gpu = data.get("gpu")
    if not isinstance(gpu, dict) or not isinstance(gpu.get("name"), str) \
            or not re.fullmatch(r"sm_\d{2,3}[af]?", str(gpu.get("compute_capability", ""))):
        raise RegistryError(f"{path}: gpu: expected name and compute_capability (such as sm_90)")
    if gpu_slug(gpu["name"]) != path.stem:
        raise RegistryError(f"{path}: holds results for {gpu['name']!r}, whose file is {gpu_slug(gpu['name'])}.yaml")
    raw = data.get("entries") or {}
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: entries: expected a mapping of class keys")
    entries, problems = {}, []
    for class_key, body in raw.items():
        try:
            entries[str(class_key)] = entry_from_yaml(class_key, body)
        except ValueError as error:
            if strict:
                raise RegistryError(f"{path}: {error}") from None
            problems.append(f"{path}: {error}")
    sm_count = gpu.get("sm_count")
    return TunedFile(path, gpu["name"], gpu["compute_capability"], sm_count if isinstance(sm_count, int) else None,
                     entries, tuple(problems))


def file_for(gpu: str, folder: str | Path | None = None) -> Path:
    return Path(folder if folder is not None else tuned_dir()) / f"{gpu_slug(gpu)}.yaml"


def save(entries: list[Entry], gpu: dict, folder: str | Path | None = None) -> Path:
    """Merge `entries` into the file of `gpu` ({name, compute_capability, sm_count}) under a file lock, and
    replace it atomically. An entry replaces the file's entry of the same class; every other entry stays.
    An existing file that does not validate is left untouched and raises RegistryError."""
    from filelock import FileLock

    path = file_for(gpu["name"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        merged: dict[str, dict] = {}
        if path.exists():
            current = load(path, strict=True)
            if current.arch != gpu["compute_capability"]:
                raise RegistryError(f"{path}: holds {current.arch} results; refusing to merge "
                                    f"{gpu['compute_capability']} results into it")
            merged = {key: entry.to_yaml() for key, entry in current.entries.items()}
        for entry in entries:
            merged[entry.pclass.key()] = entry.to_yaml()
        document = {"schema": SCHEMA_VERSION,
                    "gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"],
                            "sm_count": gpu.get("sm_count")},
                    "entries": {key: merged[key] for key in sorted(merged)}}
        text = ("# Tuned by `python cli.py tune`; merged on every write. Schema: fwagen/registry.py.\n"
                + yaml.safe_dump(document, sort_keys=False, width=120, default_flow_style=None))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


@dataclass(frozen=True)
class Catalog:
    """Every usable tuned file of a folder, by file stem (the GPU slug), and what had to be skipped."""

    folder: Path
    files: dict[str, TunedFile]
    problems: tuple[str, ...]


def scan(folder: str | Path | None = None) -> Catalog:
    folder = Path(folder if folder is not None else tuned_dir())
    files, problems = {}, []
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            tuned = load(path, strict=False)
        except RegistryError as error:
            problems.append(str(error))
            continue
        files[path.stem] = tuned
        problems.extend(tuned.problems)
    return Catalog(folder, files, tuple(problems))


def tuned_with() -> dict:
    """Versions this process tunes with, and the date: part of every entry's provenance."""
    import torch

    driver = None
    try:
        from cupy.cuda import runtime

        version = runtime.driverGetVersion()
        driver = f"{version // 1000}.{version % 1000 // 10}"
    except Exception:  # noqa: BLE001 - provenance is best effort; a missing CuPy leaves the field empty
        pass
    return {"fwagen": __version__, "torch": str(torch.__version__), "cuda": torch.version.cuda, "driver": driver,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def gpu_identity(device: int = 0) -> dict:
    """{name, compute_capability, sm_count} of a CUDA device: the `gpu` block of its tuned file."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "compute_capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count}
