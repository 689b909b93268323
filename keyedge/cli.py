"""The ``keyedge`` command line: one function per command, errors as one line + exit 2."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import typer

from .errors import KeyedgeError

app = typer.Typer(
    help="keyedge: key-based adversarially defended ViTs, from secret key to edge-GPU engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
key_app = typer.Typer(help="Key files: inspect (never prints the key), export-perm for gather engines.",
                      no_args_is_help=True)
app.add_typer(key_app, name="key")
device_app = typer.Typer(help="Device identity: the key pair a sealed bundle is encrypted to.", no_args_is_help=True)
app.add_typer(device_app, name="device")

DEVICE_KEY_HELP = "The device's private key for sealed .kes bundles: a file, or - for standard input."
DEVICE_KEY_COMMAND_HELP = ("A command printing the device's private key (e.g. unsealing it from OP-TEE secure "
                           "storage or a TPM); default: $KEYEDGE_DEVICE_KEY_COMMAND.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"keyedge: error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`KeyedgeError` into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyedgeError as exc:
            fail(str(exc), exc.exit_code)

    return wrapper


class Mode(str, Enum):
    full = "full"
    lora = "lora"


class Threat(str, Enum):
    small = "small"
    imagenet = "imagenet"


class AAVersion(str, Enum):
    quick = "quick"
    standard = "standard"
    off = "off"


class FoldMode(str, Enum):
    fused = "fused"
    gather = "gather"
    kernel = "kernel"


class InputKind(str, Enum):
    float = "float"
    uint8 = "uint8"


class Layout(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Int8Method(str, Enum):
    dynamic = "dynamic"
    static = "static"


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _model_kwargs(depth: int | None, embed_dim: int | None, heads: int | None) -> dict:
    return {k: v for k, v in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", heads)) if v is not None}


def _exported(artifact: Path):
    """An exported ONNX artifact (an export or build directory, or the .onnx file)."""
    from .artifacts import open_artifact

    art = open_artifact(artifact, prefer_engine=False)
    if art.kind != "onnx":
        raise KeyedgeError(f"{artifact} is not an exported artifact (no model.onnx); run keyedge export")
    return art


def _device_key(path: Path | None, command: str | None, artifacts: list[Path]):
    """The device key, read only when a sealed bundle is among the artifacts."""
    if not any(Path(a).suffix == ".kes" for a in artifacts):
        return None
    from .seal import read_device_key

    return read_device_key(path, command)


def _batches(text: str, option: str = "--batch") -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise KeyedgeError(f"{option} takes a comma-separated list of integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise KeyedgeError(f"{option} values must be >= 1")
    return values


@app.command()
@handles_errors
def keygen(
    out: Path = typer.Option(..., "-o", "--out", help="Key file to write (0600, atomic)."),
    block_size: int = typer.Option(..., "--block-size", "-m", min=1, max=64,
                                   help="Block size M: the key permutes the M*M*C values of each block."),
    channels: int = typer.Option(3, "--channels", min=1, max=16, help="Image channels C."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key file."),
    insecure_seed: int | None = typer.Option(
        None, "--insecure-seed", help="Draw from a seeded generator (tests only; recorded as insecure)."),
) -> None:
    """Generate a new secret key from the operating system's CSPRNG."""
    from .keys import Key

    key = Key.generate(block_size, channels, seed=insecure_seed)
    key.save(out, overwrite=force)
    typer.echo(f"wrote {out} (block size {block_size}, {channels} channels, "
               f"fingerprint {key.fingerprint}{', INSECURE seeded key' if key.insecure else ''})")
    typer.echo("keep this file secret: anyone holding it can craft white-box attacks on its models")


@key_app.command("inspect")
@handles_errors
def key_inspect(path: Path = typer.Argument(..., help="Key file.")) -> None:
    """Show a key's block size, channels, key-space size and fingerprint."""
    from .keys import Key

    key = Key.load(path)
    typer.echo(f"file:         {path}")
    typer.echo(f"block size:   {key.block_size}")
    typer.echo(f"channels:     {key.channels}")
    typer.echo(f"values:       {key.size} per block")
    typer.echo(f"key space:    10^{key.log10_keyspace:.1f} keys  ((M*M*C)!)")
    typer.echo(f"insecure:     {'yes (seeded, for tests only)' if key.insecure else 'no'}")
    typer.echo(f"fingerprint:  {key.fingerprint}")


@app.command()
@handles_errors
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    model: str = typer.Option("vit_base_patch16_224", help="timm model name."),
    checkpoint: Path | None = typer.Option(None, help="Base weights (.safetensors/.pth/.npz), offline."),
    pretrained: bool = typer.Option(False, help="Base weights from the Hugging Face hub (needs network)."),
    data: str = typer.Option("digits", help="'digits' (built in) or an ImageFolder root with train/ and val/."),
    key: Path | None = typer.Option(None, help="Key file; omit for a plain (un-keyed) fine-tune."),
    mode: Mode = typer.Option(Mode.full, help="full: all weights; lora: LoRA adapters + head."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(64, min=1, help="Per-process batch size."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up + cosine)."),
    weight_decay: float = typer.Option(0.05),
    warmup_epochs: float = typer.Option(1.0),
    accum_steps: int = typer.Option(1, min=1, help="Gradient accumulation steps."),
    num_classes: int | None = typer.Option(None, help="Classes (default: the model's)."),
    img_size: int | None = typer.Option(None, help="Input size override."),
    patch_size: int | None = typer.Option(None, help="Patch size override."),
    depth: int | None = typer.Option(None, help="Transformer depth override (small models)."),
    embed_dim: int | None = typer.Option(None, help="Width override (small models)."),
    heads: int | None = typer.Option(None, help="Attention heads override (small models)."),
    lora_rank: int = typer.Option(8, min=1),
    lora_alpha: float = typer.Option(16.0),
    lora_dropout: float = typer.Option(0.0),
    lora_targets: str = typer.Option("qkv,proj,fc1,fc2", help="Comma-separated layer names inside blocks."),
    lora_patch_embed: bool = typer.Option(False, help="Also train the patch embedding fully."),
    amp: bool = typer.Option(True, help="Mixed precision on GPU."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(4, help="Data loader workers (ImageFolder)."),
    resume: bool = typer.Option(False, help="Continue from the run's last epoch checkpoint."),
    force: bool = typer.Option(False, help="Write into a non-empty run directory (its earlier run files are "
                                            "replaced, other files kept)."),
) -> None:
    """Fine-tune a keyed (or plain) ViT from a base checkpoint; torchrun for multi-GPU."""
    from .train import TrainConfig, train as run_train

    cfg = TrainConfig(model=model, out=str(out), data=data, key=str(key) if key else None,
                      checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained,
                      mode=mode.value, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                      model_kwargs=_model_kwargs(depth, embed_dim, heads), epochs=epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                      accum_steps=accum_steps, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, lora_targets=tuple(t for t in lora_targets.split(",") if t),
                      lora_patch_embed=lora_patch_embed, amp=amp, seed=seed, workers=workers,
                      resume=resume, force=force)
    manifest = run_train(cfg, console=_console())
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 reports
        return
    typer.echo(f"wrote {out}: test accuracy {manifest.metrics['test_acc']:.4f} after "
               f"{manifest.epochs_done} epochs")
    typer.echo(f"trainable parameters: {manifest.trainable_params:,} of {manifest.total_params:,}")
    typer.echo(f"per-key storage: {manifest.per_key_bytes:,} bytes "
               f"(full model {manifest.full_model_bytes:,} bytes)")


@app.command("eval")
@handles_errors
def evaluate_cmd(
    run: Path = typer.Argument(..., help="Keyed (or plain) run directory."),
    key: Path | None = typer.Option(None, help="The run's key file (checked against its fingerprint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.md, results.json, plot)."),
    data: str = typer.Option("digits", help="'digits' or an ImageFolder root (val/ is used)."),
    base: Path | None = typer.Option(None, help="Public base classifier (run dir or checkpoint); "
                                                "default: the run's base checkpoint."),
    plain_ft: Path | None = typer.Option(None, help="A plain fine-tune of the base (run dir): surrogate (c)."),
    n: int = typer.Option(500, min=1, help="Test images."),
    threat: Threat = typer.Option(Threat.small, help="Defaults: small (l_inf 8/255, l_2 0.5) or "
                                                     "imagenet (l_inf 4/255, l_2 3.0)."),
    eps: float | None = typer.Option(None, help="l_inf eps (in [0,1] units)."),
    l2_eps: float | None = typer.Option(None, help="l_2 eps."),
    steps: int | None = typer.Option(None, help="PGD steps."),
    step_size: float | None = typer.Option(None, help="l_inf PGD step."),
    random_start: bool = typer.Option(True),
    autoattack: AAVersion = typer.Option(AAVersion.quick, help="quick: APGD-CE + APGD-DLR; standard: the full suite."),
    eot_samples: int = typer.Option(8, min=1, help="Random keys per EOT step."),
    key_search_random: int = typer.Option(100, min=0, help="Random keys tried by the key search."),
    key_search_swaps: int = typer.Option(300, min=0, help="Greedy pair swaps after the random search."),
    restarts: int = typer.Option(1, min=1, help="Random restarts of transfer / adaptive PGD."),
    whitebox_steps: str = typer.Option("10,50,100", help="White-box PGD steps reported (convergence check)."),
    queries: str = typer.Option("100,1000,5000", help="Query budgets per image for Square and HopSkipJump "
                                                       "('' for none)."),
    query_n: int = typer.Option(32, min=1, help="Images the query attacks (and the threat-model table) use."),
    artifact: Path | None = typer.Option(None, help="The deployed artifact the query attacks query (default: "
                                                    "the run itself), e.g. its exported fused ONNX."),
    own_key: list[Path] = typer.Option([], help="Keyed fine-tunes of the base with the attacker's own keys "
                                                "(run dirs; their keys beside them as key.bin): MI-DI ensemble."),
    seed: int = typer.Option(0, help="Seeds the images drawn and every attack's randomness."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    force: bool = typer.Option(False, help="Write into a non-empty report directory (other files are kept)."),
) -> None:
    """Clean and robust accuracy against every attacker: transfer, score and label-only queries, a copy of
    the files, un-fused weights + queries, and the key (white-box). --threat imagenet: l_inf 4/255,
    AutoAttack standard."""
    from .artifacts import check_key, read_run
    from .data import load_data, sample
    from .evaluate import EvalConfig, evaluate
    from .io import check_output_dir, staged_dir
    from .keys import Key
    from .pipeline import load_surrogate
    from .report import write_eval_report
    from .runs import base_checkpoint_path, load_run

    manifest = read_run(run)
    k = Key.load(key) if key else None
    check_key(manifest, k, f"run {run}", strict=True)
    check_output_dir(out, force)  # refuse before the (long) evaluation
    overrides = {name: v for name, v in (("linf_eps", eps), ("l2_eps", l2_eps), ("steps", steps),
                                         ("step_size", step_size)) if v is not None}
    overrides.update(n=n, random_start=random_start, autoattack=autoattack.value, eot_samples=eot_samples,
                     key_search_random=key_search_random, key_search_swaps=key_search_swaps, seed=seed,
                     restarts=restarts, whitebox_steps=_batches(whitebox_steps, "--whitebox-steps"),
                     query_budgets=_batches(queries, "--queries") if queries.strip() else (), query_n=query_n)
    cfg = EvalConfig.imagenet(**overrides) if threat is Threat.imagenet else EvalConfig(**overrides)
    own = [load_run(r, Key.load(r / "key.bin"), device=device) for r in own_key]
    target = load_run(run, k, device=device)
    base_path = base if base is not None else base_checkpoint_path(manifest)
    base_model = load_surrogate(base_path, manifest).to(device) if base_path is not None else None
    plain_model = load_run(plain_ft, None, device=device) if plain_ft is not None else None
    splits = load_data(data, manifest.input.size[0], manifest.input.channels)
    x, y = sample(splits.test, n, seed=seed)
    console = _console()
    from .attacks.query import runner_model
    from .runners import open_runner

    runner = open_runner(artifact, k) if artifact is not None else None
    with runner if runner is not None else contextlib.nullcontext():
        results = evaluate({run.name: target}, x.to(device), y.to(device), cfg, base=base_model,
                           plain_ft=plain_model, own_keys=own,
                           deployed={run.name: runner_model(runner)} if runner is not None else None,
                           base_patch_weight=base_model.model.patch_embed.proj.weight if base_model else None,
                           status=lambda s: console.print(f"[bold]eval[/]: {s}"))
    results["key_fingerprint"] = manifest.key_fingerprint
    with staged_dir(out, force=force) as stage:
        write_eval_report(results, stage)
    typer.echo(f"wrote {out / 'report.md'} and {out / 'results.json'}")


@app.command()
@handles_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output directory."),
    seed: int = typer.Option(0, help="Training seed (the key itself always comes from the CSPRNG)."),
    quick: bool = typer.Option(False, help="A one-minute smoke version with tiny budgets."),
    force: bool = typer.Option(False, help="Write into a non-empty output directory (other files are kept)."),
) -> None:
    """The main job: the whole keyed-ViT defense on the built-in digits data."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(str(out), seed=seed, force=force) if quick else DemoConfig(
        out=str(out), seed=seed, force=force)
    run_demo(cfg, console=_console())


@app.command("export")
@handles_errors
def export_cmd(
    run: Path = typer.Argument(..., help="Keyed run directory (full weights or a LoRA adapter)."),
    key: Path | None = typer.Option(None, help="The run's key file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (model.onnx, manifest.json)."),
    mode: FoldMode | None = typer.Option(None, help="fused: fold the key into the patch embedding "
                                                    "(default when M divides the patch size); gather: keep it "
                                                    "as an ONNX Gather; kernel: the runtime's CUDA kernel "
                                                    "(or its CPU twin) gathers, with --input uint8 --layout nhwc."),
    embed_key: bool = typer.Option(False, help="gather: bake the key in as a constant (default: a graph input)."),
    input: InputKind = typer.Option(InputKind.float, help="float ([0,1]) or uint8 ([0,255]) images."),
    layout: Layout = typer.Option(Layout.nchw),
    batch: int = typer.Option(1, min=1, help="Static batch size."),
    dynamic_batch: bool = typer.Option(False, help="Dynamic batch dimension instead of --batch."),
    precision: Precision = typer.Option(Precision.fp32, help="fp32; fp16 (weights/compute, fp32 I/O); int8 (CPU)."),
    int8_method: Int8Method = typer.Option(Int8Method.dynamic, help="int8: dynamic, or static with calibration."),
    calibration_n: int = typer.Option(64, min=1, help="Calibration images for static int8."),
    opset: int = typer.Option(18, min=17),
    force: bool = typer.Option(False, help="Write into a non-empty output directory (other files are kept)."),
) -> None:
    """Merge LoRA, fold the key (or keep a gather), export ONNX and verify it with ONNX Runtime."""
    from .onnx_export import ExportOptions
    from .pipeline import export_run

    opts = ExportOptions(mode=mode.value if mode else None, input=input.value, layout=layout.value,
                         batch=None if dynamic_batch else batch, embed_key=embed_key,
                         precision=precision.value, int8_method=int8_method.value, opset=opset)
    export_run(run, key, out, opts, force=force, calibration_n=calibration_n)


@app.command()
@handles_errors
def parity(
    artifacts: list[Path] = typer.Argument(..., help="Artifacts to check (.onnx, .engine, run directories)."),
    reference: Path = typer.Option(..., help="The keyed PyTorch reference run directory."),
    key: Path | None = typer.Option(None, help="The reference's key file."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write parity.md, parity.json and adversarial.npz."),
    data: str | None = typer.Option(None, help="'digits' or an ImageFolder root (default: the run's)."),
    n: int = typer.Option(200, min=1, help="Images."),
    base: Path | None = typer.Option(None, help="Public base for transfer attacks (default: the run's base)."),
    tolerance_fp32: float = typer.Option(0.1, help="Allowed accuracy difference, points."),
    tolerance_fp16: float = typer.Option(1.0),
    tolerance_int8: float = typer.Option(1.0),
    device_key: Path | None = typer.Option(None, help=DEVICE_KEY_HELP),
    device_key_command: str | None = typer.Option(None, help=DEVICE_KEY_COMMAND_HELP),
    force: bool = typer.Option(False, help="Write into a non-empty --out directory (other files are kept)."),
) -> None:
    """Prove that artifacts (sealed bundles too) keep the reference's clean and adversarial accuracy
    (exit 1 if not)."""
    from .io import check_output_dir
    from .parity import ParityConfig
    from .pipeline import run_parity

    if out is not None:
        check_output_dir(out, force)
    cfg = ParityConfig(n=n, tolerance={"fp32": tolerance_fp32 / 100, "fp16": tolerance_fp16 / 100,
                                       "int8": tolerance_int8 / 100})
    report = run_parity(reference, key, artifacts, out, data=data, base=base, cfg=cfg, force=force,
                        device_key=_device_key(device_key, device_key_command, artifacts))
    for name, r in report["artifacts"].items():
        sets = ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({100 * v['difference']:+.1f})" for k, v in r["sets"].items())
        typer.echo(f"{'PASS' if r['passed'] else 'FAIL'} {name} [{r['runner']}, {r['precision']}]: {sets}"
                   + ("" if r["key_fingerprint_match"] else "; made with another key"))
    if not report["passed"]:
        raise typer.Exit(1)


@key_app.command("export-perm")
@handles_errors
def key_export_perm(
    path: Path = typer.Argument(..., help="Key file."),
    out: Path = typer.Option(..., "--out", "-o", help="Raw little-endian int64 permutation (0600)."),
    force: bool = typer.Option(False, help="Overwrite an existing file."),
) -> None:
    """Write the permutation as raw int64 (a gather engine's key_perm input for trtexec); secret, 0600."""
    from .io import atomic_write_bytes
    from .keys import Key

    key = Key.load(path)
    atomic_write_bytes(out, key.perm.astype("<i8").tobytes(), mode=0o600, overwrite=force)
    typer.echo(f"wrote {out} (key {key.fingerprint}); it is the key itself: keep it secret")


@app.command()
@handles_errors
def build(
    artifact: Path = typer.Argument(..., help="An exported artifact (directory or model.onnx), or a sealed "
                                              "bundle of one (built on the device, in memory)."),
    target: str = typer.Option(..., help="Target profile: desktop, jetson-orin, jetson-orin-nano, ... or a .toml."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    timing_cache: Path | None = typer.Option(None, help="A timing cache to reuse (and update)."),
    plan_only: bool = typer.Option(False, help="Write the on-device build plan only."),
    device_key: Path | None = typer.Option(None, help=DEVICE_KEY_HELP),
    device_key_command: str | None = typer.Option(None, help=DEVICE_KEY_COMMAND_HELP),
    force: bool = typer.Option(False, help="Write into a non-empty output directory (other files are kept)."),
) -> None:
    """Build a TensorRT engine for a target: with its on-device build plan, or from a sealed bundle.

    An exported artifact always gets its build plan (model.onnx, build_engine.sh with the exact trtexec
    command), and the engine where TensorRT and the target's GPU are here. A sealed bundle is built on
    the device itself, in memory, into an engine bundle sealed to the same device (model.kes): no plan,
    since a plan is the model in plaintext."""
    from .io import check_output_dir, staged_dir
    from .targets import load_target
    from .tensorrt import build_engine, write_build_plan

    tgt = load_target(target)
    if artifact.suffix == ".kes":
        check_output_dir(out, force)
        _build_sealed(artifact, tgt, out, timing_cache, _engine_blockers(tgt, plan_only),
                      _device_key(device_key, device_key_command, [artifact]), force)
        return
    art = _exported(artifact)
    manifest = art.manifest
    check_output_dir(out, force)
    reasons = _engine_blockers(tgt, plan_only)
    with staged_dir(out, force=force) as stage:
        plan = write_build_plan(art.path, manifest, tgt, stage)
        engine = None
        if not reasons:
            engine = build_engine(stage / "model.onnx", plan, tgt, stage, timing_cache)
    typer.echo(f"wrote the build plan for {tgt.name} in {out}: model.onnx, manifest.json, "
               "build_engine.sh, bench_engine.sh")
    typer.echo("  build on the device: " + " ".join(plan.trtexec_build))
    if engine is not None:
        typer.echo(f"built {out / engine.name} with TensorRT (manifest {engine.name}.json)")
    else:
        typer.echo("did not build an engine here: " + "; ".join(dict.fromkeys(reasons)))
    if tgt.experimental:
        typer.echo(f"note: target {tgt.name} is experimental")
    if manifest.contains_key:
        typer.echo(f"WARNING: {manifest.secret}", err=True)


def _engine_blockers(tgt, plan_only: bool) -> list[str]:
    """Why no engine can be built here for ``tgt`` (empty: it can)."""
    from .tensorrt import local_gpu_capability, tensorrt_available

    gpu = local_gpu_capability()
    reasons = []
    if plan_only:
        reasons.append("--plan-only")
    if tgt.is_jetson and gpu != "8.7":
        reasons.append(f"{tgt.name} engines are built on the Jetson itself")
    if not tensorrt_available():
        reasons.append("TensorRT is not installed here")
    if gpu is None:
        reasons.append("no CUDA GPU here")
    elif gpu not in tgt.compute_capabilities:
        reasons.append(f"the local GPU (compute capability {gpu}) is not a {tgt.name} GPU")
    return reasons


def _build_sealed(bundle: Path, tgt, out: Path, timing_cache: Path | None, reasons: list[str], device,
                  force: bool) -> None:
    """keyedge build on a sealed bundle: an engine built in memory, sealed again to the same device."""
    from .io import atomic_write_bytes, staged_dir
    from .seal import open_bundle
    from .tensorrt import build_sealed

    if reasons:
        raise KeyedgeError(f"a sealed bundle is built on its device, in memory, with TensorRT's Python API "
                           f"(a build plan would write the model in plaintext): {'; '.join(dict.fromkeys(reasons))}")
    opened = open_bundle(bundle, device)
    cache_in = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    data, cache = build_sealed(opened, device, tgt, cache_in)
    with staged_dir(out, force=force) as stage:
        atomic_write_bytes(stage / "model.kes", data, mode=0o600)
        (stage / tgt.timing_cache).write_bytes(cache)  # kernel timings only: no weights
    typer.echo(f"built a TensorRT engine for {tgt.name} from {bundle} in memory and sealed it to device "
               f"{device.fingerprint}: {out / 'model.kes'}")


@app.command()
@handles_errors
def bench(
    artifacts: list[Path] = typer.Argument(..., help="Artifacts: export dirs / .onnx, .engine, run dirs (torch)."),
    device: str = typer.Option("cpu", help="cpu, cuda, desktop, jetson-orin or jetson-orin-nano."),
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="bench.json, bench.md, latency.png."),
    key: Path | None = typer.Option(None, help="Key file (gather artifacts and keyed run directories)."),
    batch: str = typer.Option("1,8", help="Batch sizes (dynamic-batch artifacts; static ones use their own)."),
    rounds: int = typer.Option(5, min=1, help="Interleaved rounds."),
    iters: int = typer.Option(10, min=1, help="Timed iterations per model per round."),
    estimate: bool = typer.Option(False, help="Roofline floor for --target instead of measuring."),
    target: str = typer.Option("desktop", help="Target profile for --estimate."),
    device_key: Path | None = typer.Option(None, help=DEVICE_KEY_HELP),
    device_key_command: str | None = typer.Option(None, help=DEVICE_KEY_COMMAND_HELP),
    force: bool = typer.Option(False, help="Write into a non-empty --out directory (other files are kept)."),
) -> None:
    """Latency (p50/p90/p99) and throughput per backend, models interleaved, ratios vs plain
    (sealed bundles run from memory)."""
    from .artifacts import write_json
    from .bench import bench_markdown, bench_plot, roofline, run_bench
    from .io import atomic_write_text, check_output_dir, staged_dir

    batches = _batches(batch)
    if estimate:
        from .targets import load_target

        tgt = load_target(target)
        for a in artifacts:
            est = roofline(_exported(a).manifest, tgt, batches)
            typer.echo(f"{a} on {tgt.name} ({est['device']}, {est['precision']}): "
                       f"{est['flops_per_image'] / 1e9:.2f} GFLOP/image, {est['params'] / 1e6:.1f} M params")
            for row in est["batches"]:
                typer.echo(f"  batch {row['batch']}: floor {row['floor_ms']:.3f} ms ({row['bound']}-bound), "
                           f"at most {row['ceiling_images_per_s']:.0f} images/s")
        return
    from .keys import Key

    k = Key.load(key) if key else None
    check_output_dir(out, force)
    console = _console()
    results = run_bench(artifacts, key=k, device=device, batches=batches, rounds=rounds, iters=iters,
                        status=lambda s: console.print(f"[bold]bench[/]: {s}"),
                        device_key=_device_key(device_key, device_key_command, artifacts))
    with staged_dir(out, force=force) as stage:
        write_json(stage / "bench.json", results)
        atomic_write_text(stage / "bench.md", bench_markdown(results))
        bench_plot(results, stage / "latency.png")
    typer.echo(bench_markdown(results))


@app.command()
@handles_errors
def bindings(
    artifact_dir: Path = typer.Argument(..., help="An export (model.onnx) or build (model.engine) directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the C++ package."),
    name: str | None = typer.Option(None, help="Package name: the library, CMake package and install folders "
                                               "(default keyedge_<mode>_<fingerprint prefix>, unique per key)."),
    bundle: Path | None = typer.Option(None, help="The artifact sealed to its device (keyedge seal): the package "
                                                  "ships this bundle instead of the plaintext model."),
    force: bool = typer.Option(False, help="Write into a non-empty output directory (other files are kept)."),
) -> None:
    """Generate a C++17 package (keyedge::Model, CMake package, classify example) for an artifact."""
    from .bindings import render
    from .io import staged_dir

    with staged_dir(out, force=force) as stage:
        manifest, package = render(artifact_dir, stage, name, bundle)
    typer.echo(f"wrote the C++ package {package} for the {manifest.fold_mode} {manifest.precision} artifact "
               f"(key {manifest.key_fingerprint or 'none'}) to {out}"
               + (f"; it ships the sealed bundle {bundle.name} (load_sealed), no plaintext model" if bundle else ""))
    typer.echo(f"  cmake -S {out} -B {out}/build -DONNXRUNTIME_INCLUDE_DIR=... -DONNXRUNTIME_LIBRARY=... && "
               f"cmake --build {out}/build; then find_package({package}) and link keyedge::{package}")
    if manifest.contains_key and bundle is None:
        typer.echo(f"WARNING: {manifest.secret} (the package holds a copy; --bundle ships it sealed)", err=True)


@app.command()
@handles_errors
def audit(
    artifacts: list[Path] = typer.Argument(..., help="Artifacts to audit: export/build dirs, .onnx, .engine, run dirs."),
    base: Path = typer.Option(..., help="The public base the models were fine-tuned from (checkpoint or run dir)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.md, audit.json)."),
    key: Path | None = typer.Option(None, help="The true key: score what was recovered (entries, agreement, "
                                               "white-box robustness)."),
    queries: int = typer.Option(0, min=0, help="Queries the attacker may make of a run directory's deployed model "
                                                "(logit probes need C*M*M)."),
    fail_above: float | None = typer.Option(None, min=0.0, max=1.0,
                                            help="Release gate: exit 3 when any artifact leaks more than this "
                                                 "fraction of the key."),
    n: int = typer.Option(200, min=1, help="Real images for the functional scores."),
    data: str | None = typer.Option(None, help="'digits' or an ImageFolder root (default: the run's)."),
    seed: int = typer.Option(0),
    device_key: Path | None = typer.Option(None, help=DEVICE_KEY_HELP + " With it, a bundle is also audited "
                                                                      "as opened on its device."),
    device_key_command: str | None = typer.Option(None, help=DEVICE_KEY_COMMAND_HELP),
    force: bool = typer.Option(False, help="Write into a non-empty --out directory (other files are kept)."),
) -> None:
    """Key-leakage red team of the files a device holds; gates a release (exit 3 above --fail-above).

    Exit codes: 0 passed (or no gate), 2 bad input, 3 an artifact leaks more of the key than --fail-above.
    """
    from .artifacts import write_json
    from .audit import KeyLeak, audit as run_audit, audit_markdown
    from .io import atomic_write_text, check_output_dir, staged_dir
    from .keys import Key

    check_output_dir(out, force)
    k = Key.load(key) if key else None
    dk = _device_key(device_key, device_key_command, artifacts) if (device_key or device_key_command) else None
    report = run_audit(artifacts, base, k, queries=queries, n=n, data=data, seed=seed, device_key=dk)
    report["fail_above"] = fail_above
    leaks = [f for f in report["artifacts"] if fail_above is not None and f["leaked"] > fail_above]
    report["passed"] = not leaks
    with staged_dir(out, force=force) as stage:
        write_json(stage / "audit.json", report)
        atomic_write_text(stage / "report.md", audit_markdown(report, fail_above))
    for f in report["artifacts"]:
        leaked = "unknown" if f["fraction"] is None and f["holds_key"] is None else f"{100 * f['leaked']:.1f}%"
        typer.echo(f"{f['artifact']}: {f['kind']}; key leaked: {leaked}"
                   + (f"; white-box robust {100 * f['whitebox_robust']:.1f}%" if f["whitebox_robust"] is not None
                      else "") + f" ({f['method']})")
    typer.echo(f"wrote {out / 'report.md'} and {out / 'audit.json'}")
    if leaks:
        raise KeyLeak(f"{len(leaks)} artifact(s) leak more than {fail_above:.2f} of the key: "
                      + ", ".join(f["artifact"] for f in leaks))


@device_app.command("keygen")
@handles_errors
def device_keygen(
    out: Path = typer.Option(..., "--out", "-o", help="Private key file to write (0600); the public key goes "
                                                     "beside it as .pub."),
    pub: Path | None = typer.Option(None, help="Public key file (default: OUT with suffix .pub)."),
    force: bool = typer.Option(False, help="Overwrite existing key files."),
) -> None:
    """Make a device key pair; prints its fingerprint, never the private key."""
    from .io import atomic_write_bytes
    from .seal import DeviceKey

    pub = pub or out.with_suffix(".pub")
    if not force and (out.exists() or pub.exists()):
        raise KeyedgeError(f"{out if out.exists() else pub} exists; pass --force to overwrite it")
    key = DeviceKey.generate()
    atomic_write_bytes(pub, key.public.to_bytes(), mode=0o644, overwrite=force)
    key.save(out, overwrite=force)
    typer.echo(f"wrote {out} (private, 0600) and {pub} (public); device fingerprint {key.fingerprint}")
    typer.echo("keep the private key off the disk where the device allows: see the README's sealing section")


@app.command()
@handles_errors
def seal(
    artifact: Path = typer.Argument(..., help="An export or build directory (model.onnx or model.engine)."),
    to: Path = typer.Option(..., "--to", help="The device's public key (device.pub)."),
    out: Path = typer.Option(..., "--out", "-o", help="The sealed bundle to write (.kes, 0600)."),
    key: Path | None = typer.Option(None, help="The artifact's key: sealed with gather / kernel artifacts, "
                                               "which take it at run time."),
    force: bool = typer.Option(False, help="Overwrite an existing bundle."),
) -> None:
    """Seal an artifact to one device: libsodium sealed box (content key) + AES-256-GCM STREAM (payload)."""
    from .io import atomic_write_bytes
    from .keys import Key
    from .seal import SUFFIX, DevicePublicKey, seal_artifact

    if out.suffix != SUFFIX:
        raise KeyedgeError(f"a sealed bundle is named *{SUFFIX}, not {out.name}")
    if out.exists() and not force:
        raise KeyedgeError(f"{out} exists; pass --force to overwrite it")
    data, summary = seal_artifact(artifact, DevicePublicKey.load(to), Key.load(key) if key else None)
    atomic_write_bytes(out, data, mode=0o600, overwrite=force)
    typer.echo(f"wrote {out} ({len(data):,} bytes): {summary['model']} ({summary['fold_mode']}, "
               f"{summary['precision']}) sealed to device {summary['recipient']}"
               + ("; it holds the key, opened only in memory on that device" if summary["holds_key"] else ""))


@app.command()
@handles_errors
def unseal(
    bundle: Path = typer.Argument(..., help="A sealed .kes bundle."),
    device_key: Path | None = typer.Option(None, help=DEVICE_KEY_HELP),
    device_key_command: str | None = typer.Option(None, help=DEVICE_KEY_COMMAND_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Directory for the plaintext files."),
    write_plaintext: bool = typer.Option(False, help="Really write the model (and key) in plaintext to --out "
                                                     "(debugging only)."),
    force: bool = typer.Option(False, help="Write into a non-empty --out directory."),
) -> None:
    """Debugging: check a bundle opens with this device key and list it; write plaintext only when asked."""
    from .io import atomic_write_bytes, check_output_dir, staged_dir
    from .seal import open_bundle, read_device_key

    if write_plaintext and out is None:
        raise KeyedgeError("--write-plaintext needs --out DIR")
    if out is not None and not write_plaintext:
        raise KeyedgeError("writing a bundle's plaintext to disk defeats sealing: pass --write-plaintext to do it")
    if out is not None:
        check_output_dir(out, force)
    opened = open_bundle(bundle, read_device_key(device_key, device_key_command))
    try:
        spans = opened.plain.spans
        typer.echo(f"{bundle}: opens on this device; " + ", ".join(f"{name} ({size:,} bytes)"
                                                                   for name, (_, size) in spans.items()))
        if out is not None:
            with staged_dir(out, force=force) as stage:
                for name in spans:
                    atomic_write_bytes(stage / name, opened.plain.read(name), mode=0o600)
            typer.echo(f"WARNING: wrote the plaintext to {out}: it is as secret as the device's key", err=True)
    finally:
        opened.wipe()


def main() -> None:
    app(prog_name="keyedge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
