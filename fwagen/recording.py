"""Recordings of a tuning run: every measurement as one JSON line, and an evaluator that replays them.

`cli.py tune --record FILE.jsonl` wraps the GPU evaluator in a `Recorder`; `RecordingEvaluator` reads such
files (tests/data holds one from an H200) and measures each variant as recorded, so the search runs on any
machine: the simulation the CPU tests use.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from .evaluate import Evaluator, Measurement
from .registry import ProblemClass
from .variant import Variant


def record_line(pclass: ProblemClass, variant: Variant, measurement: Measurement, gpu: str, arch: str,
                phase: str = "search") -> dict:
    """One line of a recording: enough to rebuild the class, the variant and its measurement."""
    return {"class": pclass.key(), "gpu": gpu, "arch": arch, "phase": phase, "variant": variant.to_dict(),
            **measurement.to_json()}


class Recorder:
    """Wraps an evaluator and appends every measurement (search and re-time) to a JSONL file."""

    def __init__(self, inner: Evaluator, path: str | Path):
        self.inner, self.path = inner, Path(path)
        self.arch, self.gpu = inner.arch, inner.gpu
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _write(self, lines: list[dict]) -> None:
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        with self._lock, open(self.path, "a") as handle:
            handle.write(text)

    def evaluate(self, pclass, variant):
        measurement = self.inner.evaluate(pclass, variant)
        self._write([record_line(pclass, variant, measurement, self.gpu, self.arch)])
        return measurement

    def retime(self, pclass, variants):
        results = self.inner.retime(pclass, variants)
        by_key = {v.key(): v for v in variants}
        self._write([record_line(pclass, by_key[k], m, self.gpu, self.arch, "retime") for k, m in results.items()])
        return results

    def prefetch(self, pclass, variants):
        self.inner.prefetch(pclass, variants)

    def covers(self, pclass):
        return self.inner.covers(pclass)

    def __getattr__(self, name):  # provenance and the like come from the wrapped evaluator
        return getattr(self.inner, name)


class RecordingEvaluator:
    """Replays a recording: each variant measures as it was recorded. `evaluations` lists the keys asked for."""

    def __init__(self, *paths: str | Path):
        self._search: dict[tuple[str, str], Measurement] = {}
        self._retimed: dict[tuple[str, str], Measurement] = {}
        self.gpu = self.arch = None
        for path in paths:
            for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    slot = (data["class"], data["key"])
                    measurement = Measurement.from_json(data)
                except (ValueError, KeyError) as error:
                    raise ValueError(f"{path}:{number}: not a measurement line: {error}") from None
                self.gpu, self.arch = self.gpu or data.get("gpu"), self.arch or data.get("arch")
                table = self._retimed if data.get("phase") == "retime" else self._search
                table.setdefault(slot, measurement)
        if not self._search:
            raise ValueError(f"no measurements in {', '.join(map(str, paths))}")
        self.evaluations: list[str] = []

    def classes(self) -> list[ProblemClass]:
        return sorted({ProblemClass.from_key(c) for c, _ in self._search}, key=ProblemClass.key)

    def covers(self, pclass):
        return {key for c, key in self._search if c == pclass.key()}

    def measurements(self, pclass) -> dict[str, Measurement]:
        return {key: m for (c, key), m in self._search.items() if c == pclass.key()}

    def evaluate(self, pclass, variant):
        slot = (pclass.key(), variant.key())
        if slot not in self._search:
            raise LookupError(f"{variant.key()} of {pclass.key()} is not in the recording")
        self.evaluations.append(variant.key())
        return self._search[slot]

    def retime(self, pclass, variants):
        return {v.key(): self._retimed.get((pclass.key(), v.key()), self._search[(pclass.key(), v.key())])
                for v in variants}

    def prefetch(self, pclass, variants):
        pass

    def gpu_identity(self) -> dict:
        return {"name": self.gpu, "compute_capability": self.arch, "sm_count": None}

    def tuned_with(self) -> dict:
        return {"replayed": True}
