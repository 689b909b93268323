"""A random ensemble of LoRA members as one graph: the shared base once; per member its folded patch
embedding, its LoRA deltas and its head, chosen per image by a member-index input.

A batch of ``B`` images with member indices ``m`` (``B`` int64) runs as one batch: each LoRA layer computes
the base's ``x W^T + b`` for every row and adds row ``j``'s own ``(x A[m_j]^T) B[m_j]^T * scaling`` (a
batched gather of the members' rank-``r`` matrices, as multi-LoRA servers do for language models); the patch
embedding and the head gather their member's full weights the same way. ``S`` members answering one query are
``S`` rows of one batch. Member ``i``'s rows compute exactly member ``i``'s merged, folded model.

Only LoRA members fit this form: what the members share must be the same tensors. Fully fine-tuned
members share nothing, so they are exported as ``N`` separate merged models (``form="separate"``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import KeyedgeError
from ..core.fold import fold_key
from ..core.lora import merge_lora
from ..core.manifests import ArtifactManifest, EnsembleForm, EnsembleSpec, RunManifest
from ..core.models import KeyedClassifier
from .config import ExportOptions
from .onnx_export import INPUT_NAME, OUTPUT_NAME, _attach_manifest, build_manifest

MEMBERS_NAME = "members"


class _Selection:
    """The member index of each row of the batch in flight, set by the graph's forward for its layers."""

    member: torch.Tensor


class MemberLoraLinear(nn.Module):
    """A base linear layer shared by all members plus each row's member's LoRA delta."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float, sel: _Selection) -> None:
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lora_a = nn.Parameter(a, requires_grad=False)  # (N, r, in)
        self.lora_b = nn.Parameter(b, requires_grad=False)  # (N, out, r)
        self.scaling, self.sel = scaling, sel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        m = self.sel.member
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(rows, self.lora_a[m].transpose(1, 2)), self.lora_b[m].transpose(1, 2))
        return y + (delta * self.scaling).reshape(y.shape)


class MemberLinear(nn.Module):
    """Each row through its member's own dense weights (the head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sel: _Selection) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, out, in)
        self.bias = nn.Parameter(bias, requires_grad=False)  # (N, out)
        self.sel = sel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.sel.member
        return torch.bmm(x.unsqueeze(1), self.weight[m].transpose(1, 2)).squeeze(1) + self.bias[m]


class MemberPatchProjection(nn.Module):
    """The patch embedding's P x P stride-P convolution with each row's member's folded weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, patch: int, sel: _Selection) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.flatten(2), requires_grad=False)  # (N, D, C*P*P)
        self.bias = nn.Parameter(bias, requires_grad=False)  # (N, D)
        self.patch, self.sel = patch, sel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        m = self.sel.member
        y = torch.bmm(patches, self.weight[m].transpose(1, 2)) + self.bias[m].unsqueeze(1)
        return y.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)


class GatheredEnsemble(nn.Module):
    """``forward(images, members)``: image ``j`` (plain, [0, 1], NCHW) through member ``members[j]``'s keyed model."""

    def __init__(self, net: nn.Module, sel: _Selection, members: int) -> None:
        super().__init__()
        self.net, self.sel, self.members = net, sel, members

    def forward(self, images: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        self.sel.member = members
        return self.net(images)


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import Linear as LoraLinear

    return {name: mod for name, mod in peft_model.get_base_model().named_modules() if isinstance(mod, LoraLinear)}


def _shared_state(peft_model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors every member must share: all but the LoRA matrices and the trained (saved) modules."""
    return {k: v for k, v in peft_model.state_dict().items()
            if "lora_" not in k and "modules_to_save" not in k and not any(s in k for s in skip)}


def gathered_ensemble(members: list[KeyedClassifier]) -> GatheredEnsemble:
    """The one-graph form of LoRA members (un-merged, as :func:`keyedge.core.ensemble.load_members` with
    ``merge=False`` gives them) with their keys folded; refuses members that do not share one base."""
    if len(members) < 2:
        raise KeyedgeError("an ensemble has at least 2 members")
    models = [m.model for m in members]
    if not all(hasattr(m, "merge_and_unload") for m in models):
        raise KeyedgeError("only LoRA members share a base to gather from; export full fine-tunes as separate "
                           "models (--ensemble-form separate)")
    head = "head"
    layers = [_lora_layers(m) for m in models]
    if any(set(ls) != set(layers[0]) for ls in layers) or not layers[0]:
        raise KeyedgeError("the members adapt different layers: they were not trained with one recipe")
    shared = [_shared_state(m, ("patch_embed.proj", f"{head}.")) for m in models]
    for i, state in enumerate(shared[1:], 1):
        if state.keys() != shared[0].keys() or any(not torch.equal(state[k], shared[0][k]) for k in state):
            raise KeyedgeError(f"member {i} does not share member 0's base weights: the members were not all "
                               "fine-tuned from one base (export them --ensemble-form separate)")
    folded = [fold_key(merge_lora(m.copy())) for m in members]  # each member's own patch embedding and head
    sel = _Selection()
    net = copy.deepcopy(models[0]).unload()  # the base, without any member's LoRA
    for name, layer in layers[0].items():
        adapter = layer.active_adapters[0]
        a = torch.stack([ls[name].lora_A[adapter].weight.detach() for ls in layers])
        b = torch.stack([ls[name].lora_B[adapter].weight.detach() for ls in layers])
        scaling = {ls[name].scaling[adapter] for ls in layers}
        if len(scaling) != 1:
            raise KeyedgeError(f"the members' LoRA scaling differs at {name}: not one recipe")
        net.set_submodule(name, MemberLoraLinear(layer.base_layer, a, b, scaling.pop(), sel))
    patch = net.patch_embed.proj.kernel_size[0]
    net.patch_embed.proj = MemberPatchProjection(
        torch.stack([f.patch_embed.proj.weight.detach() for f in folded]),
        torch.stack([f.patch_embed.proj.bias.detach() for f in folded]), patch, sel)
    net.set_submodule(head, MemberLinear(torch.stack([f.get_submodule(head).weight.detach() for f in folded]),
                                         torch.stack([f.get_submodule(head).bias.detach() for f in folded]), sel))
    return GatheredEnsemble(net.eval(), sel, len(members)).eval()


def check_options(opts: ExportOptions, form: EnsembleForm) -> None:
    """An ensemble's keys are folded into its members; a gathered graph takes float NCHW images in fp32
    (refused before any work)."""
    if opts.mode not in (None, "fused") or (form == "gathered" and opts.embed_key):
        raise KeyedgeError("an ensemble's keys are folded into each member's patch embedding: --mode fused only")
    if form == "gathered" and (opts.input != "float" or opts.layout != "nchw" or opts.precision != "fp32"):
        raise KeyedgeError("a gathered ensemble graph takes float NCHW images in fp32 (--input float --layout nchw "
                           "--precision fp32); export --ensemble-form separate for other inputs and precisions")


def export_gathered(graph: GatheredEnsemble, reference: KeyedClassifier, out_dir: Path, opts: ExportOptions,
                    run: RunManifest, spec: EnsembleSpec, key_set_fingerprint: str, *,
                    source: str = "") -> ArtifactManifest:
    """``out_dir/model.onnx`` (inputs ``images`` and ``members``, of any batch) and its
    manifest; ``reference`` is member 0's merged model (the input spec, block size and classes)."""
    check_options(opts, "gathered")
    manifest = replace(build_manifest(reference, "fused", opts, run, source),
                       key_fingerprint=key_set_fingerprint, ensemble=spec)
    h, w = manifest.input.size
    example = (torch.zeros(2, manifest.input.channels, h, w), torch.zeros(2, dtype=torch.int64))
    rows = torch.export.Dim("batch", min=1, max=4096)
    dynamic = ({0: rows}, {0: rows})
    path = out_dir / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph.eval(), example, None, input_names=[INPUT_NAME, MEMBERS_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opts.opset, dynamo=True,
                                    dynamic_shapes=dynamic, external_data=False, verbose=False, optimize=True)
        program.save(str(path), external_data=False)
    _attach_manifest(path, manifest)
    manifest.write(out_dir / "manifest.json")
    return manifest
