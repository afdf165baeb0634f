"""boxloss: fused CPU/CUDA losses for box-supervised semantic segmentation.

The losses are PyTorch ops (``torch.ops.boxloss.*``) with autograd, fake
kernels for torch.compile, and pure-PyTorch references in
:mod:`boxloss.reference`.
"""

from boxloss._extension import cuda_kernels_built, extension_error, extension_loaded
from boxloss.pairwise import SparseCRFLoss, sparse_crf_loss

__version__ = "0.1.0"

__all__ = [
    "SparseCRFLoss",
    "cuda_kernels_built",
    "extension_error",
    "extension_loaded",
    "sparse_crf_loss",
]
