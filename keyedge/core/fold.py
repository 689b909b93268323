"""Fold a key (and the normalisation, and the 1/255 of uint8 input) into the patch embedding.

With ``z = normalize(shuffle(x))`` and a patch embedding ``y = W p(z) + b`` whose
patch ``p`` is flattened in (C, P, P) order, let ``Q`` be the permutation the key
induces on a patch (``p(shuffle(x)) = p(x)[Q]``, needs M | P) and ``c(i)`` the
channel of patch position ``i``. Then

    y = sum_i W[:, i] (x[Q[i]] - mean[c(i)]) / std[c(i)] + b
      = W' p(x) + b',   W' = (W / std[c])[:, argsort(Q)],   b' = b - (W / std[c]) @ mean[c]

and for uint8 input additionally ``W' /= 255``. The result is a plain timm ViT that
takes plain images and costs nothing extra at run time -- and now *contains* the
key, so it is as secret as the key file.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .errors import KeyedgeError
from .keys import can_fold
from .manifests import InputKind
from .models import KeyedClassifier
from .shuffle import patch_permutation


class Uint8Input(nn.Module):
    """Casts uint8 images (0..255) to float for a model whose weights absorbed the 1/255."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.model.patch_embed.proj.weight.dtype))


def fold_key(keyed: KeyedClassifier, input: InputKind = "float") -> nn.Module:
    """A copy of ``keyed.model`` that takes plain images: ``fold_key(k)(x) == k(x)``.

    ``input="float"``: x in [0, 1]; ``input="uint8"``: x in 0..255 (uint8 tensors).
    Raises when the key's block size does not divide the patch size; such keys
    stay a gather (``keyedge export --mode gather``).
    """
    if input not in ("float", "uint8"):
        raise KeyedgeError(f"input must be 'float' or 'uint8', not {input!r}")
    model = keyed.model
    if hasattr(model, "merge_and_unload"):
        raise KeyedgeError("merge LoRA first (keyedge.merge_lora) before folding the key")
    pe = model.patch_embed
    proj = pe.proj
    ph, pw = proj.kernel_size
    if (ph != pw or tuple(proj.stride) != (ph, pw) or tuple(proj.padding) != (0, 0)
            or getattr(pe, "dynamic_img_pad", False)):
        raise KeyedgeError("the patch embedding is not a plain non-overlapping P x P convolution; cannot fold")
    if not can_fold(keyed.block_size, ph):
        raise KeyedgeError(
            f"block size {keyed.block_size} does not divide patch size {ph}: the key cannot be folded "
            f"into the patch embedding; keep it as a gather (--mode gather)")

    channels = proj.in_channels
    weight = proj.weight.detach().to(torch.float64).reshape(proj.out_channels, -1)
    bias = (proj.bias.detach().to(torch.float64) if proj.bias is not None
            else torch.zeros(proj.out_channels, dtype=torch.float64, device=weight.device))
    chan = torch.arange(channels * ph * pw, device=weight.device) // (ph * pw)
    mean = keyed.mean.flatten().to(torch.float64)[chan]
    std = keyed.std.flatten().to(torch.float64)[chan]
    scaled = weight / std
    new_bias = bias - scaled @ mean
    if keyed.key is not None:
        inverse = torch.as_tensor(np.argsort(patch_permutation(keyed.key, ph)), device=weight.device)
        scaled = scaled[:, inverse]
    if input == "uint8":
        scaled = scaled / 255.0

    folded = copy.deepcopy(model)
    fproj = folded.patch_embed.proj
    with torch.no_grad():
        fproj.weight.copy_(scaled.reshape_as(fproj.weight).to(fproj.weight.dtype))
        if fproj.bias is None:
            fproj.bias = nn.Parameter(new_bias.to(fproj.weight.dtype))
        else:
            fproj.bias.copy_(new_bias.to(fproj.bias.dtype))
    folded.eval()
    return Uint8Input(folded) if input == "uint8" else folded
