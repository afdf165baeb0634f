"""Reference trainers: each paper's pipeline on the boxloss losses, as short worked examples over one engine.

Run one with ``python -m boxloss.trainers <name> --preset quick`` (``--help`` for the settings of its ablation).
The trainers:

- ``box2tagback``: Ji & Veksler, "Weakly Supervised Semantic Segmentation: From Box to Tag and Back", BMVC 2021;
- ``box2seg``: Kulharia et al., "Box2Seg: Attention Weighted Loss and Discriminative Feature Learning for Weakly
  Supervised Segmentation", ECCV 2020;
- ``uncertainty``: Neven et al., "Weakly-Supervised Semantic Segmentation by Learning Label Uncertainty" (2021);
- ``bana``: Oh, Kim & Ham, "Background-Aware Pooling and Noise-Aware Loss for Weakly-Supervised Semantic
  Segmentation", CVPR 2021;
- ``lpg``: Xie et al., "Learning Class-Agnostic Pseudo Mask Generation for Box-Supervised Semantic Segmentation"
  (IEEE Transactions on Multimedia);
- ``compare``: all five on one benchmark, beside the box-as-mask baseline and full supervision: every row is one run
  of a trainer above with the same data, network, final-network budget and seeds, read into one table and two
  figures (see :mod:`boxloss.trainers.compare` and ``docs/compare.md``);
- ``pretrain``: the stand-in for ImageNet features every quick preset starts from (see
  :mod:`boxloss.trainers.engine.pretrain`).

The engine (:mod:`boxloss.trainers.engine`) owns the loop, checkpoints, distributed training, logging, evaluation,
figures and results; a trainer module holds its paper's algorithm: a ``Config`` dataclass of the paper's
hyper-parameters, ``SETTINGS`` (the rows of its ablation) and ``run(ctx, settings) -> Results``.
"""

from __future__ import annotations

import importlib

#: trainer name -> module
TRAINERS = {
    "box2tagback": "boxloss.trainers.box2tagback",
    "box2seg": "boxloss.trainers.box2seg",
    "uncertainty": "boxloss.trainers.uncertainty",
    "bana": "boxloss.trainers.bana",
    "lpg": "boxloss.trainers.lpg",
    "compare": "boxloss.trainers.compare",
}


def trainer_module(name: str):
    """The module of trainer ``name``."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; the trainers are: {', '.join(TRAINERS)}")
    return importlib.import_module(TRAINERS[name])
