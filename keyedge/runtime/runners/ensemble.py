"""Randomized answers: a random ensemble served, and query noise (RND), behind the one runner interface.

* :class:`EnsembleRunner`: each query (image) is answered by ``draw`` of the ensemble's ``N`` members drawn
  afresh from the OS CSPRNG, run as rows of one batch (a gathered graph) or on each member's own model
  (separate files); the answer is the mean of their softmax probabilities, returned as its logarithm (logits
  whose softmax is that mean), so everything that reads logits reads the ensemble's answer. The members' own
  outputs never leave the runner.
* :class:`QueryNoise`: Gaussian noise of standard deviation ``sigma`` (in the [0, 1] image scale), drawn from
  the OS CSPRNG, added to each query before any runner sees it, clipped to the input range (Qin et al.'s RND).

Neither is deterministic by design: they are measured with attacks that average over their randomness
(``keyedge.redteam``), never by a single draw.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...core.ensemble import check_draw, draw_members
from ...core.errors import KeyedgeError
from ...core.manifests import MANIFEST, ONNX_FILE, ArtifactManifest, read_onnx_manifest
from ..bundle import SealedLoader
from .base import Runner
from .onnxruntime import OnnxRunner


def csprng_normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 values from the OS CSPRNG (Box-Muller over 53-bit uniforms)."""
    n = int(np.prod(shape))
    half = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * half), dtype="<u8").reshape(2, half)
    u1 = ((bits[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0 ** 53  # (0, 1]: log is finite
    u2 = (bits[1] >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    radius = np.sqrt(-2.0 * np.log(u1))
    values = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return values.astype(np.float32).reshape(shape)


def draw_rows(queries: int, members: int, draw: int) -> np.ndarray:
    """(queries, draw) distinct member indices per query, each row a fresh CSPRNG draw."""
    check_draw(members, draw)
    return np.array([draw_members(members, draw) for _ in range(queries)], dtype=np.int64).reshape(queries, draw)


def _log_mean_softmax(logits: np.ndarray) -> np.ndarray:
    """log(mean over axis 0 of softmax(logits)) for (S, B, K) logits, computed stably."""
    shifted = logits - logits.max(axis=2, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=2, keepdims=True))
    top = log_p.max(axis=0)
    return (top + np.log(np.exp(log_p - top).mean(axis=0))).astype(np.float32)


def ensemble_manifest(path: str | Path) -> tuple[Path, ArtifactManifest]:
    """An ensemble artifact's directory and manifest (a directory, or a gathered graph's model.onnx)."""
    path = Path(path)
    if path.is_dir():
        if (path / ONNX_FILE).is_file():
            manifest = read_onnx_manifest(path / ONNX_FILE)
        else:
            manifest = ArtifactManifest.read(path / MANIFEST)
        root = path
    else:
        manifest, root = read_onnx_manifest(path), path.parent
    if manifest.ensemble is None:
        raise KeyedgeError(f"{path} is not an ensemble artifact (export a random ensemble's run)")
    return root, manifest


class EnsembleRunner(Runner):
    """An exported random ensemble; ``draw`` members answer each query (``answer`` takes a given draw)."""

    manifest: ArtifactManifest

    def __init__(self, path: str | Path, *, draw: int = 1, device: str = "cpu", threads: int | None = None,
                 manifest: ArtifactManifest | None = None, sealed: SealedLoader | None = None) -> None:
        super().__init__()
        if sealed is not None:  # a sealed gathered graph, with the manifest it was resolved with
            assert manifest is not None and manifest.ensemble is not None
            if manifest.ensemble.form != "gathered":
                raise KeyedgeError(f"{path}: a sealed ensemble is one gathered graph")
            self.root, self.manifest = Path(path).parent, manifest
        else:
            self.root, self.manifest = ensemble_manifest(path)
        spec = self.manifest.ensemble
        assert spec is not None
        self.members = len(spec.member_fingerprints)
        check_draw(self.members, draw)  # refused here, before anything is loaded
        self.draw = draw
        self.input_spec = self.manifest.input
        self.name = f"ensemble-{self.members}x{draw}-onnxruntime-{device}"
        if spec.form == "gathered":
            self.inner = [OnnxRunner(Path(path) if sealed else self.root / ONNX_FILE, device=device, threads=threads,
                                     manifest=self.manifest, sealed=sealed)]
        else:
            self.inner = [OnnxRunner(self.root / f, device=device, threads=threads) for f in spec.files]
            prints = [r.manifest.key_fingerprint for r in self.inner]
            if prints != list(spec.member_fingerprints):
                raise KeyedgeError(f"{self.root}: its member files do not hold the members its manifest names")

    def _activate(self) -> None:
        for runner in self.inner:
            runner.activate()

    def _deactivate(self) -> None:
        for runner in self.inner:
            runner.deactivate()

    def member_logits(self, images: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Row ``j`` through member ``members[j]`` (kept inside: the public answer is :meth:`answer`'s)."""
        if len(self.inner) == 1:
            runner = self.inner[0]
            spec = self.manifest.ensemble
            assert spec is not None and spec.member_input is not None and runner.session is not None
            feed = {self.manifest.input.name: np.ascontiguousarray(images), spec.member_input: members}
            return runner.session.run([self.manifest.output.name], feed)[0].astype(np.float32)
        out = np.empty((len(images), self.manifest.output.num_classes), dtype=np.float32)
        for m in np.unique(members):
            rows = members == m
            out[rows] = self.inner[int(m)](images[rows])
        return out

    def answer(self, images: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """The ensemble's answer (log mean probability) to each image from its row of ``draws`` (B, S)."""
        b, s = draws.shape
        if b != len(images):
            raise KeyedgeError(f"one draw per image: {len(images)} images, {b} draws")
        if draws.min(initial=0) < 0 or draws.max(initial=0) >= self.members:
            raise KeyedgeError(f"member indices are 0 to {self.members - 1}")
        rows = np.concatenate([images] * s)  # draw k of every image, then draw k + 1
        logits = self.member_logits(rows, np.ascontiguousarray(draws.T.reshape(-1)))
        return _log_mean_softmax(logits.reshape(s, b, -1))

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.answer(images, draw_rows(len(images), self.members, self.draw))


class QueryNoise(Runner):
    """RND: every query gets fresh Gaussian noise (``sigma``, in the [0, 1] image scale) before ``inner`` runs it."""

    def __init__(self, inner: Runner, sigma: float) -> None:
        super().__init__()
        if not 0 < sigma <= 1:
            raise KeyedgeError(f"--query-noise is a standard deviation in (0, 1], not {sigma}")
        if inner.input_spec.dtype != "float32":
            raise KeyedgeError("--query-noise needs an artifact of float input (export --input float)")
        self.inner, self.sigma = inner, sigma
        self.manifest, self.input_spec = inner.manifest, inner.input_spec
        self.name = f"{inner.name}+rnd{sigma:g}"

    def _activate(self) -> None:
        self.inner.activate()

    def _deactivate(self) -> None:
        self.inner.deactivate()

    def infer(self, images: np.ndarray) -> np.ndarray:
        low, high = self.input_spec.range
        noisy = np.clip(images + self.sigma * csprng_normal(images.shape), low, high).astype(np.float32)
        return self.inner(noisy)


class MemberView(Runner):
    """Member ``member`` of an active ensemble runner alone, under that member's key fingerprint: how parity
    holds every member to its own PyTorch reference. Never served: a deployed query is answered by a draw."""

    def __init__(self, ensemble: EnsembleRunner, member: int) -> None:
        super().__init__()
        spec = ensemble.manifest.ensemble
        assert spec is not None
        if not 0 <= member < ensemble.members:
            raise KeyedgeError(f"member indices are 0 to {ensemble.members - 1}")
        self.ensemble, self.member = ensemble, member
        self.manifest = replace(ensemble.manifest, key_fingerprint=spec.member_fingerprints[member], ensemble=None)
        self.input_spec = ensemble.input_spec
        self.name = f"{ensemble.name}[member {member}]"

    def _activate(self) -> None:
        if not self.ensemble.is_active:
            raise KeyedgeError("a member is run through its active ensemble runner")

    def _deactivate(self) -> None:
        pass

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.ensemble.member_logits(images, np.full(len(images), self.member, dtype=np.int64))
