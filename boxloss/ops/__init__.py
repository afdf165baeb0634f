"""The op wrappers: one module per compiled op (``torch.ops.boxloss.*``).

Each module holds the public function(s) that check their arguments and call
the compiled op (or, without the extension, :mod:`boxloss._fallback`), and,
beside them, that op's ``torch.library.register_fake`` and
``register_autograd``, registered when the module is imported and the
extension has loaded.  Backward ops are private: ``boxloss::_<op>_backward``.

- :mod:`~boxloss.ops.boxes`: the box convention, :func:`~boxloss.pack_boxes`, box pixel ranges
- :mod:`~boxloss.ops.box_masks`: ``box_front_index`` -> :func:`~boxloss.boxes_to_masks`
- :mod:`~boxloss.ops.row_col_max`: ``box_row_col_max`` -> :func:`~boxloss.box_row_col_max`
- :mod:`~boxloss.ops.sparse_crf`: ``sparse_crf_loss`` -> :func:`~boxloss.sparse_crf_loss`
- :mod:`~boxloss.ops.lattice`: ``permutohedral_lattice``, ``lattice_filter`` -> :class:`~boxloss.PermutohedralLattice`
- :mod:`~boxloss.ops.dense_crf`: ``dense_crf_loss`` -> :func:`~boxloss.dense_crf_loss`
- :mod:`~boxloss.ops.crf_inference`: ``dense_crf_inference`` -> :func:`~boxloss.dense_crf_inference`,
  :class:`~boxloss.DenseCRF`
- :mod:`~boxloss.ops.background_attention`: ``background_attention``, ``background_aware_pool``,
  ``background_attention_pool`` -> :func:`~boxloss.background_attention`, :class:`~boxloss.BackgroundAwarePooling`
- :mod:`~boxloss.ops.uncertainty`: ``uncertainty_bce_loss``, ``uncertainty_ce_loss``
"""
