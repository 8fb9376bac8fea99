"""TiC (Transformer in Convolution, arXiv 2310.04134): the MSA-Conv layer, the hierarchical
classifier built from it, its image data and `sinklora tic-train` / `tic-eval` (docs/tic.md)."""

from .layers import SHIFT_SCHEMES, MSAConv2d
from .model import PRESETS, TiC, build_model, count_parameters, model_names

__all__ = ["MSAConv2d", "TiC", "PRESETS", "SHIFT_SCHEMES", "build_model", "count_parameters", "model_names"]
