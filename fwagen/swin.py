"""Drop-in Swin V1 window attention for timm models, running `fwagen.window_attention_qkv`.

    import timm, fwagen.swin
    model = fwagen.swin.patch_timm(timm.create_model("swin_tiny_patch4_window7_224"))

`WindowAttention` subclasses timm's Swin V1 `WindowAttention` and overrides only `forward`: constructor,
parameters, buffers, `state_dict` keys, `set_window_size` and weight init are timm's, so checkpoints load
unchanged and `isinstance(m, timm.models.swin_transformer.WindowAttention)` still holds. Patching swaps
`__class__` in place (the subclass adds no state), so parameters stay the same objects: optimizers, hooks,
`device`/`dtype` moves and `requires_grad` settings made before patching all carry over, and nothing is copied.
Patch before `torch.compile(model)`; patching a model already compiled makes it retrace, since dynamo
guards on each module's class.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .op import window_attention_qkv

try:
    from timm.models import swin_transformer as _timm_swin
except ImportError as error:  # timm is the optional extra fwagen[timm]
    raise ImportError("fwagen.swin needs timm: pip install 'fwagen[timm]'") from error

TimmWindowAttention = _timm_swin.WindowAttention

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(f"fwagen: {reason}", stacklevel=2)


class WindowAttention(TimmWindowAttention):
    """timm's Swin V1 window attention whose core (scale, q k^T, bias, mask, softmax, @ v) is one fwagen call.

    The kernels read q, k and v from the qkv Linear's (B_, N, 3, H, d) output in place, write the result as
    (B_, N, H * d) for the projection and the gradient of qkv as one (B_, N, 3, H, d) tensor: no permute or copy
    on either side, forward or backward. Attention dropout above zero while
    training has no kernel and runs timm's forward instead, with a one-time warning.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (num_windows * B, N, C); mask: (num_windows, N, N) of 0 / -100, or None for unshifted blocks."""
        if self.training and self.attn_drop.p > 0:
            _warn_once(f"attention dropout (p={self.attn_drop.p}) has no kernel; running timm's WindowAttention "
                       "forward while training")
            return super().forward(x, mask)
        windows, n, _ = x.shape
        qkv = self.qkv(x)  # a Linear's output is contiguous: view, never copy
        bias = self._get_rel_pos_bias()[0]  # (H, N, N), in the table's dtype (float32 under autocast)
        x = window_attention_qkv(qkv.view(windows, n, 3, self.num_heads, -1), bias, mask, self.scale, layout="bnc")
        x = self.proj(x)
        return self.proj_drop(x)


# Window attentions of other timm models whose logits differ from Swin V1's: named in the error they raise.
_UNSUPPORTED = {
    "timm.models.swin_transformer_v2.WindowAttention":
        "Swin V2 cosine attention (normalized q and k, logit_scale, cpb_mlp bias) has no fwagen kernel",
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention":
        "Swin V2 (cr) cosine attention with a meta-network position bias has no fwagen kernel",
}


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _structure_problem(module: nn.Module) -> str | None:
    """Why a timm Swin V1 WindowAttention cannot take fwagen's forward, or None when it can."""
    if type(module) is not TimmWindowAttention:
        return (f"{_qualname(module)} subclasses timm's Swin V1 WindowAttention and may override its forward; "
                "fwagen patches only the class itself")
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), module.num_heads
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return f"expected nn.Linear qkv and proj, got {type(qkv).__name__} and {type(proj).__name__}"
    if qkv.out_features != 3 * proj.in_features or proj.in_features % heads:
        return (f"expected qkv out_features = 3 * proj in_features = 3 * heads * head_dim, got {qkv.out_features}, "
                f"{proj.in_features} and {heads} heads")
    win_h, win_w = module.window_size
    table = getattr(module, "relative_position_bias_table", None)
    table_shape = ((2 * win_h - 1) * (2 * win_w - 1), heads)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != table_shape:
        return f"expected relative_position_bias_table of shape {table_shape}, got {getattr(table, 'shape', table)}"
    index = getattr(module, "relative_position_index", None)
    if not isinstance(index, torch.Tensor) or tuple(index.shape) != (module.window_area,) * 2:
        return f"expected relative_position_index of shape {(module.window_area,) * 2}"
    if not isinstance(getattr(module, "attn_drop", None), nn.Dropout):
        return f"expected attn_drop to be nn.Dropout, got {type(getattr(module, 'attn_drop', None)).__name__}"
    return None


def patch_timm(model: nn.Module) -> nn.Module:
    """Switch every Swin V1 `WindowAttention` of a timm model to fwagen's, in place; return the model.

    Modules already patched are left as they are. Raises ValueError, naming each module path, when the model
    holds window attention fwagen cannot run (Swin V2, subclasses, altered structure) or none at all; the
    model is then left unchanged.
    """
    targets, problems = [], []
    for path, module in model.named_modules():
        name = _qualname(module)
        if type(module) is WindowAttention:
            continue
        if name in _UNSUPPORTED:
            problems.append(f"{path or '<model>'} ({name}): {_UNSUPPORTED[name]}")
        elif isinstance(module, TimmWindowAttention):
            problem = _structure_problem(module)
            if problem is None:
                targets.append(module)
            else:
                problems.append(f"{path or '<model>'} ({name}): {problem}")
    if problems:
        raise ValueError("fwagen.swin.patch_timm: cannot patch " + "; ".join(problems))
    if not targets and not any(type(m) is WindowAttention for m in model.modules()):
        raise ValueError(f"fwagen.swin.patch_timm: {type(model).__name__} holds no timm Swin V1 WindowAttention "
                         f"({_qualname(TimmWindowAttention)})")
    for module in targets:
        module.__class__ = WindowAttention
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Give every fwagen `WindowAttention` of the model back timm's class, in place; return the model."""
    for module in model.modules():
        if type(module) is WindowAttention:
            module.__class__ = TimmWindowAttention
    return model


def is_patched(model: nn.Module) -> bool:
    return any(type(m) is WindowAttention for m in model.modules())
