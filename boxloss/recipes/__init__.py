"""A paper's composition of losses and tools, with that paper's defaults.

- :mod:`~boxloss.recipes.regularized`: :class:`~boxloss.RegularizedLoss` (Box to Tag and Back, Eq. 4-6)
- :mod:`~boxloss.recipes.box2seg`: :class:`~boxloss.Box2SegLoss` (Box2Seg, Eq. 11)
- :mod:`~boxloss.recipes.bana`: :func:`~boxloss.bana_pseudo_labels` (BANA, Eq. 5-9)
- :mod:`~boxloss.recipes.pseudo_labels`: :func:`~boxloss.merge_box_masks` (Box to Tag and Back Sec. 4.3; LPG Eq. 7)
- :mod:`~boxloss.recipes.baselines`: GrabCut, DenseCRF and box-filling masks per box
- :mod:`~boxloss.recipes.dense_crf`: :func:`~boxloss.pydensecrf_inference` (mean-field DenseCRF through pydensecrf)
"""
