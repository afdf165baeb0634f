"""boxloss: fused CPU/CUDA losses for box-supervised semantic segmentation.

The losses are PyTorch ops (``torch.ops.boxloss.*``) with autograd, fake
kernels for torch.compile, and pure-PyTorch references in
:mod:`boxloss.reference`.
"""

from boxloss._extension import cuda_kernels_built, extension_error, extension_loaded
from boxloss.background_attention import (
    BackgroundAttention,
    BackgroundAwarePooling,
    background_attention,
    background_aware_pool,
    bap_classification_loss,
)
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
from boxloss.box2seg import (
    AffinityLoss,
    AttentionBoxRegulariser,
    AttentionWeightedLoss,
    Box2SegLoss,
    BoxCELoss,
    FillRateHingeLoss,
    PseudoLabelCELoss,
    affinity_loss,
    attention_background_loss,
    attention_box_regulariser,
    attention_foreground_loss,
    attention_weighted_loss,
    box_ce_loss,
    fill_rate_hinge_loss,
    fill_rates,
    pseudo_label_ce_loss,
)
from boxloss.box_masks import box_priority, boxes_to_masks
from boxloss.boxes import PackedBoxes, pack_boxes
from boxloss.lattice import BilateralFilter, PermutohedralLattice, bilateral_filter, permutohedral_lattice
from boxloss.noise_aware import (
    NoiseAwareCELoss,
    NoiseAwareLoss,
    PseudoLabels,
    bana_pseudo_labels,
    bootstrap_beta,
    cosine_logits,
    noise_aware_loss,
)
from boxloss.ops.crf_inference import DenseCRF, dense_crf_inference
from boxloss.metrics import confusion_matrix, fbeta_score, fill_rate_statistics, iou_table, mean_iou
from boxloss.pseudo_labels import merge_box_masks
from boxloss.pairwise import DenseCRFLoss, SparseCRFLoss, dense_crf_loss, sparse_crf_loss
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
    "BackgroundAttention",
    "BackgroundAwarePooling",
    "NoiseAwareCELoss",
    "NoiseAwareLoss",
    "PseudoLabels",
    "background_attention",
    "background_aware_pool",
    "bana_pseudo_labels",
    "bap_classification_loss",
    "bootstrap_beta",
    "cosine_logits",
    "noise_aware_loss",
    "AffinityLoss",
    "AttentionBoxRegulariser",
    "AttentionWeightedLoss",
    "Box2SegLoss",
    "BoxCELoss",
    "FillRateHingeLoss",
    "PseudoLabelCELoss",
    "affinity_loss",
    "attention_background_loss",
    "attention_box_regulariser",
    "attention_foreground_loss",
    "attention_weighted_loss",
    "box_ce_loss",
    "box_priority",
    "boxes_to_masks",
    "confusion_matrix",
    "fbeta_score",
    "fill_rate_hinge_loss",
    "fill_rate_statistics",
    "fill_rates",
    "iou_table",
    "mean_iou",
    "merge_box_masks",
    "pseudo_label_ce_loss",
    "BilateralFilter",
    "BorderBackgroundLoss",
    "BoxRowColMax",
    "DenseCRF",
    "DenseCRFLoss",
    "MILBoxLoss",
    "NegativeLoss",
    "PackedBoxes",
    "PermutohedralLattice",
    "PositionalLoss",
    "ProjectionLoss",
    "RegularizedLoss",
    "SparseCRFLoss",
    "TightBoxLoss",
    "UncertaintyBCELoss",
    "UncertaintyCELoss",
    "UncertaintyL2Loss",
    "VolumetricLoss",
    "bilateral_filter",
    "border_background_loss",
    "box_row_col_max",
    "cuda_kernels_built",
    "dense_crf_inference",
    "dense_crf_loss",
    "extension_error",
    "extension_loaded",
    "image_border_mask",
    "image_centre_mask",
    "mil_box_loss",
    "negative_loss",
    "pack_boxes",
    "permutohedral_lattice",
    "positional_loss",
    "projection_loss",
    "sparse_crf_loss",
    "tight_box_loss",
    "uncertainty_bce_loss",
    "uncertainty_ce_loss",
    "uncertainty_l2_loss",
    "volumetric_loss",
]
