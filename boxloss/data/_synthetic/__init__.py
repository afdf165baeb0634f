"""The generator of the synthetic benchmark, one module per job; :mod:`boxloss.data.synthetic` is its public face.

- :mod:`~boxloss.data._synthetic.config`: :class:`SyntheticConfig`, the parameters (and cache key) of a benchmark;
- :mod:`~boxloss.data._synthetic.classes`: a fixed recipe per object class and its shape family, calibrated to a
  target fill rate;
- :mod:`~boxloss.data._synthetic.appearance`: colours, textures and the painting of a region;
- :mod:`~boxloss.data._synthetic.layout`: where the objects go, their depth order and what stays visible;
- :mod:`~boxloss.data._synthetic.render`: one image from a layout (background, distractors, objects, camera);
- :mod:`~boxloss.data._synthetic.cache`: generated splits on disk, written atomically and memory-mapped back.
"""
