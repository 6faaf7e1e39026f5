"""``terrasynth serve``: a local map app to generate from GeoTIFFs and look at the samples.

Modules: :mod:`~terrasynth.serve.app` (the web application), :mod:`~terrasynth.serve.inputs`
(uploads and folder picks, checked), :mod:`~terrasynth.serve.jobs` and
:mod:`~terrasynth.serve.worker` (generation in a background process, state on disk),
:mod:`~terrasynth.serve.tiles` (map tiles and values at a point, by rio-tiler). Needs the
``serve`` extra: ``pip install 'terrasynth[serve]'``.
"""
