"""Keyed fine-tuning (full or LoRA) of a timm ViT from a base checkpoint.

One command for 1 CPU, 1 GPU or N GPUs (``torchrun --nproc-per-node N -m keyedge.cli train ...``:
DDP, one process per GPU). AdamW with linear warm-up and cosine decay, AMP on GPU,
gradient accumulation, a checkpoint after every epoch and ``--resume`` that loses at
most one epoch. The run directory never holds the key, only its fingerprint.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..core.data import load_data, random_shift
from ..core.errors import KeyedgeError
from ..core.io import SECRET, atomic_write_bytes, check_output_dir, make_secret
from ..core.keys import Key
from ..core.lora import attach_lora, count_parameters, save_adapter
from ..core.manifests import (MANIFEST, BaseCheckpoint, DataInfo, LoraSpec, ModelSpec, RunInput, RunManifest,
                              check_key, library_versions, read_run)
from ..core.models import KeyedClassifier, create_vit, file_sha256, model_input_spec
from ..core.progress import progress_bar
from ..core.runs import ADAPTER, CHECKPOINT, WEIGHTS
from .config import TrainConfig

def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return fn


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)))


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, dataset, batch_size: int = 256,
                      device: torch.device | str = "cpu") -> float:
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def _validate(cfg: TrainConfig, given: Key | None = None, rank: int = 0) -> tuple[Key | None, RunManifest | None]:
    """Check every input before anything is written."""
    if cfg.mode not in ("full", "lora"):
        raise KeyedgeError(f"--mode must be full or lora, not {cfg.mode!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise KeyedgeError("--epochs, --batch-size and --accum-steps must be >= 1")
    if cfg.mode == "lora" and cfg.checkpoint is None:
        raise KeyedgeError("--mode lora needs the base it adapts: pass --checkpoint")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise KeyedgeError(f"checkpoint {cfg.checkpoint} does not exist")
    key = given if given is not None else Key.given(cfg.key)
    out = Path(cfg.out)
    previous = None
    if cfg.resume:
        if not (out / CHECKPOINT).is_file():
            raise KeyedgeError(f"nothing to resume: {out / CHECKPOINT} does not exist")
        previous = read_run(out)
        check_key(previous, key, f"run {out}", strict=True)
    elif rank == 0:  # rank 0 owns out/
        check_output_dir(out, cfg.force, alternative="--resume to continue it, or ")
    return key, previous


@dataclass
class _Setup:
    """Everything one training run builds before its first step."""
    keyed: KeyedClassifier
    data: Any
    loader: DataLoader
    sampler: DistributedSampler | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: dict[str, Any]
    device: torch.device
    manifest: RunManifest


def _build_model(cfg: TrainConfig, key: Key | None):
    model = create_vit(cfg.model, num_classes=cfg.num_classes, img_size=cfg.img_size,
                       patch_size=cfg.patch_size, checkpoint=cfg.checkpoint,
                       pretrained=cfg.pretrained, **cfg.model_kwargs)
    spec = model_input_spec(model)
    data = load_data(cfg.data, spec["img_size"][0], spec["channels"])
    if model.num_classes != data.num_classes:
        raise KeyedgeError(f"the model has {model.num_classes} classes but {cfg.data} has {data.num_classes}; "
                           "pass --num-classes")
    if key is not None and (spec["img_size"][0] % key.block_size or key.channels != spec["channels"]):
        raise KeyedgeError(f"a {key.block_size}x{key.block_size}x{key.channels} key does not fit a "
                           f"{spec['channels']}x{spec['img_size'][0]}x{spec['img_size'][1]} input")
    return model, spec, data


def _first_manifest(cfg: TrainConfig, key: Key | None, spec: dict[str, Any], num_classes: int, data,
                    params: tuple[int, int], model_bytes: int, previous: RunManifest | None) -> RunManifest:
    base_info = None
    if cfg.checkpoint is not None:
        base_info = previous.base_checkpoint if previous else BaseCheckpoint(
            path=str(Path(cfg.checkpoint).resolve()), sha256=file_sha256(cfg.checkpoint))
    return RunManifest(
        model=ModelSpec(cfg.model, {"num_classes": num_classes, "img_size": spec["img_size"][0],
                                    "patch_size": spec["patch_size"][0], **cfg.model_kwargs}),
        mode=cfg.mode,
        lora=LoraSpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets),
                      cfg.lora_patch_embed) if cfg.mode == "lora" else None,
        input=RunInput(size=tuple(spec["img_size"]), channels=spec["channels"], mean=tuple(spec["mean"]),
                       std=tuple(spec["std"])),
        block_size=key.block_size if key else None,
        key_fingerprint=key.fingerprint if key else None,
        base_checkpoint=base_info,
        data=DataInfo(cfg.data, data.description, tuple(data.classes) if data.classes else None),
        train={k: v for k, v in asdict(cfg).items()
               if k not in ("key", "out", "resume", "force", "progress", "model_kwargs")},
        trainable_params=params[0], total_params=params[1], full_model_bytes=model_bytes,
        versions=library_versions(), history=previous.history if previous else ())


def _setup(cfg: TrainConfig, key: Key | None, previous: RunManifest | None, world: int,
           local_rank: int) -> _Setup:
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # AMP checks, the scaler and pinned memory use this rank's GPU, not GPU 0
    model, spec, data = _build_model(cfg, key)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    num_classes = model.num_classes
    if cfg.mode == "lora":
        model = attach_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            targets=cfg.lora_targets, train_patch_embed=cfg.lora_patch_embed)
    keyed = KeyedClassifier(model, key, spec["mean"], spec["std"]).to(device)
    sampler = DistributedSampler(data.train, seed=cfg.seed) if world > 1 else None
    tensors = isinstance(data.train, TensorDataset)
    loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=0 if tensors else cfg.workers,
                        pin_memory=device.type == "cuda")
    steps_per_epoch = max(1, len(loader) // cfg.accum_steps)
    optimizer = torch.optim.AdamW([p for p in keyed.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(
        steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio))
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    manifest = _first_manifest(cfg, key, spec, num_classes, data, count_parameters(keyed), model_bytes, previous)
    return _Setup(keyed, data, loader, sampler, optimizer, scheduler, scaler,
                  {"device_type": device.type, "dtype": amp_dtype, "enabled": use_amp}, device, manifest)


def _resume(s: _Setup, out: Path) -> tuple[int, int]:
    """Restore the last epoch's training state; returns (next epoch, optimiser step)."""
    state = torch.load(out / CHECKPOINT, map_location=s.device, weights_only=False)
    missing = s.keyed.load_state_dict(state["trainable"], strict=False)
    if missing.unexpected_keys:
        raise KeyedgeError(f"{out / CHECKPOINT} does not fit this model")
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return state["epoch"] + 1, state["step"]


def _train_epoch(cfg: TrainConfig, s: _Setup, net: torch.nn.Module, step: int, title: str, world: int,
                 show: bool, console) -> tuple[torch.Tensor, int, float]:
    """One pass over the loader; returns ([loss sum, correct, seen], step, seconds)."""
    net.train()
    seen = correct = 0
    loss_sum = 0.0
    t0 = time.perf_counter()
    shift = isinstance(s.data.train, TensorDataset)
    with progress_bar(title, total=len(s.loader), enabled=show, console=console) as bar:
        for i, (x, y) in enumerate(s.loader):
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            if shift:
                x = random_shift(x, cfg.max_shift)
            with torch.autocast(**s.autocast):
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            s.scaler.scale(loss / cfg.accum_steps).backward()
            if (i + 1) % cfg.accum_steps == 0:
                s.scaler.step(s.optimizer)
                s.scaler.update()
                s.optimizer.zero_grad(set_to_none=True)
                s.scheduler.step()
                step += 1
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.update(loss=loss_sum / seen, acc=correct / seen, ips=seen * world / (time.perf_counter() - t0))
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=s.device)
    return stats, step, time.perf_counter() - t0


def train(cfg: TrainConfig, console=None, *, key: Key | None = None, alone: bool = False) -> RunManifest:
    """Fine-tune; returns the final manifest. Writes ``cfg.out`` after each epoch. The key: ``cfg.key``'s
    file, or ``key`` given in memory (the fleet's, from its vault). Under torchrun the ranks train one
    model together (DDP), unless ``alone``: then this rank trains a model of its own on its own GPU
    (``fleet train``: one device per rank)."""
    world, rank, local_rank = _dist_env()
    if alone:
        world, rank = 1, 0
    key, previous = _validate(cfg, key, rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main_process = rank == 0
    torch.manual_seed(cfg.seed + rank)
    s = _setup(cfg, key, previous, world, local_rank)
    out = Path(cfg.out)
    start_epoch, step = 0, 0
    if cfg.resume:
        start_epoch, step = _resume(s, out)
    elif main_process:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)  # it will hold keyed weights
        for stale in (CHECKPOINT, MANIFEST, WEIGHTS):  # files a previous run of ours wrote
            (out / stale).unlink(missing_ok=True)
    net: torch.nn.Module = s.keyed
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            s.keyed, device_ids=[local_rank] if s.device.type == "cuda" else None)
    manifest = s.manifest
    for epoch in range(start_epoch, cfg.epochs):
        if s.sampler is not None:
            s.sampler.set_epoch(epoch)
        stats, step, seconds = _train_epoch(cfg, s, net, step, f"epoch {epoch + 1}/{cfg.epochs}", world,
                                            cfg.progress and main_process, console)
        if world > 1:
            dist.all_reduce(stats)
        test_acc = evaluate_accuracy(s.keyed, s.data.test, device=s.device)
        record = {"epoch": epoch + 1, "step": step, "train_loss": float(stats[0] / stats[2]),
                  "train_acc": float(stats[1] / stats[2]), "test_acc": test_acc,
                  "images_per_s": float(stats[2]) / seconds}
        manifest = manifest.replace(history=(*manifest.history, record), epochs_done=epoch + 1, metrics=record)
        if main_process:
            manifest = _save_epoch(out, s, cfg, manifest, epoch, step)
            if console is not None and cfg.progress:
                console.print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f} "
                              f"train acc {record['train_acc']:.3f} test acc {test_acc:.3f}")
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    if world > 1:
        dist.barrier()
    return manifest


def _save_epoch(out: Path, s: _Setup, cfg: TrainConfig, manifest: RunManifest, epoch: int,
                step: int) -> RunManifest:
    from safetensors.torch import save_file

    if cfg.mode == "lora":
        save_adapter(s.keyed.model, out / ADAPTER)
        unique = out / ADAPTER / "adapter_model.safetensors"
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in s.keyed.model.state_dict().items()}
        tmp = out / f".{WEIGHTS}.tmp"
        save_file(state, str(tmp))
        make_secret(tmp)
        os.replace(tmp, out / WEIGHTS)
        unique = out / WEIGHTS
    manifest = manifest.replace(per_key_bytes=unique.stat().st_size)
    buf = io.BytesIO()
    torch.save({"trainable": {n: p.detach().cpu() for n, p in s.keyed.named_parameters() if p.requires_grad},
                "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
                "scaler": s.scaler.state_dict(), "epoch": epoch, "step": step,
                "rng": torch.get_rng_state(), "key_fingerprint": manifest.key_fingerprint}, buf)
    atomic_write_bytes(out / CHECKPOINT, buf.getvalue(), mode=SECRET)  # the keyed model's weights
    manifest.write(out / MANIFEST)
    return manifest
