"""boxloss: fused CPU/CUDA losses for box-supervised semantic segmentation.

The losses are PyTorch ops (``torch.ops.boxloss.*``) with autograd, fake
kernels for torch.compile, and pure-PyTorch references in
:mod:`boxloss.reference`.
"""

from boxloss._extension import cuda_kernels_built, extension_error, extension_loaded
from boxloss.box_priors import (
    BorderBackgroundLoss,
    BoxRowColMax,
    MILBoxLoss,
    ProjectionLoss,
    TightBoxLoss,
    border_background_loss,
    box_row_col_max,
    mil_box_loss,
    projection_loss,
    tight_box_loss,
)
from boxloss.boxes import PackedBoxes, pack_boxes
from boxloss.pairwise import SparseCRFLoss, sparse_crf_loss
from boxloss.region_priors import (
    NegativeLoss,
    PositionalLoss,
    VolumetricLoss,
    image_border_mask,
    image_centre_mask,
    negative_loss,
    positional_loss,
    volumetric_loss,
)
from boxloss.regularized import RegularizedLoss
from boxloss.uncertainty import (
    UncertaintyBCELoss,
    UncertaintyCELoss,
    UncertaintyL2Loss,
    uncertainty_bce_loss,
    uncertainty_ce_loss,
    uncertainty_l2_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BorderBackgroundLoss",
    "BoxRowColMax",
    "MILBoxLoss",
    "NegativeLoss",
    "PackedBoxes",
    "PositionalLoss",
    "ProjectionLoss",
    "RegularizedLoss",
    "SparseCRFLoss",
    "TightBoxLoss",
    "UncertaintyBCELoss",
    "UncertaintyCELoss",
    "UncertaintyL2Loss",
    "VolumetricLoss",
    "border_background_loss",
    "box_row_col_max",
    "cuda_kernels_built",
    "extension_error",
    "extension_loaded",
    "image_border_mask",
    "image_centre_mask",
    "mil_box_loss",
    "negative_loss",
    "pack_boxes",
    "positional_loss",
    "projection_loss",
    "sparse_crf_loss",
    "tight_box_loss",
    "uncertainty_bce_loss",
    "uncertainty_ce_loss",
    "uncertainty_l2_loss",
    "volumetric_loss",
]
