"""Pure-PyTorch reference implementations, written equation by equation from the
papers.  They are the test oracle of the fused ops and the baseline of the
benchmarks; they are slow and memory-hungry on purpose (readability first)."""

from boxloss.reference.bilateral import (
    bilateral_filter_brute_force,
    lattice_filter_reference,
    permutohedral_lattice_reference,
)
from boxloss.reference.pairwise import (
    dense_crf_loss_lattice_reference,
    dense_crf_loss_reference,
    neighbour_offsets,
    sparse_crf_loss_reference,
)
from boxloss.reference.philox import philox4x32_10, philox_normal
from boxloss.reference.uncertainty import (
    uncertainty_bce_loss_reference,
    uncertainty_ce_loss_reference,
    uncertainty_l2_loss_reference,
)

__all__ = [
    "bilateral_filter_brute_force",
    "dense_crf_loss_lattice_reference",
    "dense_crf_loss_reference",
    "lattice_filter_reference",
    "neighbour_offsets",
    "permutohedral_lattice_reference",
    "philox4x32_10",
    "philox_normal",
    "sparse_crf_loss_reference",
    "uncertainty_bce_loss_reference",
    "uncertainty_ce_loss_reference",
    "uncertainty_l2_loss_reference",
]
