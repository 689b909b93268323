"""``keyedge audit``: what a copy of a device's files gives an attacker, measured before release.

For each artifact keyedge emits, the attack that fits it (see :mod:`keyedge.redteam.attacks.keyrecovery`):

==========================  =================================================================
artifact                    attack
==========================  =================================================================
fused ONNX (fp32/fp16/int8) patch-embedding columns matched to the public base's (dequantized)
gather ``--embed-key``      the permutation constant in the graph
gather / kernel             none needed: the file holds no key (it is key.bin / perm.bin)
run directory (un-fused)    column matching; with ``--queries``, logit probes through a runner
TensorRT engine             not read here (proprietary format): its manifest says if it holds the key
==========================  =================================================================

With the true key (``--key``) the audit scores the result: the exact fraction of key entries,
the functional agreement (top-1 agreement on real images of the model behind the recovered key
with the model behind the true one), and the robust accuracy left after a white-box PGD crafted
with the recovered key and replayed on the artifact as deployed. The release gate is the leaked
fraction: exit code 3 when it exceeds ``--fail-above``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.data import run_images
from ..core.errors import KeyedgeError
from ..core.keys import Key
from ..core.keyset import KeySet
from ..core.lora import merge_lora
from ..core.manifests import ArtifactManifest, RunManifest, read_run
from ..core.models import KeyedClassifier, file_sha256, read_weights
from ..core.runs import build_model, load_run
from ..core.tables import markdown_table, pct
from ..runtime.artifacts import Artifact, open_artifact
from ..runtime.bundle import SIGNED, SUFFIX, Opener, open_bundle, read_header
from ..runtime.runners import TorchRunner, runner_for
from .attacks import keyrecovery
from .attacks.pgd import ce_loss, pgd
from .config import AuditConfig

EXIT_LEAK = 3  # documented: the release gate failed


class KeyLeak(KeyedgeError):
    """An artifact leaks more of the key than ``--fail-above`` allows: exit code 3."""

    exit_code = EXIT_LEAK


@dataclass
class Finding:
    """What the audit found in one artifact."""
    artifact: str
    kind: str
    holds_key: bool | None         # None: could not be determined from the file
    method: str
    note: str
    recovered: np.ndarray | None = field(default=None, repr=False)
    fraction: float | None = None  # exact key entries (needs --key)
    chance: float | None = None
    agreement: float | None = None  # top-1 agreement, recovered vs true key (needs --key + the run)
    clean: float | None = None      # the artifact's clean accuracy on the audit images
    whitebox_robust: float | None = None  # after PGD with the recovered key, replayed on the artifact
    queries: int = 0

    @property
    def leaked(self) -> float:
        """The gate value: the measured fraction, else 1 when the file holds the key, else 0."""
        if self.fraction is not None:
            return self.fraction
        return 1.0 if self.holds_key else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("recovered")
        d["leaked"] = self.leaked
        return d


def base_weight_and_hash(base: Path) -> tuple[torch.Tensor, str | None]:
    """The public base's patch embedding, and the SHA-256 of its weights file."""
    path = base / "model.safetensors" if base.is_dir() else base
    if not path.is_file():
        raise KeyedgeError(f"base {base} does not exist (a checkpoint file or a run directory)")
    state = read_weights(path, "base")
    weight = state.get("patch_embed.proj.weight")
    if weight is None:
        raise KeyedgeError(f"{base} holds no patch_embed.proj.weight: not a ViT base")
    return weight, file_sha256(path)


def _source_run(artifact: Artifact) -> Path | None:
    if artifact.kind == "run":
        return artifact.path
    source = Path(getattr(artifact.manifest, "source_run", "") or "")
    return source if source.is_dir() else None


def _check_inputs(artifact: Artifact, base_sha: str | None, key: Key | None) -> None:
    m = artifact.manifest
    if key is not None and m.block_size is not None and (key.block_size, key.channels) != \
            (m.block_size, m.input.channels):
        raise KeyedgeError(f"the key is {key.block_size}x{key.block_size}x{key.channels} but {artifact.path} was "
                           f"made with a {m.block_size}x{m.block_size}x{m.input.channels} key")
    run = _source_run(artifact)
    pinned = read_run(run).base_checkpoint if run is not None else None
    if pinned is not None and base_sha is not None and pinned.sha256 != base_sha:
        raise KeyedgeError(f"{artifact.path} was made from another base than --base (sha256 {pinned.sha256[:12]}… "
                           f"vs {base_sha[:12]}…)")


def _find(artifact: Artifact, base_weight: torch.Tensor, key: Key | None, queries: int) -> Finding:
    """Recover what the file (and, for run directories, queries) give away."""
    m = artifact.manifest
    name = str(artifact.path)
    if m.key_fingerprint is None:
        return Finding(name, "plain", False, "none", "a plain model: there is no key to leak")
    block, channels = m.block_size, m.input.channels
    n = block * block * channels
    chance = 1.0 / n
    if artifact.kind == "engine":
        return Finding(name, "tensorrt-engine", bool(m.contains_key), "manifest",
                       "TensorRT engines are not parsed here (a proprietary serialization): a fused engine holds the "
                       "fused weights, i.e. the key, readable with TensorRT's refitter or inspector where the engine "
                       "allows; treated as holding the key when its manifest says so", chance=chance)
    if artifact.kind in ("onnx", "ir"):
        assert isinstance(m, ArtifactManifest)
        fmt = artifact.kind
        if m.fold_mode == "fused":
            fused = (keyrecovery.onnx_patch_embedding if fmt == "onnx" else keyrecovery.ir_patch_embedding)(
                artifact.path)
            return Finding(name, f"fused-{fmt}-{m.precision}", True,
                           "patch-embedding columns matched to the public base's (linear assignment)",
                           "the fused weights are the keyed weights with their columns permuted by the key",
                           recovered=keyrecovery.recover_from_fused(fused, base_weight, block), chance=chance)
        constants = (keyrecovery.permutation_constants if fmt == "onnx" else keyrecovery.ir_permutation_constants)(
            artifact.path, n)
        if constants:
            guess = constants[0]
            if key is not None:  # the constant is the key or its inverse: keep the better
                guess = max((guess, np.argsort(guess)), key=lambda g: float(np.mean(g == key.perm)))
            return Finding(name, f"{m.fold_mode}-{fmt}-embedded-key", True, "integer permutation constant in the graph",
                           "the graph holds the permutation as a constant (--embed-key)", recovered=guess, chance=chance)
        return Finding(name, f"{m.fold_mode}-{fmt}", False, "integer constants of the graph scanned",
                       "the file holds no key; it lives in key.bin / perm.bin on the device", fraction=0.0,
                       chance=chance)
    # a run directory: the un-fused weights
    assert isinstance(m, RunManifest)
    model = build_model(m, artifact.path)
    leaked = merge_lora(KeyedClassifier(model, None, m.input.mean, m.input.std)).eval()
    columns = keyrecovery.match_columns(leaked.model.patch_embed.proj.weight, base_weight, block)
    finding = Finding(name, "run-unfused", None, "un-fused patch-embedding columns matched to the base's",
                      "un-fused weights stay close to the base without a permutation: column matching alone finds "
                      "little", recovered=columns, chance=chance)
    if queries:
        if key is None:
            finding.note += "; the logit-probe attack needs --key to play the device"
        elif queries < n:
            finding.note += f"; the logit-probe attack needs {n} queries (--queries {queries} is fewer)"
        else:
            with TorchRunner(artifact.path, key) as device:  # the deployed model, queried as a black box
                spec = device.input_spec
                finding.recovered = keyrecovery.probe_key(lambda x: device(spec.from_canonical(x)),
                                                          leaked.classify_shuffled, spec.size, channels, block)
            finding.method = f"logit probes ({n} queries) matched against the leaked un-fused weights"
            finding.queries = n
    return finding


def _ensemble_findings(artifact: Artifact, base_weight: torch.Tensor, keys: KeySet | None) -> list[Finding]:
    """A random ensemble's file holds every member's folded patch embedding: each member's key is read off its
    own, as off a single fused file (exact fractions with the key set; functional checks per member: parity)."""
    m = artifact.manifest
    assert isinstance(m, ArtifactManifest) and m.ensemble is not None and m.block_size is not None
    spec = m.ensemble
    if keys is not None and keys.fingerprints != list(spec.member_fingerprints):
        raise KeyedgeError(f"--key {keys.fingerprint} is not the key set of {artifact.path} ({m.key_fingerprint})")
    block = m.block_size
    if spec.form == "gathered":
        weights = list(keyrecovery.onnx_member_patch_embeddings(artifact.path, tuple(base_weight.shape)))
    else:
        weights = [keyrecovery.onnx_patch_embedding(artifact.path / f) for f in spec.files]
    chance = 1.0 / (block * block * m.input.channels)
    findings = []
    for i, weight in enumerate(weights):
        finding = Finding(f"{artifact.path}[member-{i}]", f"{spec.form}-ensemble-member-{m.precision}", True,
                          "the member's patch-embedding columns matched to the public base's (linear assignment)",
                          "each member's folded weights are its key", chance=chance,
                          recovered=keyrecovery.recover_from_fused(weight, base_weight, block))
        if keys is not None:
            finding.fraction = float(np.mean(finding.recovered == keys[i].perm))
        findings.append(finding)
    return findings


def find_sealed(path: Path, key: Key | KeySet | None, opener: Opener | None = None) -> Finding:
    """A sealed bundle, as a copy of it stands: ciphertext. The bytes are scanned for the key (as
    uint32 and int64, and its inverse) and for the model's plaintext (ONNX strings)."""
    data = path.read_bytes()
    _, recipient, flags = read_header(data, str(path))
    needles = [b"keyedge_manifest", b"patch_embed", b"onnx", b"LayerNormalization", b"key_fingerprint"]
    for k in (() if key is None else key if isinstance(key, KeySet) else (key,)):
        for perm in (k.perm, k.inverse):
            needles += [np.asarray(perm, dtype="<u4").tobytes(), np.asarray(perm, dtype="<i8").tobytes()]
    found = [n for n in needles if n in data]
    note = (f"sealed to device {recipient}{'' if flags & SIGNED else ' (UNSIGNED: a device that allows it cannot tell it from a forgery)'}: "
            "a copy without that device's private key yields ciphertext only (no key, no model, no manifest in its bytes)")
    if found:
        note = f"PLAINTEXT FOUND in the bundle's bytes ({len(found)} patterns)"
    if opener is not None:
        open_bundle(path, opener).wipe()  # authenticated: it is this device's, intact
        note += "; it opens, authenticated, with the given device key and trusted publishers (in memory)"
    return Finding(str(path), "sealed-bundle", bool(found), "bundle bytes scanned for the key and the model",
                   note, fraction=1.0 if found else 0.0, chance=None)


def _score(finding: Finding, artifact: Artifact, key: Key, images: tuple[torch.Tensor, torch.Tensor] | None,
           attack) -> None:
    """Exact fraction; with the source run and images, agreement and white-box robustness."""
    if finding.recovered is None:
        return
    finding.fraction = float(np.mean(finding.recovered == key.perm))
    run = _source_run(artifact)
    if run is None or images is None:
        finding.note += "; functional scores need the artifact's source run and images"
        return
    x, y = images
    reference = load_run(run, key)
    recovered = reference.with_key(Key(finding.recovered, key.block_size, key.channels, insecure=True))
    with torch.no_grad():
        finding.agreement = float((reference(x).argmax(1) == recovered(x).argmax(1)).float().mean())
    x_adv = pgd(ce_loss(recovered), x, y, attack)
    with runner_for(artifact, key) as runner:
        spec = runner.input_spec
        before = runner(spec.from_canonical(x)).argmax(1) == y.numpy()
        after = runner(spec.from_canonical(x_adv)).argmax(1) == y.numpy()
    finding.clean = float(before.mean())
    finding.whitebox_robust = float((before & after).mean())
    assert finding.whitebox_robust <= finding.clean


def audit(paths: list[Path], base: Path, key: Key | KeySet | None = None, cfg: AuditConfig | None = None, *,
          data: str | None = None, opener: Opener | None = None) -> dict[str, Any]:
    """Audit every artifact; returns the JSON-ready report (findings in ``artifacts``) with the release
    gate's verdict (``passed``: no artifact leaks more than ``cfg.fail_above``). ``key``: a key, or a random
    ensemble's key set (for ensemble artifacts, whose every member is audited)."""
    cfg = cfg or AuditConfig()
    base_weight, base_sha = base_weight_and_hash(base)
    sealed = {Path(p) for p in paths if Path(p).suffix == SUFFIX}
    for p in sealed:
        if not Path(p).is_file():
            raise KeyedgeError(f"artifact {p} does not exist")
    artifacts = [open_artifact(p) for p in paths if Path(p) not in sealed]
    for art in artifacts:  # refuse bad input before any attack runs
        if isinstance(key, KeySet) != art.is_ensemble and key is not None:
            raise KeyedgeError(f"{art.path}: a random ensemble's artifact takes its key set, a single model its key")
        if not art.is_ensemble:
            _check_inputs(art, base_sha, key)  # type: ignore[arg-type]
    torch.manual_seed(cfg.seed)
    findings = []
    for art in artifacts:
        if art.is_ensemble:
            findings += _ensemble_findings(art, base_weight, key)  # type: ignore[arg-type]
            continue
        assert not isinstance(key, KeySet)
        finding = _find(art, base_weight, key, cfg.queries)
        if key is not None and art.manifest.key_fingerprint is not None:
            if art.manifest.key_fingerprint != key.fingerprint:
                raise KeyedgeError(f"--key {key.fingerprint} is not the key of {art.path} "
                                   f"({art.manifest.key_fingerprint})")
            run = _source_run(art)
            images = run_images(read_run(run), cfg.n, seed=cfg.seed, data=data) if run is not None else None
            _score(finding, art, key, images, cfg.attack)
        findings.append(finding)
    findings += [find_sealed(p, key, opener) for p in sealed]
    leaks = [f.artifact for f in findings if cfg.fail_above is not None and f.leaked > cfg.fail_above]
    return {"base": str(base), "base_sha256": base_sha, "key_fingerprint": key.fingerprint if key is not None else None,
            "queries": cfg.queries, "n_images": cfg.n, "attack": cfg.attack.describe(),
            "artifacts": [f.as_dict() for f in findings], "fail_above": cfg.fail_above, "leaks": leaks,
            "passed": not leaks}


def _label(path: Path) -> str:
    """``export-dir/model.onnx``: a file with the folder that names it."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def audit_markdown(report: dict[str, Any]) -> str:
    fail_above = report["fail_above"]
    rows = [[_label(Path(f["artifact"])) if f["kind"] != "run-unfused" else f["artifact"], f["kind"],
             {True: "yes", False: "no", None: "?"}[f["holds_key"]], f["method"],
             pct(f["fraction"]), pct(f["agreement"]), pct(f["clean"]), pct(f["whitebox_robust"]), f["note"]]
            for f in report["artifacts"]]
    gate = "" if fail_above is None else f" Release gate: leaked fraction above {fail_above:.2f} fails (exit 3)."
    attack = report["attack"]
    return "\n".join([
        "# keyedge key-leakage audit", "",
        f"Attacker: has a copy of each file and the public base ({report['base']}); for run directories "
        f"with --queries, also {report['queries'] or 'no'} queries of the deployed model. With the true key the "
        f"audit scores what was recovered: exact entries, top-1 agreement of the model behind the recovered key "
        f"with the true one on {report['n_images']} real images, and the robust accuracy left after white-box PGD "
        f"l_inf {attack['eps'] * 255:.0f}/255 ({attack['steps']} steps) crafted with the recovered key and replayed "
        f"on the artifact.{gate}", "",
        markdown_table(["artifact", "kind", "holds key", "attack", "key recovered", "agreement", "clean",
                        "white-box robust", "note"], rows), ""])
