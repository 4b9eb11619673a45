"""The one Jinja environment: variant -> CUDA source.

Templates receive only ints and strings. Every value goes through `_cuda_spelling`, the single table from
Python values to their C++ spelling, and every derived number is computed on the variant beforehand.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

from .variant import CUDA_TYPE, LSE_TYPE, Variant

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_FOR_KIND = {"mma": "fwd_mma.cu.j2", "simt": "fwd_simt.cu.j2", "bwd_mma": "bwd_mma.cu.j2",
                     "bwd_simt": "bwd_simt.cu.j2", "bwd_tile": "bwd_tile.cu.j2", "bwd_delta": "bwd_delta.cu.j2",
                     "dbias_sum": "dbias_sum.cu.j2"}

_DERIVED = {
    "mma": ("head_dim_pad", "chunks_per_item", "m_tiles_per_warp", "warps_per_item", "key_tiles",
            "threads", "smem_row_elems", "stream_add", "add_pitch", "wgmma", "kv_row_elems", "mma_type",
            "logit_add_bytes", "tensor_maps"),
    "simt": ("chunks_per_item", "cols_per_thread", "threads"),
    "bwd_mma": ("n_pad", "head_dim_pad", "threads", "smem_row_elems", "dbias_smem_groups"),
    "bwd_simt": ("chunks_per_item", "cols_per_thread", "threads"),
    "bwd_tile": ("chunks_per_item", "head_dim_pad", "threads", "smem_row_elems", "smem_bytes"),
    "bwd_delta": ("threads",),
    "dbias_sum": ("threads", "floats_per_thread"),
}
_DERIVED["mma_stream"] = _DERIVED["wgmma"] = _DERIVED["wgmma_stream"] = _DERIVED["mma"]
_DERIVED["wgmma_tma"] = _DERIVED["wgmma_stream_tma"] = _DERIVED["mma"]


def template_dir() -> Path:
    """An installed wheel ships the templates inside the package (fwagen/templates, mapped from the
    top-level templates/ folder by pyproject.toml); a source checkout reads templates/ directly."""
    if TEMPLATE_DIR.is_dir():
        return TEMPLATE_DIR
    return Path(__file__).resolve().parent.parent / "templates"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _cuda_spelling(value) -> str | int:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return value
    raise TypeError(f"template values must be bool, int or str, got {type(value).__name__}")


def template_values(variant: Variant) -> dict:
    problem = variant.problem
    values = {
        "name": variant.key(),
        "ctype": CUDA_TYPE[problem.dtype],
        "lse_ctype": CUDA_TYPE[LSE_TYPE[problem.dtype]],
        "n": problem.n,
        "head_dim": problem.head_dim,
        "has_bias": problem.has_bias,
        "has_mask": problem.has_mask,
        **variant.knobs(),
        **{name: getattr(variant, name) for name in _DERIVED[variant.kind]},
    }
    return {name: _cuda_spelling(value) for name, value in values.items()}


HELPER_HEADERS = ("common.cuh", "mma_tiles.cuh", "split_backward.cuh", "wgmma.cuh")


@lru_cache(maxsize=1)
def helper_headers() -> dict[str, str]:
    """Plain .cuh helpers the generated sources #include; handed to NVRTC by name."""
    return {name: (template_dir() / name).read_text() for name in HELPER_HEADERS}


def render(variant: Variant) -> str:
    name = getattr(variant, "template", None) or TEMPLATE_FOR_KIND[variant.kind]  # a kind with layouts names its own
    template = environment().get_template(name)
    return template.render(**template_values(variant))
