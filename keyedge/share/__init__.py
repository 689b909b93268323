"""Data shipped inside the wheel: ``keyedge.share.kernels`` is the repository's ``kernels/`` and
``keyedge.share.export`` its ``export/`` (setuptools ``package-dir`` mapping); look them up with
:mod:`keyedge.core.resources`."""
