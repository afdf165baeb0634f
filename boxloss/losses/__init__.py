"""Losses built on :mod:`boxloss.ops`, each a function and a thin ``nn.Module``.

Every loss returns a tensor: a scalar, or its per-image (B,), per-box (K,) or
per-pixel values with ``reduction="none"``.  Those that have parts return
``(loss, terms)`` with ``return_terms=True``, ``terms`` a dict of tensors.

- :mod:`~boxloss.losses.pairwise`: :class:`~boxloss.SparseCRFLoss`, :class:`~boxloss.DenseCRFLoss`
- :mod:`~boxloss.losses.box_priors`: tight-box, MIL, projection and border losses
- :mod:`~boxloss.losses.region_priors`: volumetric, positional and negative losses
- :mod:`~boxloss.losses.box2seg`: Box2Seg's cross-entropies, attention losses, fill rates, affinity loss
- :mod:`~boxloss.losses.noise_aware`: BANA's noise-aware loss and cosine classifier
- :mod:`~boxloss.losses.uncertainty`: the regression loss with uncertainty and the uncertainty modules
- :mod:`~boxloss.losses.background_attention`: BANA's background-aware pooling classification loss
"""
