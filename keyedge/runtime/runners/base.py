"""The runner interface, after Polygraphy's runners: activate, infer, deactivate.

``with runner: logits = runner(images)``. ``activate`` acquires everything (sessions,
engines, device memory, streams); ``deactivate`` frees all of it; ``infer`` on an
inactive runner is refused. ``images`` are plain images exactly as the artifact's
input spec describes; logits come back as float32 numpy arrays. Parity, bench and
verification use only this interface and never special-case a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ...core.errors import KeyedgeError
from ...core.keys import Key
from ...core.manifests import ArtifactInput, ArtifactManifest, ExecPrecision, RunManifest, check_key, needs_key
from ..bundle import Bundle, BundleError, SealedLoader
from ..kernel import reference_preprocess


class Runner(ABC):
    """A backend behind one lifecycle; subclasses implement ``_activate``, ``_deactivate``, ``infer``."""

    name: str = "runner"
    manifest: ArtifactManifest | RunManifest
    input_spec: ArtifactInput  # what __call__ takes

    def __init__(self, sealed: SealedLoader | None = None) -> None:
        self._active = False
        self.sealed = sealed  # a sealed artifact: opened in memory at each activation
        self.key: Key | None = None

    def _check_key(self, key: Key | None, where: str) -> None:
        """The key rule at construction; a sealed artifact brings its own key, checked at activation."""
        if self.sealed is None or not needs_key(self.manifest):
            self.key = checked_key(self.manifest, key, where)

    def _open(self, where: str) -> Bundle:
        """Decrypt the sealed artifact for this activation (the caller wipes it once the model is loaded);
        the key of a gather / kernel bundle comes with it, and goes again at deactivation."""
        assert self.sealed is not None
        bundle = self.sealed()
        if needs_key(self.manifest):
            try:
                key = bundle.key()
                if key is None:
                    raise BundleError(f"{where}: the bundle holds no key but its artifact takes one at run time "
                                      "(seal it again with --key)")
                self.key = checked_key(self.manifest, key, where)
            except BaseException:
                bundle.wipe()
                raise
        return bundle

    @property
    def is_active(self) -> bool:
        return self._active

    @property
    def precision(self) -> ExecPrecision:
        """What the runner executes in: the artifact's precision, unless the backend is told otherwise."""
        return self.manifest.precision if isinstance(self.manifest, ArtifactManifest) else "fp32"

    @property
    def fold_mode(self) -> str:
        """fused / gather / kernel / plain for exported artifacts; ``reference`` for a PyTorch run."""
        return self.manifest.fold_mode if isinstance(self.manifest, ArtifactManifest) else "reference"

    def activate(self) -> None:
        """Load the model: sessions, engines, buffers, streams. Idempotent."""
        if self._active:
            return
        try:
            self._activate()
        except BaseException:
            self._release()  # free what a half-done activation acquired
            raise
        self._active = True

    def deactivate(self) -> None:
        """Free everything ``activate`` acquired. Idempotent."""
        if self._active:
            self._active = False
            self._release()

    def _release(self) -> None:
        self._deactivate()
        if self.sealed is not None and needs_key(self.manifest):
            if self.key is not None:
                self.key.wipe()
            self.key = None  # a sealed key lives only while the model is loaded

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32, (N, classes)) for one batch the backend accepts as is."""

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits for any number of images; a fixed-batch artifact gets them in padded chunks."""
        if not self._active:
            raise KeyedgeError(f"{self.name} runner is not active: use it as `with runner:` or call activate()")
        spec = self.input_spec
        images = np.asarray(images)
        if images.dtype != np.dtype(spec.dtype):
            raise KeyedgeError(f"{self.name} takes {spec.dtype} images, got {images.dtype}")
        if images.shape[1:] != spec.shape(1)[1:]:
            raise KeyedgeError(f"{self.name} takes images of shape {spec.shape(1)[1:]}, got {images.shape[1:]}")
        batch = spec.fixed_batch
        if batch is not None and images.shape[0] != batch:
            return np.concatenate([self.infer(chunk) for chunk in _fixed_batches(images, batch)])[:len(images)]
        return self.infer(images)


def checked_key(manifest: ArtifactManifest | RunManifest, key: Key | None, where: str) -> Key | None:
    """The key the artifact takes at run time (None when it takes none), after the key rule."""
    check_key(manifest, key, where)
    return key if needs_key(manifest) else None


def key_feed(manifest: ArtifactManifest, key: Key | None) -> dict[str, np.ndarray]:
    """A gather artifact's key input (the permutation, a copy of the runner's own to wipe at deactivation)."""
    if manifest.key_input is None:
        return {}
    assert key is not None  # checked_key
    return {manifest.key_input: np.array(key.perm, dtype=np.int64)}


def wipe_feed(feed: dict[str, np.ndarray]) -> None:
    for array in feed.values():
        array.fill(0)
    feed.clear()


def graph_feed(images: np.ndarray, manifest: ArtifactManifest, key: Key | None) -> np.ndarray:
    """What the graph's first input takes: the images, or for ``--mode kernel`` their keyed
    preprocessing (the CPU twin of the CUDA kernel, bit-exact with it)."""
    if manifest.preprocess is None:
        return np.ascontiguousarray(images)
    return reference_preprocess(images, key, manifest.preprocess.mean, manifest.preprocess.std)


def _fixed_batches(images: np.ndarray, batch: int):
    """Split into chunks of exactly ``batch`` (the last one padded by repetition)."""
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        yield chunk

