"""What ships inside the wheel beside the Python code, looked up per area.

Two areas live at the repository's top level and are packaged as data packages (setuptools
``package-dir`` mapping, see ``pyproject.toml``), so an installed wheel and an editable
install find them the same way, through :mod:`importlib.resources`:

* ``kernels`` (``kernels/``, package ``keyedge.share.kernels``): the CUDA preprocessing kernel,
  its C API header, the host twin and the CMake project. It has no ``__init__.py``: a namespace package, so
  that ``kernels/`` on ``sys.path`` (``python -m`` in the repository's root) never shadows an installed
  package of that name (transformers imports one);
* ``export`` (``export/``, package ``keyedge.share.export``): what ships to a device --
  ``cpp/`` (the C++ runtime sources, CMake templates and example) and ``targets/*.toml``
  (the TensorRT target profiles).
"""

from __future__ import annotations

import contextlib
import importlib
import tempfile
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

AREAS = {"kernels": "keyedge.share.kernels", "export": "keyedge.share.export"}
_SKIP = ("__init__.py", "__pycache__")  # what makes a data folder a package, not part of its data


def resource(area: str, *parts: str) -> Traversable:
    """A packaged file or folder of an area, e.g. ``resource("export", "targets", "desktop.toml")``."""
    node = resources.files(AREAS[area])
    for part in parts:
        node = node / part
    return node


def copy_tree(src: Traversable, dest: Path) -> None:
    """Copy a packaged folder (or file) to ``dest`` on disk, whatever holds the package."""
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if child.name not in _SKIP:
                copy_tree(child, dest / child.name)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())


@contextlib.contextmanager
def as_path(area: str, *parts: str) -> Iterator[Path]:
    """A real filesystem path for a packaged folder (CMake needs one), for the ``with`` block: where it lies on
    disk (``kernels`` is a namespace package, whose folder Python 3.11's ``as_file`` does not take), else a
    temporary copy (a zipped install)."""
    roots = (Path(p).joinpath(*parts) for p in importlib.import_module(AREAS[area]).__path__)
    on_disk = next((r for r in roots if r.exists()), None)
    if on_disk is not None:
        yield on_disk
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy_tree(resource(area, *parts), Path(tmp) / "copy")
        yield Path(tmp) / "copy"
