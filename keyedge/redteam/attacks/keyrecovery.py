"""Key recovery: what an attacker who copies a device's files (and may query it) learns of the key.

Four methods, one per kind of file keyedge emits:

* **Column matching** (:func:`match_columns`): the patch-embedding columns of a model against the
  public base's, by cosine similarity summed over the sub-blocks of a patch, solved as a linear
  assignment (``scipy.optimize.linear_sum_assignment``). Scale-invariant per column, so the fold's
  1/std and 1/255 factors do not hide anything.
* **Fused files** (:func:`recover_from_fused`): a fused model's patch embedding is the keyed model's
  with its columns permuted by the key (``W' = W[:, argsort(Q)]``); fine-tuning keeps ``W`` close to
  the public base's, so matching ``W'`` to the base reads the key off the file.
* **Permutation constants** (:func:`permutation_constants`): a gather graph with ``--embed-key``
  holds the permutation as an integer constant.

OpenVINO IR files are read the same two ways (:func:`ir_patch_embedding`, :func:`ir_permutation_constants`).
* **Logit probes** (:func:`probe_key`): with the un-fused keyed weights and ``C*M*M`` queries of the
  deployed model, one probe per value of a block (that value set in every block, the rest grey),
  each answer is matched to the leaked weights' answer for every position: the key, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...core.errors import KeyedgeError
from ...core.keys import Key


def _block_positions(channels: int, patch: int, block: int) -> np.ndarray:
    """pos[b, a]: flat (C, P, P) index of value ``a`` of sub-block ``b`` of a patch."""
    idx = np.arange(channels * patch * patch).reshape(channels, patch // block, block, patch // block, block)
    return idx.transpose(1, 3, 0, 2, 4).reshape((patch // block) ** 2, channels * block * block)


def match_columns(weight: np.ndarray | torch.Tensor, base_weight: np.ndarray | torch.Tensor,
                  block_size: int) -> np.ndarray:
    """``e[a] = b``: value ``a`` of a block of ``weight``'s patch matches value ``b`` of the base's.

    Both are patch-embedding weights shaped (D, C, P, P) of one architecture.
    """
    from scipy.optimize import linear_sum_assignment

    w = np.asarray(weight.detach().cpu() if isinstance(weight, torch.Tensor) else weight, dtype=np.float64)
    b = np.asarray(base_weight.detach().cpu() if isinstance(base_weight, torch.Tensor) else base_weight,
                   dtype=np.float64)
    if w.shape != b.shape or w.ndim != 4:
        raise KeyedgeError(f"the patch embeddings differ in shape ({tuple(w.shape)} vs the base's {tuple(b.shape)}): "
                           "the artifact was not made from this base")
    d, c, p, _ = w.shape
    if p % block_size:
        raise KeyedgeError(f"block size {block_size} does not divide patch size {p}: no per-patch audit")
    pos = _block_positions(c, p, block_size)

    def unit_columns(m: np.ndarray) -> np.ndarray:
        cols = m.reshape(d, -1)[:, pos]  # (D, blocks, CMM)
        cols = cols - cols.mean(axis=0, keepdims=True)
        return cols / np.maximum(np.linalg.norm(cols, axis=0, keepdims=True), 1e-12)

    sim = np.einsum("dba,dbc->ac", unit_columns(w), unit_columns(b))
    rows, cols = linear_sum_assignment(-sim)
    estimate = np.empty(len(rows), dtype=np.int64)
    estimate[rows] = cols
    return estimate


def recover_from_fused(fused_weight, base_weight, block_size: int) -> np.ndarray:
    """The key a fused patch embedding holds: its columns are ``argsort(perm)`` of the keyed model's."""
    return np.argsort(match_columns(fused_weight, base_weight, block_size)).astype(np.int64)


# ---- reading ONNX files as an attacker would ---------------------------------------------------

def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold tensors too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t)
    return arrays


def _resolve(name: str, producers: dict, arrays: dict[str, np.ndarray], depth: int = 0) -> np.ndarray | None:
    """The numeric value of ``name``, through Cast / Identity / DequantizeLinear nodes."""
    if name in arrays:
        return arrays[name].astype(np.float64) if arrays[name].dtype.kind == "f" else arrays[name]
    node = producers.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type in ("Cast", "Identity"):
        value = _resolve(node.input[0], producers, arrays, depth + 1)
        return None if value is None else value.astype(np.float64)
    if node.op_type == "DequantizeLinear":  # int8 weights: (q - zero_point) * scale, per tensor or channel
        q = _resolve(node.input[0], producers, arrays, depth + 1)
        scale = _resolve(node.input[1], producers, arrays, depth + 1)
        zp = _resolve(node.input[2], producers, arrays, depth + 1) if len(node.input) > 2 and node.input[2] else 0
        if q is None or scale is None:
            return None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale, zp = np.asarray(scale, dtype=np.float64), np.asarray(zp, dtype=np.float64)
        if scale.ndim == 1:  # per channel, along ``axis``
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim == 1 else zp
        return (q.astype(np.float64) - zp) * scale
    return None


def onnx_patch_embedding(path: Path) -> np.ndarray:
    """The first convolution's weight (D, C, P, P) of an ONNX file: a ViT's patch embedding."""
    import onnx

    model = onnx.load(str(path))
    arrays = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            weight = _resolve(node.input[1] if node.op_type != "QLinearConv" else node.input[3], producers, arrays)
            if weight is not None and weight.ndim == 4:
                return weight.astype(np.float64)
    raise KeyedgeError(f"{path}: no patch-embedding convolution found in the graph")


def onnx_member_patch_embeddings(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A gathered ensemble's stacked patch embeddings, (N, D, C, P, P) for a base patch embedding of ``shape``
    (D, C, P, P): the graph's one 3-D initializer of shape (N, D, C*P*P) (or its transpose)."""
    import onnx

    d, flat = shape[0], int(np.prod(shape[1:]))
    for value in _initializers(onnx.load(str(path))).values():
        value = np.asarray(value)
        if value.ndim == 3 and value.shape[0] >= 2 and value.dtype.kind == "f":
            if value.shape[1:] == (d, flat):
                return value.reshape(len(value), *shape).astype(np.float64)
            if value.shape[1:] == (flat, d):
                return value.transpose(0, 2, 1).reshape(len(value), *shape).astype(np.float64)
    raise KeyedgeError(f"{path}: no stacked member patch embeddings found in the graph")


def permutation_constants(path: Path, n: int) -> list[np.ndarray]:
    """Every integer constant in an ONNX file that is a non-identity permutation of ``0..n-1``."""
    import onnx

    found = []
    for value in _initializers(onnx.load(str(path))).values():
        flat = np.asarray(value).ravel()
        if flat.dtype.kind in "iu" and flat.size == n and np.array_equal(np.sort(flat), np.arange(n)) \
                and not np.array_equal(flat, np.arange(n)):
            found.append(flat.astype(np.int64))
    return found


def _ir_model(path: Path):
    try:
        import openvino
    except ImportError:
        raise KeyedgeError(f"{path} is an OpenVINO IR: reading it needs OpenVINO (pip install 'keyedge[openvino]')") \
            from None
    core = openvino.Core()
    return openvino, core, core.read_model(str(path))


def ir_patch_embedding(path: Path) -> np.ndarray:
    """The first convolution's weight (D, C, P, P) of an OpenVINO IR, as the graph computes it (an int8 IR's
    dequantizing Convert / Subtract / Multiply chain evaluated): a ViT's patch embedding."""
    openvino, core, model = _ir_model(path)
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            weights = openvino.Model([op.input_value(1)], [], "patch_embedding_weights")
            (value,) = core.compile_model(weights, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({}).values()
            if value.ndim == 4:
                return np.asarray(value, dtype=np.float64)
    raise KeyedgeError(f"{path}: no patch-embedding convolution found in the graph")


def ir_permutation_constants(path: Path, n: int) -> list[np.ndarray]:
    """Every integer constant of an OpenVINO IR that is a non-identity permutation of ``0..n-1``."""
    _, _, model = _ir_model(path)
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            flat = np.asarray(op.get_data()).ravel()
            if flat.dtype.kind in "iu" and flat.size == n and np.array_equal(np.sort(flat), np.arange(n)) \
                    and not np.array_equal(flat, np.arange(n)):
                found.append(flat.astype(np.int64))
    return found


# ---- leaked un-fused weights + queries -----------------------------------------------------------

def probe_images(size: tuple[int, int], channels: int, block_size: int, value: float = 1.0,
                 background: float = 0.5) -> torch.Tensor:
    """``C*M*M`` images: image ``s`` has value ``s`` of every block set to ``value``, the rest grey."""
    n = channels * block_size * block_size
    h, w = size
    x = torch.full((n, channels, h, w), background)
    blocks = x.reshape(n, channels, h // block_size, block_size, w // block_size, block_size)
    for s in range(n):
        c, r, q = s // (block_size * block_size), (s // block_size) % block_size, s % block_size
        blocks[s, c, :, r, :, q] = value
    return blocks.reshape(n, channels, h, w)


@torch.no_grad()
def probe_key(query: Callable[[torch.Tensor], np.ndarray], on_shuffled: Callable[[torch.Tensor], torch.Tensor],
              size: tuple[int, int], channels: int, block_size: int) -> np.ndarray:
    """The key, from ``C*M*M`` queries of the device and the leaked un-fused weights.

    ``query(images)`` returns the deployed model's logits for plain images (the device applies the
    key); ``on_shuffled(z)`` runs the leaked weights on already-shuffled images. The device's answer
    to probe ``s`` equals the leaked weights' answer to the probe placed at position ``inv[s]``.
    """
    from scipy.optimize import linear_sum_assignment

    probes = probe_images(size, channels, block_size)
    device = torch.as_tensor(query(probes), dtype=torch.float64)       # (n, classes): one query each
    local = on_shuffled(probes).to(torch.float64)                        # (n, classes): position i set
    cost = torch.cdist(device, local).numpy()                            # cost[s, i]
    sources, positions = linear_sum_assignment(cost)
    perm = np.empty(len(sources), dtype=np.int64)
    perm[positions] = sources                                            # perm[i] = s
    return perm


@dataclass
class RecoveryResult:
    """Column matching of un-fused weights against the base, scored with the true key."""
    estimate: np.ndarray
    fraction: float
    chance: float

    def as_dict(self) -> dict:
        return {"fraction_recovered": self.fraction, "chance_level": self.chance}


def audit_key(keyed_weight: torch.Tensor, base_weight: torch.Tensor, key: Key) -> RecoveryResult:
    estimate = match_columns(keyed_weight, base_weight, key.block_size)
    return RecoveryResult(estimate, float(np.mean(estimate == key.perm)), 1.0 / key.size)
