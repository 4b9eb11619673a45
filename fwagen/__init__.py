"""fwagen: generated, tuned CUDA kernels for Swin Transformer window attention."""
__version__ = "0.1.0"

from .dispatch import explain  # noqa: E402
from .op import window_attention, window_attention_qkv  # noqa: E402
from .reference import window_attention_reference  # noqa: E402

__all__ = ["window_attention", "window_attention_qkv", "window_attention_reference", "explain", "__version__"]
