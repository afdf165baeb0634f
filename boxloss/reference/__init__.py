"""Pure-PyTorch reference implementations, written equation by equation from the
papers.  They are the test oracle of the fused ops and the baseline of the
benchmarks; they are slow and memory-hungry on purpose (readability first)."""

from boxloss.reference.pairwise import neighbour_offsets, sparse_crf_loss_reference
from boxloss.reference.philox import philox4x32_10, philox_normal
from boxloss.reference.uncertainty import (
    uncertainty_bce_loss_reference,
    uncertainty_ce_loss_reference,
    uncertainty_l2_loss_reference,
)

__all__ = [
    "neighbour_offsets",
    "philox4x32_10",
    "philox_normal",
    "sparse_crf_loss_reference",
    "uncertainty_bce_loss_reference",
    "uncertainty_ce_loss_reference",
    "uncertainty_l2_loss_reference",
]
