"""The ``keyedge`` command line: each command parses its options and calls one library function.

Defaults and choices come from the library's config dataclasses and ``Literal`` types (modules that
load no torch); errors (:class:`~keyedge.core.errors.KeyedgeError`) become one line on stderr and the
error's exit code. A command imports its workflow when it runs, so ``keyedge --help`` loads no torch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from .checks.config import DEFAULT_TOLERANCE, BenchConfig, BenchDevice, ParityConfig
from .core.errors import KeyedgeError
from .core.manifests import (Backend, EnsembleForm, FoldMode, InferencePrecision, InputKind, Int8Method, Layout,
                             Precision, Runtime, TrainMode)
from .deploy.config import ExportOptions
from .redteam.config import AuditConfig, AutoAttackVersion, EvalConfig, Threat
from .training.config import TrainConfig
from .workflows.config import DemoConfig

# the defaults of every option (one source: the library's config dataclasses)
T, E, X, P = TrainConfig(), EvalConfig(), ExportOptions(), ParityConfig()
A, B, D = AuditConfig(), BenchConfig(), DemoConfig()

def one_line(message: str) -> str:
    return "; ".join(filter(None, map(str.strip, str(message).splitlines())))


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a bad option value, a missing argument) are one line on stderr and
    exit code 2, like every other bad input; help, ``--help`` and exit codes are unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # a group without a command: its help
                typer.echo(exc.format_message(), err=True)
            else:
                where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                typer.echo(f"keyedge: error: {one_line(exc.format_message())}{where}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(help="keyedge: key-based adversarially defended ViTs, from secret key to edge-GPU engine.",
                  cls=OneLineErrors, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
key_app = typer.Typer(help="Key files: inspect (never prints the key), export-perm for gather engines.",
                      no_args_is_help=True)
device_app = typer.Typer(help="Device identity: the key pair a sealed bundle is encrypted to.", no_args_is_help=True)
app.add_typer(key_app, name="key")
app.add_typer(device_app, name="device")
publisher_app = typer.Typer(help="Publisher identity: the Ed25519 key that signs every sealed bundle.",
                            no_args_is_help=True)
app.add_typer(publisher_app, name="publisher")
fleet_app = typer.Typer(help="A fleet of devices: one key, adapter and signed, sealed model each, in a database.",
                        no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")

OUT = dict(help="Output directory.")
FORCE = typer.Option(False, help="Write into a non-empty output directory (only the files keyedge writes there "
                                 "are replaced; the others are kept).")
OVERWRITE = typer.Option(False, "--force", help="Overwrite an existing file.")
KEY = typer.Option(None, help="The key file (checked against the artifact's fingerprint).")
BACKEND = typer.Option("onnxruntime", help="What runs ONNX artifacts on the CPU: onnxruntime, or openvino "
                                            "(pip install 'keyedge[openvino]').")
INFERENCE_PRECISION = typer.Option(None, help="--backend openvino: execute in fp32 (the default), or in bf16 (CPUs "
                                                "with AMX or AVX512-BF16; held to the bf16 parity rule).")
CPU_TARGET = typer.Option(None, help="An OpenVINO CPU target profile (cpu-x86 or a .toml): --backend openvino in its "
                                     "inference precision (auto: bf16 where the CPU has it).")
DEVICE_KEY = typer.Option(None, help="The device's private key for sealed .kes bundles: a file, or - for stdin.")
DEVICE_KEY_COMMAND = typer.Option(None, help="A command printing the device's private key (e.g. from OP-TEE secure "
                                             "storage or a TPM); default: $KEYEDGE_DEVICE_KEY_COMMAND.")
TRUST = typer.Option([], "--trust", help="A publisher's public key (publisher.pub) whose signed bundles open here; "
                                         "repeatable (key rotation); also $KEYEDGE_TRUSTED_PUBLISHERS.")
ALLOW_UNSIGNED = typer.Option(False, help="Also open bundles no publisher signed: DEVELOPMENT ONLY (anyone holding "
                                          "the device's public key can make one).")
SIGN_WITH = typer.Option(None, help="The publisher's signing key (keyedge publisher keygen; - for stdin).")


def access(device_key: Path | None, device_key_command: str | None, trust: list[Path], allow_unsigned: bool):
    """What opens sealed bundles, from the options of a command that reads them."""
    from .runtime.bundle import DeviceAccess

    return DeviceAccess(device_key, device_key_command, tuple(trust), allow_unsigned)


def cpu_backend(target: str | None, backend: Backend, inference_precision: InferencePrecision | None
                ) -> tuple[Backend, InferencePrecision]:
    """What ``--target`` (an OpenVINO CPU profile) makes of --backend and --inference-precision (one given
    explicitly wins); without it, they are as given (fp32 where none is)."""
    if target is None:
        return backend, inference_precision or "fp32"
    from .workflows.openvino_export import cpu_target

    _, hint = cpu_target(target)
    return "openvino", inference_precision or hint


def command(group: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose :class:`KeyedgeError` becomes one line on stderr and its exit code."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyedgeError as exc:  # one line, whatever a library put in the message
                typer.echo(f"keyedge: error: {one_line(str(exc))}", err=True)
                raise typer.Exit(exc.exit_code) from None
            except OSError as exc:  # the machine's fault, not the input's (a full disk): one line, exit 1
                where = f": {exc.filename}" if exc.filename else ""
                typer.echo(f"keyedge: error: {one_line(exc.strerror or str(exc))}{where}", err=True)
                raise typer.Exit(1) from None
        group.command(name)(wrapper)
        return fn
    return register


def ints(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (``--batch 1,8``)."""
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise KeyedgeError(f"{option} takes a comma-separated list of integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise KeyedgeError(f"{option} values must be >= 1")
    return values


def csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


@command(app)
def keygen(out: Path = typer.Option(..., "-o", "--out", help="Key file to write (0600, atomic)."),
           block_size: int = typer.Option(..., "--block-size", "-m", min=1, max=64,
                                          help="Block size M: the key permutes the M*M*C values of each block."),
           channels: int = typer.Option(3, min=1, max=16, help="Image channels C."),
           force: bool = OVERWRITE,
           insecure_seed: int | None = typer.Option(None, help="Draw from a seeded generator (tests only; recorded "
                                                               "as insecure)."),
           insecure_small_key: bool = typer.Option(False, help="Allow a key space below 2^128 keys (experiments "
                                                               "only: a search finds such a key; recorded)."),
           ensemble: int | None = typer.Option(None, min=2, max=64, help="Draw N keys into one key set: a random "
                                                                          "ensemble's, one key per member.")) -> None:
    """Generate a new secret key (and its random key ID) from the operating system's CSPRNG."""
    from .workflows.keys import keygen as run

    run(out, block_size, channels, force=force, insecure_seed=insecure_seed, insecure_small_key=insecure_small_key,
        members=ensemble)


@command(key_app, "inspect")
def key_inspect(path: Path = typer.Argument(..., help="Key file.")) -> None:
    """Show a key's block size, channels, key-space size and fingerprint."""
    from .workflows.keys import inspect

    inspect(path)


@command(key_app, "export-perm")
def key_export_perm(path: Path = typer.Argument(..., help="Key file."),
                    out: Path = typer.Option(..., "--out", "-o", help="Raw little-endian int64 permutation (0600)."),
                    force: bool = OVERWRITE) -> None:
    """Write the permutation as raw int64 (a gather engine's key_perm input for trtexec); secret, 0600."""
    from .workflows.keys import export_perm

    export_perm(path, out, force=force)


@command(app)
def train(out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
          model: str = typer.Option(T.model, help="timm model name."),
          checkpoint: Path | None = typer.Option(None, help="Base weights (.safetensors/.pth/.npz), offline."),
          pretrained: bool = typer.Option(T.pretrained, help="Base weights from the Hugging Face hub (needs network)."),
          data: str = typer.Option(T.data, help="'digits' (built in) or an ImageFolder root with train/ and val/."),
          key: Path | None = typer.Option(None, help="Key file; omit for a plain (un-keyed) fine-tune."),
          mode: TrainMode = typer.Option(T.mode, help="full: all weights; lora: LoRA adapters + head."),
          epochs: int = typer.Option(T.epochs, min=1),
          batch_size: int = typer.Option(T.batch_size, min=1, help="Per-process batch size."),
          lr: float = typer.Option(T.lr, help="Peak learning rate (AdamW, warm-up + cosine)."),
          weight_decay: float = typer.Option(T.weight_decay),
          warmup_epochs: float = typer.Option(T.warmup_epochs),
          accum_steps: int = typer.Option(T.accum_steps, min=1, help="Gradient accumulation steps."),
          num_classes: int | None = typer.Option(None, help="Classes (default: the model's)."),
          img_size: int | None = typer.Option(None, help="Input size override."),
          patch_size: int | None = typer.Option(None, help="Patch size override."),
          depth: int | None = typer.Option(None, help="Transformer depth override (small models)."),
          embed_dim: int | None = typer.Option(None, help="Width override (small models)."),
          heads: int | None = typer.Option(None, help="Attention heads override (small models)."),
          lora_rank: int = typer.Option(T.lora_rank, min=1),
          lora_alpha: float = typer.Option(T.lora_alpha),
          lora_dropout: float = typer.Option(T.lora_dropout),
          lora_targets: str = typer.Option(",".join(T.lora_targets), help="Layer names inside blocks (comma list)."),
          lora_patch_embed: bool = typer.Option(T.lora_patch_embed, help="Also train the patch embedding fully."),
          amp: bool = typer.Option(T.amp, help="Mixed precision on GPU."),
          seed: int = typer.Option(T.seed),
          workers: int = typer.Option(T.workers, help="Data loader workers (ImageFolder)."),
          resume: bool = typer.Option(T.resume, help="Continue from the run's last epoch checkpoint."),
          ensemble: int | None = typer.Option(None, min=2, max=64, help="Train a random ensemble of N keyed "
                                              "members, one per key of the key set --key (keygen --ensemble N)."),
          force: bool = FORCE) -> None:
    """Fine-tune a keyed (or plain) ViT from a base checkpoint; torchrun for multi-GPU."""
    from rich.console import Console

    from .training.train import train as run

    kwargs = {k: v for k, v in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", heads)) if v is not None}
    cfg = TrainConfig(model=model, out=str(out), data=data, key=str(key) if key else None,
                      checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained, mode=mode,
                      num_classes=num_classes, img_size=img_size, patch_size=patch_size, model_kwargs=kwargs,
                      epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, accum_steps=accum_steps, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      lora_targets=tuple(t for t in lora_targets.split(",") if t), lora_patch_embed=lora_patch_embed,
                      amp=amp, seed=seed, workers=workers, resume=resume, force=force)
    if ensemble is not None:
        from .workflows.ensemble import train_ensemble

        train_ensemble(cfg, ensemble, console=Console(stderr=True))
        return
    manifest = run(cfg, console=Console(stderr=True))
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun: rank 0 reports
        m = manifest
        typer.echo(f"wrote {out}: test accuracy {m.metrics['test_acc']:.4f} after {m.epochs_done} epochs\n"
                   f"trainable parameters: {m.trainable_params:,} of {m.total_params:,}\n"
                   f"per-key storage: {m.per_key_bytes:,} bytes (full model {m.full_model_bytes:,} bytes)")


@command(app, "eval")
def evaluate_cmd(
        run: Path = typer.Argument(..., help="Keyed (or plain) run directory."),
        key: Path | None = KEY,
        out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.md, results.json, plots)."),
        data: str | None = typer.Option(None, help="'digits' or an ImageFolder root, val/ (default: the run's)."),
        base: Path | None = typer.Option(None, help="Public base classifier (run dir or checkpoint); default: the "
                                                    "run's base checkpoint."),
        plain_ft: Path | None = typer.Option(None, help="A plain fine-tune of the base (run dir): another surrogate."),
        n: int = typer.Option(E.n, min=1, help="Test images."),
        threat: Threat = typer.Option("small", help="small (l_inf 8/255, l_2 0.5) or imagenet (l_inf 4/255, l_2 3.0, "
                                                    "AutoAttack standard)."),
        eps: float | None = typer.Option(None, help="l_inf eps in [0,1] units (default: the threat's)."),
        l2_eps: float | None = typer.Option(None, help="l_2 eps (default: the threat's)."),
        steps: int | None = typer.Option(None, help="PGD steps."),
        step_size: float | None = typer.Option(None, help="l_inf PGD step."),
        random_start: bool = typer.Option(E.random_start),
        autoattack: AutoAttackVersion | None = typer.Option(None, help="quick: APGD-CE + APGD-DLR; standard: all "
                                                                       "(default: the threat's)."),
        eot_samples: int = typer.Option(E.eot_samples, min=1, help="Random keys per EOT step."),
        key_search_random: int = typer.Option(E.key_search_random, min=0, help="Random keys the key search tries."),
        key_search_swaps: int = typer.Option(E.key_search_swaps, min=0, help="Greedy pair swaps after it."),
        restarts: int = typer.Option(E.restarts, min=1, help="Random restarts of transfer / adaptive PGD."),
        whitebox_steps: str = typer.Option(csv(E.whitebox_steps), help="White-box PGD steps reported (convergence)."),
        queries: str = typer.Option(csv(E.query_budgets), help="Query budgets per image for Square and HopSkipJump "
                                                                "('' for none)."),
        query_n: int = typer.Option(E.query_n, min=1, help="Images the query attacks (and the threat table) use."),
        artifact: Path | None = typer.Option(None, help="The deployed artifact the query attacks query (default: the "
                                                        "run itself), e.g. its exported fused ONNX."),
        own_key: list[Path] = typer.Option([], help="Keyed fine-tunes of the base with the attacker's own keys (run "
                                                    "dirs, their keys beside them as key.bin): MI-DI ensemble."),
        seed: int = typer.Option(E.seed, help="Seeds the images drawn and every attack's randomness."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        force: bool = FORCE) -> None:
    """Clean and robust accuracy against every attacker: transfer, score and label-only queries, a copy of
    the files, un-fused weights + queries, and the key (white-box)."""
    from .workflows.evaluation import evaluate_run

    overrides: dict[str, Any] = {k: v for k, v in (("linf_eps", eps), ("l2_eps", l2_eps), ("steps", steps),
                                                   ("step_size", step_size), ("autoattack", autoattack))
                                 if v is not None}
    cfg = EvalConfig.for_threat(threat, **overrides, n=n, random_start=random_start, eot_samples=eot_samples,
                                key_search_random=key_search_random, key_search_swaps=key_search_swaps, seed=seed,
                                restarts=restarts,
                                whitebox_steps=ints(whitebox_steps, "--whitebox-steps"),
                                query_budgets=ints(queries, "--queries") if queries.strip() else (), query_n=query_n)
    evaluate_run(run, key, out, cfg, data=data, base=base, plain_ft=plain_ft, own_keys=own_key, artifact=artifact,
                 device=device, force=force)


@command(app)
def demo(out: Path = typer.Option(Path(D.out), "--out", "-o", **OUT),
         seed: int = typer.Option(D.seed, help="Training seed (the key itself always comes from the CSPRNG)."),
         quick: bool = typer.Option(False, help="A smoke version with tiny budgets."),
         force: bool = FORCE) -> None:
    """The main job: the whole keyed-ViT defense on the built-in digits data."""
    from .workflows.demo import run_demo

    run_demo(DemoConfig.quick(str(out), seed=seed, force=force) if quick else
             DemoConfig(out=str(out), seed=seed, force=force))


@command(app, "export")
def export_cmd(
        run: Path = typer.Argument(..., help="Keyed run directory (full weights or a LoRA adapter)."),
        key: Path | None = KEY,
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (model.onnx, manifest.json)."),
        mode: FoldMode | None = typer.Option(None, help="fused: fold the key into the patch embedding (default when "
                                                        "M divides the patch size); gather: an ONNX Gather; kernel: "
                                                        "the runtime's CUDA kernel (or its CPU twin) gathers, with "
                                                        "--input uint8 --layout nhwc."),
        embed_key: bool = typer.Option(X.embed_key, help="gather: bake the key in as a constant (default: an input)."),
        input: InputKind = typer.Option(X.input, help="float ([0,1]) or uint8 ([0,255]) images."),
        layout: Layout = typer.Option(X.layout),
        batch: int = typer.Option(X.batch, min=1, help="Static batch size."),
        dynamic_batch: bool = typer.Option(False, help="Dynamic batch dimension instead of --batch."),
        precision: Precision | None = typer.Option(None, help="fp32 (the default); fp16 (weights/compute, fp32 "
                                                                     "I/O); int8 (CPU: ONNX Runtime's; --runtime "
                                                                     "openvino: NNCF's)."),
        int8_method: Int8Method = typer.Option(X.int8_method, help="int8: dynamic, or static with calibration."),
        calibration_n: int = typer.Option(X.calibration_n, min=1, help="Calibration images for static int8."),
        opset: int = typer.Option(X.opset, min=17),
        runtime: Runtime = typer.Option("onnxruntime", help="onnxruntime: ONNX; openvino: OpenVINO IR for x86 CPUs "
                                                            "(from the verified ONNX; --precision int8 by NNCF, "
                                                            "calibrated on the run's keyed training images)."),
        inference_precision: InferencePrecision | None = typer.Option(
            None, help="--runtime openvino: the precision the IR executes in (fp32, the default; bf16: AMX or "
                       "AVX512-BF16; held to parity's rule before writing)."),
        parity_n: int = typer.Option(200, min=0, help="--runtime openvino in int8 or bf16: test images of the parity "
                                                      "gate (clean and adversarial); 0 writes the IR unchecked."),
        target: str | None = typer.Option(None, help="An OpenVINO CPU target profile (cpu-x86 or a .toml): --runtime "
                                                     "openvino in the profile's precision and inference precision "
                                                     "(the options win where they are given)."),
        ensemble_form: EnsembleForm | None = typer.Option(None, help="A random ensemble's run: gathered (one graph: "
                                                          "the base once, each member's folded patch embedding, LoRA "
                                                          "deltas and head, any batch; LoRA members' default) or "
                                                          "separate (each member's merged model; full fine-tunes)."),
        force: bool = FORCE) -> None:
    """Merge LoRA, fold the key (or keep a gather), export ONNX and verify it with ONNX Runtime (or, --runtime
    openvino, OpenVINO IR verified with OpenVINO)."""
    from .core.ensemble import is_ensemble
    from .workflows.export import export_run

    opts = ExportOptions(mode=mode, input=input, layout=layout, batch=None if dynamic_batch else batch,
                         embed_key=embed_key, precision=precision or X.precision, int8_method=int8_method,
                         calibration_n=calibration_n, opset=opset)
    if target is not None:
        from .workflows.openvino_export import cpu_target

        profile, hint = cpu_target(target)
        runtime = "openvino"
        opts.precision = precision or profile.precision  # type: ignore[assignment]
        inference_precision = inference_precision or hint
    if runtime == "openvino":
        from .workflows.openvino_export import export_ir

        if is_ensemble(run) or ensemble_form is not None:
            raise KeyedgeError(f"{run}: a random ensemble is exported to ONNX (its runner is ONNX Runtime's)")
        export_ir(run, key, out, opts, inference_precision=inference_precision or "fp32", parity_n=parity_n,
                  force=force)
    elif inference_precision is not None:
        raise KeyedgeError("--inference-precision applies to --runtime openvino")
    elif is_ensemble(run):
        from .workflows.ensemble import export_ensemble

        if key is None:
            raise KeyedgeError(f"{run} is a random ensemble: pass its key set with --key")
        export_ensemble(run, key, out, opts, form=ensemble_form, force=force)
    elif ensemble_form is not None:
        raise KeyedgeError(f"{run} is not a random ensemble's run: --ensemble-form does not apply")
    else:
        export_run(run, key, out, opts, force=force)


@command(app)
def parity(artifacts: list[Path] = typer.Argument(..., help="Artifacts to check (.onnx, .engine, .kes, run dirs)."),
           reference: Path = typer.Option(..., help="The keyed PyTorch reference run directory."),
           key: Path | None = KEY,
           out: Path | None = typer.Option(None, "--out", "-o", help="Write parity.md, parity.json, adversarial.npz."),
           data: str | None = typer.Option(None, help="'digits' or an ImageFolder root (default: the run's)."),
           n: int = typer.Option(P.n, min=1, help="Images."),
           base: Path | None = typer.Option(None, help="Public base for transfer attacks (default: the run's base)."),
           tolerance_fp32: float = typer.Option(100 * DEFAULT_TOLERANCE["fp32"].accuracy,
                                                help="Allowed accuracy difference, points."),
           tolerance_fp16: float = typer.Option(100 * DEFAULT_TOLERANCE["fp16"].accuracy),
           tolerance_int8: float = typer.Option(100 * DEFAULT_TOLERANCE["int8"].accuracy),
           backend: Backend = BACKEND, inference_precision: InferencePrecision | None = INFERENCE_PRECISION,
           target: str | None = CPU_TARGET,
           device_key: Path | None = DEVICE_KEY, device_key_command: str | None = DEVICE_KEY_COMMAND,
           trust: list[Path] = TRUST, allow_unsigned: bool = ALLOW_UNSIGNED,
           force: bool = FORCE) -> None:
    """Prove that artifacts (sealed bundles too) keep the reference's clean and adversarial accuracy
    (exit 1 if not). int8 differs between CPUs: check it on the deploying one."""
    from .workflows.parity import run_parity

    backend, inference_precision = cpu_backend(target, backend, inference_precision)
    cfg = ParityConfig(n=n).with_accuracy({"fp32": tolerance_fp32, "fp16": tolerance_fp16, "int8": tolerance_int8})
    report = run_parity(reference, key, artifacts, out, data=data, base=base, cfg=cfg, force=force,
                        access=access(device_key, device_key_command, trust, allow_unsigned), backend=backend,
                        inference_precision=inference_precision)
    if not report["passed"]:
        raise typer.Exit(1)


@command(app)
def build(artifact: Path = typer.Argument(..., help="An exported artifact (directory or model.onnx), or a sealed "
                                                    "bundle of one (built on the device, in memory)."),
          target: str = typer.Option(..., help="Target profile: desktop, jetson-orin, jetson-orin-nano, ... or .toml."),
          out: Path = typer.Option(..., "--out", "-o", **OUT),
          timing_cache: Path | None = typer.Option(None, help="A timing cache to reuse (and update)."),
          plan_only: bool = typer.Option(False, help="Write the on-device build plan only."),
          device_key: Path | None = DEVICE_KEY, device_key_command: str | None = DEVICE_KEY_COMMAND,
          trust: list[Path] = TRUST, allow_unsigned: bool = ALLOW_UNSIGNED,
          sign_with: Path | None = typer.Option(None, help="The publisher's signing key for the engine bundle built "
                                                            "from a sealed one (build it where that key is)."),
          force: bool = FORCE) -> None:
    """Build a TensorRT engine for a target: with its on-device build plan, or from a sealed bundle.

    An exported artifact always gets its build plan (model.onnx, build_engine.sh with the exact trtexec
    command), and the engine where TensorRT and the target's GPU are here. A sealed bundle is built on
    the device itself, in memory, into an engine bundle sealed to the same device (model.kes): no plan,
    since a plan is the model in plaintext."""
    from .workflows.build import build as run

    run(artifact, target, out, timing_cache=timing_cache, plan_only=plan_only,
        access=access(device_key, device_key_command, trust, allow_unsigned), sign_with=sign_with, force=force)


@command(app)
def bench(artifacts: list[Path] = typer.Argument(..., help="Artifacts: export dirs / .onnx, .engine, .kes, run dirs."),
          device: BenchDevice = typer.Option(B.device, help="Where to measure."),
          out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="bench.json, bench.md, latency.png."),
          key: Path | None = typer.Option(None, help="Key file (gather artifacts and keyed run directories)."),
          batch: str = typer.Option(csv(B.batches), help="Batch sizes (of dynamic-batch artifacts)."),
          rounds: int = typer.Option(B.rounds, min=1, help="Interleaved rounds."),
          iters: int = typer.Option(B.iters, min=1, help="Timed iterations per model per round."),
          estimate: bool = typer.Option(False, help="Roofline floor for --target instead of measuring."),
          target: str | None = typer.Option(None, help="--estimate: a TensorRT target profile (default desktop); "
                                                       "else an OpenVINO CPU target (cpu-x86): --backend openvino in "
                                                       "its inference precision."),
          ensemble_draw: int | None = typer.Option(None, min=1, help="A random ensemble: members drawn from the OS "
                                                                     "CSPRNG to answer each query (default 1)."),
          query_noise: float | None = typer.Option(None, help="RND: Gaussian noise of this standard deviation "
                                                              "([0,1] image scale) added to every query."),
          backend: Backend = BACKEND, inference_precision: InferencePrecision | None = INFERENCE_PRECISION,
          device_key: Path | None = DEVICE_KEY, device_key_command: str | None = DEVICE_KEY_COMMAND,
          trust: list[Path] = TRUST, allow_unsigned: bool = ALLOW_UNSIGNED,
          force: bool = FORCE) -> None:
    """Latency (p50/p90/p99) and throughput per backend, models interleaved, ratios vs plain
    (sealed bundles run from memory)."""
    from .workflows import bench as workflow

    batches = ints(batch, "--batch")
    if estimate:
        workflow.estimate(artifacts, target or "desktop", batches)
        return
    backend, inference_precision = cpu_backend(target, backend, inference_precision)
    workflow.bench(artifacts, out, BenchConfig(device=device, batches=batches, rounds=rounds, iters=iters,
                                               ensemble_draw=ensemble_draw, query_noise=query_noise,
                                               backend=backend, inference_precision=inference_precision),
                   key_path=key, access=access(device_key, device_key_command, trust, allow_unsigned), force=force)


@command(app)
def bindings(artifact_dir: Path = typer.Argument(..., help="An export (model.onnx) or build (model.engine) directory."),
             out: Path = typer.Option(..., "--out", "-o", help="Where to write the C++ package."),
             name: str | None = typer.Option(None, help="Package name: the library, CMake package and install folders "
                                                        "(default keyedge_<mode>_<fingerprint prefix>)."),
             bundle: Path | None = typer.Option(None, help="The artifact sealed to its device (keyedge seal): the "
                                                           "package ships it instead of the plaintext model."),
             trust: list[Path] = typer.Option([], "--trust", help="A publisher's public key compiled into the package: "
                                                                  "load_sealed opens bundles it signed; repeatable."),
             force: bool = FORCE) -> None:
    """Generate a C++17 package (keyedge::Model, CMake package, classify example) for an artifact."""
    from .deploy.bindings import write_package
    from .runtime.bundle import PublisherPublicKey

    write_package(artifact_dir, out, name, bundle, trusted=[PublisherPublicKey.load(t).raw for t in trust],
                  force=force)


@command(app)
def audit(artifacts: list[Path] = typer.Argument(..., help="Artifacts: export/build dirs, .onnx, .engine, .kes, runs."),
          base: Path = typer.Option(..., help="The public base the models were fine-tuned from (checkpoint or run)."),
          out: Path = typer.Option(..., "--out", "-o", help="Report directory (report.md, audit.json)."),
          key: Path | None = typer.Option(None, help="The true key (a random ensemble's: its key set): score what "
                                                     "was recovered (entries, agreement, white-box robustness)."),
          queries: int = typer.Option(A.queries, min=0, help="Queries of a run directory's deployed model (logit "
                                                             "probes need C*M*M)."),
          fail_above: float | None = typer.Option(A.fail_above, min=0.0, max=1.0, help="Release gate: exit 3 when any "
                                                  "artifact leaks more than this fraction of the key."),
          n: int = typer.Option(A.n, min=1, help="Real images for the functional scores."),
          data: str | None = typer.Option(None, help="'digits' or an ImageFolder root (default: the run's)."),
          seed: int = typer.Option(A.seed),
          device_key: Path | None = typer.Option(None, help="The device's private key (a file, or -): a bundle is "
                                                            "also audited as opened on its device."),
          device_key_command: str | None = DEVICE_KEY_COMMAND,
          trust: list[Path] = TRUST, allow_unsigned: bool = ALLOW_UNSIGNED,
          force: bool = FORCE) -> None:
    """Key-leakage red team of the files a device holds; gates a release (exit 3 above --fail-above).

    Exit codes: 0 passed (or no gate), 2 bad input, 3 an artifact leaks more of the key than --fail-above.
    """
    from .workflows.audit import audit_release

    audit_release(artifacts, base, key, out, AuditConfig(queries=queries, n=n, seed=seed, fail_above=fail_above),
                  data=data, access=access(device_key, device_key_command, trust, allow_unsigned)
                  if device_key or device_key_command else None, force=force)


@command(device_app, "keygen")
def device_keygen(out: Path = typer.Option(..., "--out", "-o", help="Private key file to write (0600); the public "
                                                                   "key goes beside it as .pub."),
                  pub: Path | None = typer.Option(None, help="Public key file (default: OUT with suffix .pub)."),
                  force: bool = OVERWRITE) -> None:
    """Make a device key pair; prints its fingerprint, never the private key."""
    from .workflows.keys import device_keygen as run

    run(out, pub, force=force)


@command(publisher_app, "keygen")
def publisher_keygen(out: Path = typer.Option(..., "--out", "-o", help="Signing key file to write (0600); the public "
                                                                       "key goes beside it as .pub."),
                     pub: Path | None = typer.Option(None, help="Public key file (default: OUT with suffix .pub)."),
                     force: bool = OVERWRITE) -> None:
    """Make the publisher's Ed25519 key pair (signs bundles); prints its fingerprint, never the private key."""
    from .workflows.keys import publisher_keygen as run

    run(out, pub, force=force)


@command(app)
def seal(artifact: Path = typer.Argument(..., help="An export or build directory (model.onnx or model.engine)."),
         to: Path = typer.Option(..., "--to", help="The device's public key (device.pub)."),
         out: Path = typer.Option(..., "--out", "-o", help="The sealed bundle to write (.kes, 0600)."),
         key: Path | None = typer.Option(None, help="The artifact's key: sealed with gather / kernel artifacts, "
                                                    "which take it at run time."),
         sign_with: Path | None = SIGN_WITH,
         allow_unsigned: bool = typer.Option(False, help="Seal without a signature: DEVELOPMENT ONLY (devices refuse "
                                                         "it unless they allow unsigned bundles)."),
         force: bool = OVERWRITE) -> None:
    """Seal an artifact to one device, signed by its publisher: libsodium sealed box (content key) +
    AES-256-GCM STREAM (payload) + Ed25519 signature (publisher)."""
    from .workflows.sealing import seal_to

    seal_to(artifact, to, out, key, sign_with=sign_with, allow_unsigned=allow_unsigned, force=force)


@command(app)
def unseal(bundle: Path = typer.Argument(..., help="A sealed .kes bundle."),
           device_key: Path | None = DEVICE_KEY, device_key_command: str | None = DEVICE_KEY_COMMAND,
           trust: list[Path] = TRUST, allow_unsigned: bool = ALLOW_UNSIGNED,
           out: Path | None = typer.Option(None, "--out", "-o", help="A new or empty directory for the plaintext "
                                                                     "files (never overwritten)."),
           write_plaintext: bool = typer.Option(False, help="Really write the model (and key) in plaintext to --out "
                                                            "(debugging only).")) -> None:
    """Debugging: check a bundle's publisher and that it opens with this device key, and list it; write
    plaintext only when asked."""
    from .workflows.sealing import unseal as run

    run(bundle, out, access=access(device_key, device_key_command, trust, allow_unsigned),
        write_plaintext=write_plaintext)


DB = typer.Option("fleet.db", "--db", help="The fleet database: a SQLite file, or a SQLAlchemy URL "
                                           "(postgresql+psycopg://...).")
MASTER_KEY = typer.Option(None, "--master-key", help="The operator's master key of the vault (a file, or -); "
                                                     "default: $KEYEDGE_MASTER_KEY_COMMAND's output.")
MASTER_KEY_COMMAND = typer.Option(None, help="A command printing the master key (e.g. from a TPM or an HSM).")
RUNS = typer.Option(Path("fleet-runs"), help="Where each device's run goes (0700; keyed weights).")
RELEASES = typer.Option(Path("fleet-releases"), "--out", help="Where each device's releases go (0700): "
                                                              "bundles and reports.")
LEASE = typer.Option(60.0, "--lease-seconds", min=1.0, help="The lease's length; renewed every third.")


@command(fleet_app, "init")
def fleet_init(db: str = DB,
               base: Path = typer.Option(..., help="The public pre-trained base checkpoint (pinned by SHA-256)."),
               model: str = typer.Option(T.model, help="timm model name."),
               data: str = typer.Option(T.data, help="'digits' (built in) or an ImageFolder root."),
               block_size: int = typer.Option(..., "--block-size", "-m", min=1, max=64, help="Block size M of every key."),
               channels: int = typer.Option(3, min=1, max=16),
               mode: TrainMode = typer.Option("lora", help="lora: an adapter per device; full: a model per device."),
               img_size: int | None = typer.Option(None), patch_size: int | None = typer.Option(None),
               depth: int | None = typer.Option(None), embed_dim: int | None = typer.Option(None),
               heads: int | None = typer.Option(None), num_classes: int | None = typer.Option(None),
               epochs: int = typer.Option(T.epochs, min=1), lr: float = typer.Option(T.lr),
               batch_size: int = typer.Option(T.batch_size, min=1), lora_rank: int = typer.Option(T.lora_rank, min=1),
               max_steps: int | None = typer.Option(None, min=1, help="Stop each device's training after this "
                                                                      "many optimizer steps (smoke runs)."),
               ensemble: int | None = typer.Option(None, min=2, max=64, help="Every device serves a random "
                                                   "ensemble of N keyed LoRA members (a key set of N each), "
                                                   "released as one gathered graph."),
               vault: Path = typer.Option(Path("fleet.vault"), help="The key vault to create (0600, encrypted)."),
               publisher_pub: Path | None = typer.Option(None, help="Where the publisher's public key goes, for "
                                                                    "the devices' --trust (default: publisher.pub "
                                                                    "beside the vault)."),
               master_key: Path = typer.Option(Path("master.key"), "--master-key", help="The vault's master key "
                                                "(created 0600 where it does not exist; or - for stdin)."),
               master_key_command: str | None = MASTER_KEY_COMMAND) -> None:
    """Create a fleet: database (migrated), publisher signing key in a new vault, the pinned base and recipe."""
    from .fleet.commands import FleetSpec, MasterKey, init

    kwargs = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size), ("depth", depth),
                                ("embed_dim", embed_dim), ("num_heads", heads), ("num_classes", num_classes))
              if v is not None}
    recipe = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "lora_rank": lora_rank,
              **({"max_steps": max_steps} if max_steps else {}), **({"ensemble": ensemble} if ensemble else {})}
    init(db, FleetSpec(base, model, kwargs, data, block_size, channels, mode, recipe), vault,
         MasterKey(master_key, master_key_command), publisher_pub=publisher_pub)


@command(fleet_app, "upgrade")
def fleet_upgrade(db: str = DB) -> None:
    """Migrate the fleet database to this keyedge's schema (Alembic)."""
    from .fleet.commands import upgrade

    upgrade(db)


@command(fleet_app, "enroll")
def fleet_enroll(device_id: str | None = typer.Argument(None, help="The device's id (letters, digits, . _ : -)."),
                 pubkey: Path | None = typer.Option(None, help="The device's public key (keyedge device keygen)."),
                 target: str | None = typer.Option(None, help="Its target profile: desktop, jetson-orin, ..."),
                 from_csv: Path | None = typer.Option(None, help="Many devices, all or none: a CSV with the "
                                                                 "columns device_id,pubkey,target."),
                 db: str = DB, master_key: Path | None = MASTER_KEY,
                 master_key_command: str | None = MASTER_KEY_COMMAND) -> None:
    """Enroll devices: a fresh key each (drawn from the CSPRNG into the vault), recorded in the database."""
    from .fleet.commands import Enrollment, MasterKey, enroll, read_csv

    if (from_csv is None) == (device_id is None):
        raise KeyedgeError("pass a DEVICE_ID with --pubkey and --target, or --from-csv FILE")
    if from_csv is not None:
        enroll(db, read_csv(from_csv), MasterKey(master_key, master_key_command), where=f"{from_csv}: ")
        return
    if pubkey is None or target is None:
        raise KeyedgeError("enrolling a device needs --pubkey and --target")
    enroll(db, [Enrollment(device_id, pubkey, target)], MasterKey(master_key, master_key_command))


@command(fleet_app, "train")
def fleet_train(device_ids: list[str] = typer.Argument(None, help="Only these devices (default: every pending one)."),
                db: str = DB, master_key: Path | None = MASTER_KEY, master_key_command: str | None = MASTER_KEY_COMMAND,
                runs: Path = RUNS,
                epochs: int | None = typer.Option(None, min=1, help="Epochs (default: the fleet's recipe)."),
                worker: str | None = typer.Option(None, help="This worker's id (default host:pid)."),
                lease_seconds: float = LEASE) -> None:
    """Train pending devices from the fleet's base; run as many workers as you like on one database (or one
    per rank under torchrun / srun: each rank trains devices of its own)."""
    from .fleet.commands import MasterKey
    from .fleet.training import train_devices

    with _leases_given_back_on_sigterm():
        train_devices(db, MasterKey(master_key, master_key_command).read(), runs, only=device_ids or None,
                      epochs=epochs, worker=worker, lease_s=lease_seconds)


@contextlib.contextmanager
def _leases_given_back_on_sigterm():
    """torchrun tearing down its ranks, SLURM preempting a job, ``kill``: while the block runs, SIGTERM ends
    the command as an exception does, so that the device it holds is given back rather than left to its
    lease's expiry; the previous handler is put back after."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _release_options(mode, parity_n: int, keep_plaintext: bool):
    from .fleet.release import ReleaseOptions

    return ReleaseOptions(mode=mode, parity_n=parity_n, keep_plaintext=keep_plaintext)


@command(fleet_app, "release")
def fleet_release(device_ids: list[str] = typer.Argument(None, help="Only these devices (default: every trained "
                                                                    "one; a failed one is tried again when named)."),
                  db: str = DB, master_key: Path | None = MASTER_KEY,
                  master_key_command: str | None = MASTER_KEY_COMMAND, out: Path = RELEASES,
                  mode: FoldMode | None = typer.Option(None, help="fused or gather (default: fused where the key "
                                                                  "folds into the patch embedding)."),
                  parity_n: int = typer.Option(200, min=10, help="Parity images."),
                  keep_plaintext: bool = typer.Option(False, help="Keep the export and the plan's model beside "
                                                                  "the bundle (as secret as the key)."),
                  wave: str | None = typer.Option(None, help="A staged release: the next N trained devices, or "
                                                             "P% of the fleet; later waves go on from there."),
                  abort_above: float | None = typer.Option(None, help="Stop the wave once more than this fraction "
                                                                     "of it has failed (default 0.1)."),
                  worker: str | None = typer.Option(None, help="This worker's id (default host:pid)."),
                  lease_seconds: float = LEASE) -> None:
    """Export, parity, build plan, seal + sign and audit each trained device; failures are recorded, not released."""
    from .fleet.commands import MasterKey
    from .fleet.release import Wave, release_devices

    if abort_above is not None and wave is None:
        raise KeyedgeError("--abort-above belongs to a staged release: pass --wave too")
    staged = Wave(wave, 0.1 if abort_above is None else abort_above) if wave is not None else None
    with _leases_given_back_on_sigterm():
        outcomes = release_devices(db, MasterKey(master_key, master_key_command).read(), out,
                                   only=device_ids or None, opts=_release_options(mode, parity_n, keep_plaintext),
                                   worker=worker, lease_s=lease_seconds, wave=staged)
    if not outcomes:
        typer.echo("nothing to release: no trained device waits (keyedge fleet status)")
    elif any(v != "released" for v in outcomes.values()):
        raise typer.Exit(1)


@command(fleet_app, "rotate")
def fleet_rotate(device_id: str = typer.Argument(..., help="The device to re-key."),
                 db: str = DB, master_key: Path | None = MASTER_KEY,
                 master_key_command: str | None = MASTER_KEY_COMMAND, runs: Path = RUNS, out: Path = RELEASES,
                 epochs: int | None = typer.Option(None, min=1, help="Epochs (default: the fleet's recipe)."),
                 parity_n: int = typer.Option(200, min=10, help="Parity images."),
                 lease_seconds: float = LEASE) -> None:
    """A new key, a new adapter and a new bundle for a device; the old bundle is revoked once the new one is out."""
    from .core.io import check_output_dir
    from .fleet.commands import MasterKey, rotate, status
    from .fleet.release import release_devices
    from .fleet.training import train_devices

    source = MasterKey(master_key, master_key_command)
    if source.path is not None and str(source.path) == "-":
        raise KeyedgeError("fleet rotate reads the master key three times: pass a file or --master-key-command")
    for directory in (runs, out):  # checked before the key is rotated
        check_output_dir(directory, True)
    new_key = rotate(db, device_id, source)
    with _leases_given_back_on_sigterm():
        train_devices(db, source.read(), runs, only=[device_id], epochs=epochs, lease_s=lease_seconds)
        release_devices(db, source.read(), out, only=[device_id], opts=_release_options(None, parity_n, False),
                        lease_s=lease_seconds)
    device = next(d for d in status(db)["devices"] if d["device"] == device_id)
    if (device["bundle"] or {}).get("key_fingerprint") != new_key:
        typer.echo(f"keyedge: {device_id} has no bundle of its new key yet ({device['state']}"
                   + (f": {device['reason']}" if device["reason"] else "") + "); keyedge fleet release "
                   f"{device_id} once it is trained", err=True)
        raise typer.Exit(1)


@command(fleet_app, "revoke")
def fleet_revoke(device_id: str = typer.Argument(..., help="The device to revoke."),
                 reason: str = typer.Option("revoked by the operator", help="Recorded with the revocation."),
                 db: str = DB, master_key: Path | None = MASTER_KEY,
                 master_key_command: str | None = MASTER_KEY_COMMAND) -> None:
    """Revoke a device for good: its bundles marked revoked, its key retired; never trained or released again."""
    from .fleet.commands import MasterKey, revoke

    revoke(db, device_id, MasterKey(master_key, master_key_command), reason=one_line(reason))


@command(fleet_app, "report")
def fleet_report(db: str = DB, master_key: Path | None = MASTER_KEY,
                 master_key_command: str | None = MASTER_KEY_COMMAND,
                 out: Path = typer.Option(Path("fleet-report"), "--out", help="Where report.md and report.json go."),
                 sample: int = typer.Option(4, min=2, help="Devices in the blast-radius matrix."),
                 n: int = typer.Option(100, min=10, help="Test images."), seed: int = typer.Option(0),
                 force: bool = typer.Option(False, help="Replace the report in a non-empty --out.")) -> None:
    """The K x K blast radius on a sample of devices, and per-device cost against one full model."""
    from .fleet.commands import MasterKey
    from .fleet.report import fleet_report as run

    run(db, MasterKey(master_key, master_key_command).read(), out, sample=sample, n=n, seed=seed, force=force)


@command(fleet_app, "export")
def fleet_export(to: Path = typer.Option(..., "--to", help="A new (or empty) directory: bundles/, index.json, "
                                                          "publisher.pub."),
                 db: str = DB) -> None:
    """Hand-off to an OTA system: every released device's signed, sealed bundle and one index (revoked listed)."""
    from .fleet.export import export_fleet

    export_fleet(db, to)


@command(fleet_app, "status")
def fleet_status(db: str = DB, as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
    """Every device: target, key, state, accuracy, current bundle, when, and why it failed; a summary line."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .core.tables import pct
    from .fleet.commands import status
    from .fleet.db import shown

    report = status(db)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    f = report["fleet"]
    table = Table(title=f"fleet {shown(db)}: {f['model']} ({f['mode']}"
                        + (f", random ensembles of {f['ensemble']}" if f["ensemble"] else "")
                        + f"), publisher {f['publisher']}")
    for column in ("device", "target", "key", "state", "clean", "transfer", "bundle", "updated", "why"):
        table.add_column(column)
    for d in report["devices"]:
        b = d["bundle"] or {}
        table.add_row(d["device"], d["target"], d["key_fingerprint"][:12], d["state"] + (
            f" ({d['worker']})" if d["worker"] else ""), pct(b.get("clean")), pct(b.get("transfer")),
            f"r{b['release']} {b['sha256'][:12]}" if b else "", d["updated_at"][:19], d["reason"] or "")
    Console(width=200).print(table)
    for w in report["waves"]:
        typer.echo(f"wave {w['wave']} ({w['requested']}, up to {w['size']}): {w['state']}, {w['released']} released, "
                   f"{w['failed']} failed (abort above {100 * w['abort_above']:.0f}%), {w['started_at'][:19]}")
    released = sum(1 for d in report["devices"] if d["bundle"])
    typer.echo(f"{len(report['devices'])} devices: " + (", ".join(f"{n} {s}" for s, n in report["counts"].items())
                                                         or "none enrolled") + f"; {released} with a current bundle")


def main() -> None:
    app(prog_name="keyedge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
