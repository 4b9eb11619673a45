"""NVRTC -> cubin, memory and disk cache, resource report, module load.

`compile_variant` needs no GPU: NVRTC compiles for any architecture. `load_kernel` loads the cubin for the
current device through CuPy. The disk cache is namespaced by fwagen version, NVRTC version and
architecture, and keyed by the variant key plus a hash of the rendered source, so a template edit never
reuses a stale binary.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .render import helper_headers, render
from .variant import Variant


class CompileError(RuntimeError):
    """NVRTC rejected a generated source; the message names the saved source file and the log."""


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_bytes: int
    stack_bytes: int
    static_smem_bytes: int


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    arch: str
    cubin_path: Path
    resources: Resources


def cache_root() -> Path:
    base = os.environ.get("FWAGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fwagen")
    return Path(base)


def nvrtc_version() -> str:
    from cupy.cuda import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def _cuda_include_dir() -> str:
    candidates = []
    try:
        from cuda import pathfinder

        candidates.append(pathfinder.find_nvidia_header_directory("cudart"))
    except Exception:  # pathfinder is optional; the fixed locations below cover the usual installs
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    for site in sys.path:
        candidates += [os.path.join(site, "nvidia", "cu13", "include"),
                       os.path.join(site, "nvidia", "cuda_runtime", "include")]
    candidates.append("/usr/local/cuda/include")
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    raise CompileError("no CUDA include folder with cuda_fp16.h found; set CUDA_HOME "
                       "(pip install 'fwagen[cuda13]' brings one)")


def parse_ptxas_report(log: str) -> Resources:
    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return Resources(
        registers=number(r"Used (\d+) registers"),
        spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        static_smem_bytes=number(r"(\d+) bytes smem"),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


_memory: dict[tuple[str, str], CompiledKernel] = {}
_lock = threading.Lock()


def compile_variant(variant: Variant, arch: str) -> CompiledKernel:
    """Render and compile `variant` for `arch` (e.g. 'sm_90'); memoized in memory and on disk."""
    source = render(variant)
    hashed = source + "".join(helper_headers().values())
    digest = hashlib.sha256(hashed.encode()).hexdigest()[:16]
    memo_key = (variant.key() + digest, arch)
    with _lock:
        if memo_key in _memory:
            return _memory[memo_key]
    folder = cache_root() / __version__ / f"nvrtc-{nvrtc_version()}" / arch
    cubin_path = folder / f"{variant.key()}-{digest}.cubin"
    report_path = cubin_path.with_suffix(".json")
    if cubin_path.is_file() and report_path.is_file():
        resources = Resources(**json.loads(report_path.read_text()))
    else:
        # A variant of architecture-specific instructions (wgmma: sm_90a) compiles for that target; it is legal on
        # its base architecture only (fwagen/space.py).
        cubin, log = _nvrtc_compile(source, variant.key(), arch + getattr(variant, "arch_suffix", ""), folder)
        resources = parse_ptxas_report(log)
        _atomic_write(cubin_path, cubin)
        _atomic_write(report_path, json.dumps(asdict(resources)).encode())
    compiled = CompiledKernel(variant.key(), arch, cubin_path, resources)
    with _lock:
        _memory[memo_key] = compiled
    return compiled


def _nvrtc_compile(source: str, name: str, arch: str, folder: Path) -> tuple[bytes, str]:
    from cupy.cuda import nvrtc

    options = [f"-arch={arch}", "-std=c++17", f"-I{_cuda_include_dir()}", "--ptxas-options=-v"]
    headers = helper_headers()
    program = nvrtc.createProgram(source, f"{name}.cu", [h.encode() for h in headers.values()],
                                  [n.encode() for n in headers])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            source_path = folder / "failed" / f"{name}.cu"
            _atomic_write(source_path, source.encode())
            log = nvrtc.getProgramLog(program)
            raise CompileError(f"NVRTC failed on {name} for {arch} ({error}); source saved to {source_path}\n"
                               f"{log}") from None
        return nvrtc.getCUBIN(program), nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int | None = None) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


@dataclass(frozen=True)
class LoadedKernel:
    function: object  # cupy.RawKernel; keeps the module loaded
    handle: int  # its CUfunction, for cuLaunchKernel
    resident_blocks: int  # blocks of this kernel the whole GPU holds at once


_loaded: dict[tuple[str, int], LoadedKernel] = {}


def load_kernel(variant: Variant, device_index: int) -> LoadedKernel:
    """The kernel of `variant` for the given CUDA device, compiled if needed, loaded once."""
    slot = (variant.key(), device_index)
    loaded = _loaded.get(slot)
    if loaded is None:
        import cupy
        import torch
        from cupy_backends.cuda.api import driver

        compiled = compile_variant(variant, device_arch(device_index))
        with cupy.cuda.Device(device_index):
            function = cupy.RawModule(path=str(compiled.cubin_path)).get_function(compiled.name)
            if variant.smem_bytes > 48 * 1024:
                function.max_dynamic_shared_size_bytes = variant.smem_bytes
            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(
                function.kernel.ptr, variant.threads, variant.smem_bytes)
        sms = torch.cuda.get_device_properties(device_index).multi_processor_count
        loaded = _loaded[slot] = LoadedKernel(function, function.kernel.ptr, max(per_sm, 1) * sms)
    return loaded
