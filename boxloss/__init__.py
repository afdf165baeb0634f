"""boxloss: fused CPU/CUDA losses for box-supervised semantic segmentation.

The package is layered, imports running one way:

- :mod:`boxloss.ops`: one module per compiled op (``torch.ops.boxloss.*``): the
  public wrapper beside the op's fake kernel and autograd registration;
- :mod:`boxloss.losses`: the losses built on the ops, and their modules;
- :mod:`boxloss.recipes`: the compositions of a paper with its defaults;
- :mod:`boxloss.data`: datasets (synthetic, VOC, COCO, box crops);
- :mod:`boxloss.reference`: the readable pure-PyTorch references the tests
  and benchmarks compare against.

Every public name is importable from ``boxloss`` itself.
"""

from boxloss._extension import cuda_kernels_built, extension_error, extension_loaded
from boxloss.losses.background_attention import bap_classification_loss
from boxloss.losses.box2seg import (
    AffinityLoss,
    AttentionBoxRegulariser,
    AttentionWeightedLoss,
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
from boxloss.losses.box_priors import (
    BorderBackgroundLoss,
    MILBoxLoss,
    ProjectionLoss,
    TightBoxLoss,
    border_background_loss,
    mil_box_loss,
    projection_loss,
    tight_box_loss,
)
from boxloss.losses.noise_aware import NoiseAwareCELoss, NoiseAwareLoss, bootstrap_beta, cosine_logits, noise_aware_loss
from boxloss.losses.pairwise import DenseCRFLoss, SparseCRFLoss
from boxloss.losses.region_priors import (
    NegativeLoss,
    PositionalLoss,
    VolumetricLoss,
    image_border_mask,
    image_centre_mask,
    negative_loss,
    positional_loss,
    volumetric_loss,
)
from boxloss.losses.uncertainty import UncertaintyBCELoss, UncertaintyCELoss, UncertaintyL2Loss, uncertainty_l2_loss
from boxloss.metrics import confusion_matrix, fbeta_score, fill_rate_statistics, iou_table, mean_iou
from boxloss.ops._autograd import DoubleBackwardError
from boxloss.ops.background_attention import (
    BackgroundAttention,
    BackgroundAwarePooling,
    background_attention,
    background_aware_pool,
)
from boxloss.ops.box_masks import box_priority, boxes_to_masks
from boxloss.ops.boxes import PackedBoxes, pack_boxes
from boxloss.ops.crf_inference import DenseCRF, dense_crf_inference
from boxloss.ops.dense_crf import dense_crf_loss
from boxloss.ops.lattice import BilateralFilter, PermutohedralLattice, bilateral_filter, permutohedral_lattice
from boxloss.ops.row_col_max import BoxRowColMax, box_row_col_max
from boxloss.ops.sparse_crf import sparse_crf_loss
from boxloss.ops.uncertainty import uncertainty_bce_loss, uncertainty_ce_loss
from boxloss.recipes.bana import PseudoLabels, bana_pseudo_labels
from boxloss.recipes.baselines import box_fill_masks, dense_crf_box_masks, grabcut_box_masks
from boxloss.recipes.box2seg import Box2SegLoss
from boxloss.recipes.dense_crf import pydensecrf_inference
from boxloss.recipes.pseudo_labels import merge_box_masks
from boxloss.recipes.regularized import RegularizedLoss

__version__ = "0.1.0"

__all__ = [
    # the compiled extension
    "DoubleBackwardError",
    "cuda_kernels_built",
    "extension_error",
    "extension_loaded",
    # boxes: packing and rasterising
    "PackedBoxes",
    "box_priority",
    "boxes_to_masks",
    "pack_boxes",
    # box priors on the row/column maxima of each box
    "BorderBackgroundLoss",
    "BoxRowColMax",
    "MILBoxLoss",
    "ProjectionLoss",
    "TightBoxLoss",
    "border_background_loss",
    "box_row_col_max",
    "mil_box_loss",
    "projection_loss",
    "tight_box_loss",
    # size and position priors of single-class crops
    "NegativeLoss",
    "PositionalLoss",
    "VolumetricLoss",
    "image_border_mask",
    "image_centre_mask",
    "negative_loss",
    "positional_loss",
    "volumetric_loss",
    # pairwise: Sparse-CRF, the permutohedral lattice, the DenseCRF loss and mean-field inference
    "BilateralFilter",
    "DenseCRF",
    "DenseCRFLoss",
    "PermutohedralLattice",
    "SparseCRFLoss",
    "bilateral_filter",
    "dense_crf_inference",
    "dense_crf_loss",
    "permutohedral_lattice",
    "sparse_crf_loss",
    # background attention and the noise-aware loss (BANA)
    "BackgroundAttention",
    "BackgroundAwarePooling",
    "NoiseAwareCELoss",
    "NoiseAwareLoss",
    "background_attention",
    "background_aware_pool",
    "bap_classification_loss",
    "bootstrap_beta",
    "cosine_logits",
    "noise_aware_loss",
    # Box2Seg's losses
    "AffinityLoss",
    "AttentionBoxRegulariser",
    "AttentionWeightedLoss",
    "BoxCELoss",
    "FillRateHingeLoss",
    "PseudoLabelCELoss",
    "affinity_loss",
    "attention_background_loss",
    "attention_box_regulariser",
    "attention_foreground_loss",
    "attention_weighted_loss",
    "box_ce_loss",
    "fill_rate_hinge_loss",
    "fill_rates",
    "pseudo_label_ce_loss",
    # label uncertainty
    "UncertaintyBCELoss",
    "UncertaintyCELoss",
    "UncertaintyL2Loss",
    "uncertainty_bce_loss",
    "uncertainty_ce_loss",
    "uncertainty_l2_loss",
    # recipes: a paper's composition with its defaults
    "Box2SegLoss",
    "PseudoLabels",
    "RegularizedLoss",
    "bana_pseudo_labels",
    "box_fill_masks",
    "dense_crf_box_masks",
    "grabcut_box_masks",
    "merge_box_masks",
    "pydensecrf_inference",
    # metrics
    "confusion_matrix",
    "fbeta_score",
    "fill_rate_statistics",
    "iou_table",
    "mean_iou",
]

#: subpackages loaded on first use, so that ``import boxloss`` stays light: ``boxloss.data.SyntheticBoxDataset``
#: and ``boxloss.trainers`` work after a plain ``import boxloss``
_LAZY_SUBPACKAGES = ("data", "trainers")


def __getattr__(name):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"boxloss.{name}")
    raise AttributeError(f"module 'boxloss' has no attribute {name!r}")
