"""Data shipped inside the wheel: ``keyedge.share.kernels`` is the repository's ``kernels/`` and
``keyedge.share.export`` its ``export/`` (setuptools ``package-dir`` mapping); look them up with
:mod:`keyedge.core.resources`.

In a wheel the two folders lie here. In an editable install setuptools' finder maps them to the
repository's top level; a source checkout used without installing (``PYTHONPATH=.``) finds them there
through the fallback below, which is searched only after this package's own folder.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
if (_CHECKOUT / "kernels" / "preprocess.cu").is_file() and (_CHECKOUT / "export" / "targets").is_dir():
    __path__.append(str(_CHECKOUT))  # noqa: F821 - a package's search path
