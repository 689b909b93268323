"""TensorRT engines: an on-device build plan for every target, and a Python-API build where possible.

The build plan is the primary path (Jetson engines must be built on the Jetson):
``model.onnx``, ``manifest.json``, ``build_engine.sh`` running the exact ``trtexec``
command for the target, and ``bench_engine.sh``. Where TensorRT is importable and
the local GPU matches the target, :func:`build_engine` builds the engine with the
Python API (ONNX parser, optimisation profile, a timing cache saved and reused).
An engine's manifest (:class:`~keyedge.core.manifests.EngineManifest`) lives beside it as
``<engine>.json`` (so ``trtexec --loadEngine`` still reads the engine), with the
TensorRT version, the GPU it was built on and the key fingerprint. ``tensorrt`` is
imported lazily: nothing here needs it at import time.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from ..core.errors import KeyedgeError
from ..core.io import SECRET, atomic_write_bytes, make_secret, wipe
from ..core.manifests import ENGINE_FILE, ArtifactInput, ArtifactManifest, BuildPlan, EngineManifest, TargetInfo
from ..runtime.bundle import EXTERNAL_DATA, Bundle, BundleError, DevicePublicKey, PublisherKey, inline_layout, seal
from ..runtime.platform import import_tensorrt, local_gpu_capability, local_l4t_release, tensorrt_available
from .targets import Target

ENGINE = ENGINE_FILE


def _shape(spec: ArtifactInput, batch: int) -> str:
    return "x".join(str(d) for d in spec.shape(batch))


def check_artifact_for_target(manifest: ArtifactManifest, target: Target) -> None:
    precision = manifest.precision
    if precision == "int8" and manifest.int8_method != "static":
        raise KeyedgeError("dynamically quantized int8 ONNX is for CPUs; TensorRT takes Q/DQ int8: "
                           "export with --precision int8 --int8-method static, or fp16")
    if target.strongly_typed and precision != target.precision:
        raise KeyedgeError(f"target {target.name} is strongly typed (precision comes from the ONNX types) and "
                           f"expects {target.precision}, but this artifact is {precision}: "
                           f"export with --precision {target.precision}")


def trtexec_build_args(manifest: ArtifactManifest, target: Target, onnx_name: str = "model.onnx",
                       engine_name: str = ENGINE) -> list[str]:
    spec = manifest.graph_input
    args = ["--onnx=" + onnx_name, "--saveEngine=" + engine_name]
    if target.strongly_typed:
        args.append("--stronglyTyped")
    else:
        if target.precision in ("fp16", "int8"):
            args.append("--fp16")
        if target.precision == "int8" or manifest.precision == "int8":
            args.append("--int8")
    if spec.fixed_batch is None:
        args += [f"--minShapes={spec.name}:{_shape(spec, target.batch_min)}",
                 f"--optShapes={spec.name}:{_shape(spec, target.batch_opt)}",
                 f"--maxShapes={spec.name}:{_shape(spec, target.batch_max)}"]
    args += [f"--memPoolSize=workspace:{target.workspace_mib}M",
             f"--builderOptimizationLevel={target.builder_optimization_level}",
             f"--timingCacheFile={target.timing_cache}"]
    if target.dla_enabled:
        args.append(f"--useDLACore={target.dla_core}")
        if target.dla_gpu_fallback:
            args.append("--allowGPUFallback")
    return args


def trtexec_bench_args(manifest: ArtifactManifest, target: Target, engine_name: str = ENGINE) -> list[str]:
    spec = manifest.graph_input
    args = ["--loadEngine=" + engine_name, "--useCudaGraph", "--useSpinWait", "--noDataTransfers",
            "--separateProfileRun", "--warmUp=500", "--duration=10"]
    if spec.fixed_batch is None:
        args.append(f"--shapes={spec.name}:{_shape(spec, target.batch_opt)}")
    if manifest.key_input:
        args.append(f'--loadInputs={manifest.key_input}:"$KEY_PERM_BIN"')
    return args


# Writes the engine's manifest after trtexec has built it: the build plan, re-labelled as an
# engine manifest, with the TensorRT version and the GPU that built it. Python's standard
# library only (JetPack has python3), written to a temporary file and renamed into place.
_ENGINE_MANIFEST_PY = """\
import json, os, re, sys
plan = json.load(open("manifest.json"))
l4t = None
if os.path.exists("/etc/nv_tegra_release"):
    m = re.match(r"# R(\\d+) \\(release\\), REVISION: ([0-9.]+)", open("/etc/nv_tegra_release").read())
    l4t = m and "R%s.%s" % m.groups()
plan.update(format="keyedge-engine", version=1, tensorrt_version=sys.argv[1] or "unknown",
            compute_capability=sys.argv[2] or None, l4t_release=l4t)
with open("{engine}.json.tmp", "w") as fh:
    json.dump(plan, fh, indent=2)
os.replace("{engine}.json.tmp", "{engine}.json")
"""


def _script(lines: list[str]) -> str:
    return "#!/usr/bin/env bash\n" + "\n".join(lines) + "\n"


def target_info(target: Target) -> TargetInfo:
    return TargetInfo(name=target.name, description=target.description, tensorrt_major=target.tensorrt,
                      strongly_typed=target.strongly_typed, precision=target.precision,
                      experimental=target.experimental, batch=(target.batch_min, target.batch_opt, target.batch_max),
                      dla=target.dla_enabled)


def build_plan(manifest: ArtifactManifest, target: Target, *, commands: bool = True) -> BuildPlan:
    """The artifact's manifest for ``target``, with the exact trtexec commands that build and bench it on the
    device (``commands=False``: none, for an engine built in memory)."""
    check_artifact_for_target(manifest, target)
    build = ("trtexec", *trtexec_build_args(manifest, target)) if commands else ()
    bench = ("trtexec", *trtexec_bench_args(manifest, target)) if commands else ()
    return BuildPlan(**manifest.fields_of(ArtifactManifest), target=target_info(target), trtexec_build=build,
                     trtexec_bench=bench)


def write_build_plan(onnx_path: Path, manifest: ArtifactManifest, target: Target, out: Path) -> BuildPlan:
    """Write model.onnx, manifest.json, build_engine.sh and bench_engine.sh into ``out``."""
    plan = build_plan(manifest, target)
    shutil.copyfile(onnx_path, out / "model.onnx")
    make_secret(out / "model.onnx")
    build, bench = plan.trtexec_build[1:], plan.trtexec_bench[1:]
    plan.write(out / "manifest.json")
    header = [f"# keyedge on-device build plan: target {target.name} ({target.description})",
              "# Run on the target device. Engines are specific to the GPU and TensorRT version that built them.",
              "set -euo pipefail", 'cd "$(dirname "$0")"',
              'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"']
    if target.experimental:
        header.append(f'echo "note: target {target.name} is experimental" >&2')
    if plan.contains_key:
        header.append('echo "note: model.onnx and the engine encode the secret key: keep them as secret as key.bin" >&2')
    build_lines = header + [
        '"$TRTEXEC" ' + " ".join(shlex.quote(a) for a in build) + " 2>&1 | tee build.log",
        "version=$(grep -o 'TensorRT v[0-9]*' build.log | head -n 1 | cut -d v -f 2 || true)",
        "cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)",
        '[ -n "$cc" ] || { [ -e /etc/nv_tegra_release ] && cc=8.7; } || true',
        "# the engine's manifest, beside it: the build plan plus the TensorRT version and the GPU",
        'python3 - "${version:-}" "${cc:-}" <<\'EOF\'',
        _ENGINE_MANIFEST_PY.format(engine=ENGINE).rstrip("\n"),
        "EOF",
        'echo "wrote ' + ENGINE + ' and ' + ENGINE + '.json (TensorRT ${version:-unknown})"']
    key_check = (['# a gather engine takes the key at run time: `keyedge key export-perm key.bin -o perm.bin`',
                  ': "${KEY_PERM_BIN:?set KEY_PERM_BIN to the raw int64 permutation from keyedge key export-perm}"']
                 if manifest.key_input else [])
    bench_lines = header + key_check + ['[ -f ' + ENGINE + ' ] || { echo "run ./build_engine.sh first" >&2; exit 1; }',
                            '"$TRTEXEC" ' + " ".join(a if a.startswith("--loadInputs") else shlex.quote(a)
                                                     for a in bench)]
    for name, lines in (("build_engine.sh", build_lines), ("bench_engine.sh", bench_lines)):
        (out / name).write_text(_script(lines))
        (out / name).chmod(0o755)
    return plan


def engine_blockers(target: Target, plan_only: bool = False) -> list[str]:
    """Why no engine for ``target`` can be built on this host (empty: it can)."""
    gpu = local_gpu_capability()
    reasons = ["--plan-only"] if plan_only else []
    if target.is_jetson and gpu != "8.7":
        reasons.append(f"{target.name} engines are built on the Jetson itself")
    if not tensorrt_available():
        reasons.append("TensorRT is not installed here")
    if gpu is None:
        reasons.append("no CUDA GPU here")
    elif gpu not in target.compute_capabilities:
        reasons.append(f"the local GPU (compute capability {gpu}) is not a {target.name} GPU")
    return reasons


def serialize_engine(onnx: Path | bytes, plan: BuildPlan, target: Target,
                     timing_cache: bytes = b"") -> tuple[bytes, bytes, EngineManifest]:
    """Build an engine with the TensorRT Python API from an ONNX file, or from its bytes (a sealed
    bundle's, in memory); returns (engine, timing cache, engine manifest)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if target.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx)) if isinstance(onnx, Path) else parser.parse(onnx)
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KeyedgeError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_mib << 20)
    config.builder_optimization_level = target.builder_optimization_level
    if not target.strongly_typed:
        if target.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if target.precision == "int8" or plan.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if target.dla_enabled:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = target.dla_core
        if target.dla_gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    spec = plan.graph_input
    if spec.fixed_batch is None:
        profile = builder.create_optimization_profile()
        dims = [spec.shape(b) for b in (target.batch_min, target.batch_opt, target.batch_max)]
        profile.set_shape(spec.name, dims[0], dims[1], dims[2])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KeyedgeError(f"TensorRT failed to build an engine for target {target.name}")
    manifest = EngineManifest(**plan.fields_of(BuildPlan), tensorrt_version=trt.__version__,
                              compute_capability=local_gpu_capability(), l4t_release=local_l4t_release())
    return bytes(serialized), bytes(config.get_timing_cache().serialize()), manifest


def build_engine(onnx_path: Path, plan: BuildPlan, target: Target, out: Path,
                 timing_cache: Path | None = None) -> Path:
    """Build ``out/model.engine`` with the TensorRT Python API; writes ``model.engine.json``."""
    cache_path = timing_cache or out / target.timing_cache
    engine, cache, manifest = serialize_engine(onnx_path, plan, target,
                                               cache_path.read_bytes() if cache_path.is_file() else b"")
    engine_path = out / ENGINE
    atomic_write_bytes(engine_path, engine, mode=SECRET)
    (out / target.timing_cache).write_bytes(cache)
    manifest.write(out / (ENGINE + ".json"))
    return engine_path


def build_sealed(bundle: Bundle, device: DevicePublicKey, target: Target, timing_cache: bytes = b"",
                 signer: PublisherKey | None = None) -> tuple[bytes, bytes]:
    """A sealed ONNX bundle built into an engine on a GPU of the target's kind, in memory, and the engine
    (with its manifest and, for gather / kernel artifacts, the key) sealed again to the same device and
    signed by ``signer``; returns (the engine bundle, the timing cache). Neither the model nor the engine
    touches the disk."""
    if bundle.model_name != "model.onnx":
        raise BundleError(f"{bundle.path} already holds an engine: it runs as it is")
    manifest = ArtifactManifest.from_json(bundle.manifest_text, f"{bundle.path} (sealed manifest)")
    plan = build_plan(manifest, target, commands=False)
    plain = bundle.plain
    try:  # TensorRT's parser takes one protobuf: the tensors go back inside it, in memory
        if EXTERNAL_DATA in plain.spans:
            with plain.view(EXTERNAL_DATA) as data:
                onnx = inline_layout(plain.read("model.onnx"), data)
        else:
            onnx = plain.read("model.onnx")
        key = bundle.key()
    finally:
        bundle.wipe()
    engine, cache, engine_manifest = serialize_engine(onnx, plan, target, timing_cache)
    files: dict[str, bytes | bytearray] = {"model.engine": engine,
                                           "model.engine.json": engine_manifest.to_json().encode()}
    if key is None:
        return seal(files, device, signer), cache
    files["key.bin"] = key.to_bytes()
    try:
        return seal(files, device, signer), cache
    finally:
        wipe(files["key.bin"])
        key.wipe()
