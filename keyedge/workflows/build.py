"""``keyedge build``: an exported artifact gets its on-device build plan (and the engine, where TensorRT and
the target's GPU are here); a sealed bundle is built on its device, in memory, into an engine bundle
sealed to the same device (no plan: a plan is the model in plaintext)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import atomic_write_bytes, check_output_dir, staged_dir
from ..core.progress import Echo, echo
from ..deploy.targets import Target, load_target
from ..deploy.tensorrt import build_engine, build_sealed, engine_blockers, write_build_plan
from ..runtime.artifacts import open_export
from ..runtime.bundle import SIGNED, SUFFIX, DeviceAccess, bundle_flags, open_bundle
from .sealing import read_signer


def build(artifact: Path, target: str | Path, out: Path, *, timing_cache: Path | None = None,
          plan_only: bool = False, access: DeviceAccess = DeviceAccess(), sign_with: Path | None = None,
          force: bool = False, echo: Echo = echo) -> Path:
    """Build for ``target`` (a profile name or a .toml) into ``out``; returns what was built: the engine,
    the sealed engine bundle (signed with ``sign_with``), or the plan's directory."""
    tgt = load_target(target)
    if artifact.suffix == SUFFIX:
        check_output_dir(out, force)
        return _build_sealed(artifact, tgt, out, timing_cache, plan_only, access, sign_with, force, echo)
    art = open_export(artifact)
    check_output_dir(out, force)
    reasons = engine_blockers(tgt, plan_only)
    with staged_dir(out, force=force) as stage:
        plan = write_build_plan(art.path, art.manifest, tgt, stage)  # type: ignore[arg-type]
        engine = None if reasons else build_engine(stage / "model.onnx", plan, tgt, stage, timing_cache)
    echo(f"wrote the build plan for {tgt.name} in {out}: model.onnx, manifest.json, build_engine.sh, bench_engine.sh")
    echo("  build on the device: " + " ".join(plan.trtexec_build))
    if engine is not None:
        echo(f"built {out / engine.name} with TensorRT (manifest {engine.name}.json)")
    else:
        echo("did not build an engine here: " + "; ".join(dict.fromkeys(reasons)))
    if tgt.experimental:
        echo(f"note: target {tgt.name} is experimental")
    if plan.contains_key:
        echo(f"WARNING: {plan.secret}", err=True)
    return out / engine.name if engine is not None else out


def _build_sealed(bundle: Path, tgt: Target, out: Path, timing_cache: Path | None, plan_only: bool,
                  access: DeviceAccess, sign_with: Path | None, force: bool, echo: Echo) -> Path:
    signed = bundle_flags(bundle) & SIGNED  # a file that is no bundle is refused as such
    if sign_with is not None and not signed:
        raise KeyedgeError(f"{bundle} is unsigned: keyedge does not sign an engine built from a model no publisher "
                           "signed (seal it with --sign-with first)")
    signer = read_signer(sign_with, access.allow_unsigned)
    opener = access.opener(echo)  # every input checked, then whether it can be built here
    reasons = engine_blockers(tgt, plan_only)
    if reasons:
        raise KeyedgeError(f"a sealed bundle is built on its device, in memory, with TensorRT's Python API "
                           f"(a build plan would write the model in plaintext): {'; '.join(dict.fromkeys(reasons))}")
    opened = open_bundle(bundle, opener)
    cache_in = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    data, cache = build_sealed(opened, opener.device.public, tgt, cache_in, signer)
    with staged_dir(out, force=force) as stage:
        atomic_write_bytes(stage / "model.kes", data, mode=0o600)
        (stage / tgt.timing_cache).write_bytes(cache)  # kernel timings only: no weights
    echo(f"built a TensorRT engine for {tgt.name} from {bundle} in memory and sealed it to device "
         f"{opener.fingerprint}" + (f", signed by publisher {signer.fingerprint}" if signer else ", UNSIGNED")
         + f": {out / 'model.kes'}")
    return out / "model.kes"
