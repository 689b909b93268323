"""Data that ships inside the wheel: target profiles, C++ templates, CUDA kernel sources.

Found with :mod:`importlib.resources`, so an installed wheel (not only a source
checkout) has them:

* ``targets/*.toml`` -- TensorRT target profiles (:mod:`keyedge.targets`);
* ``cpp/`` -- the C++ package templates (:mod:`keyedge.bindings`);
* ``kernels/`` -- the CUDA preprocessing kernel, its C header and CMake project
  (:mod:`keyedge.kernels`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path


def resource(*parts: str) -> Traversable:
    """A packaged file or folder, e.g. ``resource("targets", "desktop.toml")``."""
    node = resources.files(__name__)
    for part in parts:
        node = node / part
    return node


def copy_tree(src: Traversable, dest: Path) -> None:
    """Copy a packaged folder (or file) to ``dest`` on disk, whatever holds the package."""
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for child in src.iterdir():
            if child.name != "__pycache__":
                copy_tree(child, dest / child.name)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())


@contextlib.contextmanager
def as_path(*parts: str) -> Iterator[Path]:
    """A real filesystem path for a packaged folder (CMake needs one), for the ``with`` block."""
    with resources.as_file(resource(*parts)) as path:
        yield Path(path)
