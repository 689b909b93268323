"""What one more device costs a fleet, on this machine, through keyedge's own fleet commands:

* ``digits``: a fleet of the README's digits ViT (32x32, patch 4, depth 4, LoRA rank 8) on a base
  pre-trained here; ``--rounds`` more devices are added one at a time, each timed for ``enroll``,
  ``train`` (the fleet's recipe) and ``release`` (export, parity, build plan, seal + sign, audit), with
  the release's own step times;
* ``ensemble``: the same digits ViT, two fleets on one base side by side: devices of one key, and devices
  that serve a random ensemble of ``--ensemble N`` keyed LoRA members (``fleet init --ensemble N``); one
  device of each is added per round, alternately, each timed for ``enroll``, ``train`` and ``release``
  (the ensemble's: one gathered graph, parity per member, no TensorRT plan), with its per-device weights,
  its bundle's bytes and its parity accuracies (an ensemble's: the lowest member's);
* ``vitb16``: the release of one ViT-B/16 LoRA device (a random-init base, its adapter trained for
  ``--max-steps`` optimizer steps on digits at 224x224: a timing run, not an accurate model), step
  by step: export (LoRA merged, key folded, ONNX verified with ONNX Runtime), parity (``--parity-n``
  images), build plan, seal + sign, signature check, audit.

    python benchmarks/fleet_bench.py --part digits --rounds 3 --out benchmarks/results/fleet_digits_cpu.json
    python benchmarks/fleet_bench.py --part ensemble --ensemble 4 --rounds 2 --out benchmarks/results/fleet_ensemble_cpu.json
    python benchmarks/fleet_bench.py --part vitb16 --out benchmarks/results/fleet_vitb16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from keyedge.core.progress import quiet
from keyedge.fleet import commands
from keyedge.fleet.release import ReleaseOptions, release_devices
from keyedge.fleet.training import train_devices
from keyedge.runtime.bundle import DeviceKey
from keyedge.runtime.platform import cpu

DIGITS_VIT = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 4, "embed_dim": 96, "num_heads": 3}


def _fleet(root: Path, base: Path, model: str, kwargs: dict, recipe: dict) -> tuple[str, commands.MasterKey]:
    root.mkdir(parents=True, exist_ok=True)
    db = str(root / "fleet.db")
    master = commands.MasterKey(root / "master.key")
    commands.init(db, commands.FleetSpec(base, model, kwargs, "digits", 4 if model.startswith("vit_tiny") else 16,
                                         recipe=recipe), root / "fleet.vault", master, echo=quiet)
    return db, master


def _enroll(root: Path, db: str, master: commands.MasterKey, name: str, target: str) -> None:
    key = DeviceKey.generate()
    (root / f"{name}.pub").write_bytes(key.public.to_bytes())
    commands.enroll(db, [commands.Enrollment(name, root / f"{name}.pub", target)], master, echo=quiet)


def _release_steps(db: str, device: str) -> dict:
    import sqlite3

    with sqlite3.connect(db) as c:
        (detail,), = c.execute("SELECT e.detail FROM events e JOIN devices d ON e.device = d.id WHERE "
                               "d.device_id = ? AND e.kind = 'released' ORDER BY e.id DESC LIMIT 1", (device,))
    return json.loads(detail)


DIGITS_RECIPE = {"epochs": 6, "lr": 3e-3, "batch_size": 64, "lora_rank": 8}


def _digits_base(root: Path) -> tuple[Path, dict]:
    """The README's digits ViT pre-trained here (the fleet's public base) and the fleet's model arguments."""
    from keyedge.training.config import TrainConfig
    from keyedge.training.train import train

    kwargs = {k: v for k, v in DIGITS_VIT.items() if k not in ("img_size", "patch_size", "num_classes")}
    train(TrainConfig(model="vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, data="digits",
                      model_kwargs=kwargs, epochs=15, lr=2e-3, batch_size=64, out=str(root / "base"), progress=False,
                      workers=0))
    return root / "base" / "model.safetensors", {**kwargs, "img_size": 32, "patch_size": 4, "num_classes": 10}


def _add_device(root: Path, db: str, master: commands.MasterKey, name: str, opts: ReleaseOptions) -> dict:
    """Enroll, train and release one more device; its times and what its release recorded."""
    t0 = time.perf_counter()
    _enroll(root, db, master, name, "jetson-orin")
    t1 = time.perf_counter()
    train_devices(db, master.read(), root / "runs", only=[name], echo=quiet)
    t2 = time.perf_counter()
    assert release_devices(db, master.read(), root / "rel", only=[name], opts=opts, echo=quiet) == {name: "released"}
    t3 = time.perf_counter()
    return {"device": name, "enroll_s": t1 - t0, "train_s": t2 - t1, "release_s": t3 - t2,
            "release_steps_s": _release_steps(db, name)["steps"]}


def _medians(rows: list[dict], keys: tuple[str, ...]) -> dict:
    median = {k: statistics.median(r[k] for r in rows) for k in keys}
    median["total_s"] = statistics.median(r["enroll_s"] + r["train_s"] + r["release_s"] for r in rows)
    return median


def digits(root: Path, rounds: int, parity_n: int) -> dict:
    base, fleet_kwargs = _digits_base(root)
    db, master = _fleet(root, base, "vit_tiny_patch16_224", fleet_kwargs, DIGITS_RECIPE)
    opts = ReleaseOptions(parity_n=parity_n)
    rows = []
    for i in range(rounds + 1):  # the first device warms the caches up and is not counted
        row = _add_device(root, db, master, f"cam-{i}", opts)
        print(json.dumps(row))
        if i:
            rows.append(row)
    return {"model": "vit_tiny_patch16_224", "model_kwargs": fleet_kwargs, "recipe": "LoRA rank 8, 6 epochs",
            "parity_n": parity_n, "rounds": rows, "median": _medians(rows, ("enroll_s", "train_s", "release_s"))}


def _released(db: str, device: str) -> dict:
    """What the release of ``device`` recorded: bundle bytes, per-device weights, parity accuracies."""
    d = next(d for d in commands.status(db)["devices"] if d["device"] == device)
    import sqlite3

    with sqlite3.connect(db) as c:
        (detail,), = c.execute("SELECT e.detail FROM events e JOIN devices d ON e.device = d.id WHERE "
                               "d.device_id = ? AND e.kind = 'trained'", (device,))
        (parity,), = c.execute("SELECT r.parity FROM releases r JOIN devices d ON r.device = d.id WHERE "
                               "d.device_id = ?", (device,))
    trained, parity = json.loads(detail), json.loads(parity)
    return {"bundle_bytes": d["bundle"]["bytes"], "per_device_weight_bytes": trained["per_key_bytes"],
            "test_acc": trained["test_acc"], "members_test_acc": trained.get("members_test_acc"),
            "parity_clean": parity["sets"]["clean"]["accuracy"],
            "parity_transfer": parity["sets"].get("pgd_linf_transfer_base", {}).get("accuracy")}


def ensemble(root: Path, rounds: int, parity_n: int, n: int) -> dict:
    base, fleet_kwargs = _digits_base(root)
    fleets = {"single": _fleet(root / "single", base, "vit_tiny_patch16_224", fleet_kwargs, DIGITS_RECIPE),
              f"ensemble-{n}": _fleet(root / "ensemble", base, "vit_tiny_patch16_224", fleet_kwargs,
                                      {**DIGITS_RECIPE, "ensemble": n})}
    opts = ReleaseOptions(parity_n=parity_n)
    rows: dict[str, list[dict]] = {name: [] for name in fleets}
    for i in range(rounds + 1):  # round 0 warms the caches up and is not counted
        for name, (db, master) in fleets.items():
            fleet_root = Path(db).parent
            row = {**_add_device(fleet_root, db, master, f"cam-{i}", opts), **_released(db, f"cam-{i}")}
            print(json.dumps({"fleet": name, **row}))
            if i:
                rows[name].append(row)
    keys = ("enroll_s", "train_s", "release_s", "bundle_bytes", "per_device_weight_bytes", "parity_clean",
            "parity_transfer")
    median = {name: _medians(r, keys) for name, r in rows.items()}
    single, ens = median["single"], median[f"ensemble-{n}"]
    return {"model": "vit_tiny_patch16_224", "model_kwargs": fleet_kwargs, "recipe": "LoRA rank 8, 6 epochs",
            "ensemble": n, "parity_n": parity_n, "rounds": rows, "median": median,
            "ratio_ensemble_to_single": {k: ens[k] / single[k] for k in ("train_s", "release_s", "total_s",
                                                                          "bundle_bytes", "per_device_weight_bytes")}}


def vitb16(root: Path, max_steps: int, parity_n: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from keyedge import create_vit

    torch.manual_seed(0)
    base = create_vit("vit_base_patch16_224", num_classes=10)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    del base
    db, master = _fleet(root, root / "base.safetensors", "vit_base_patch16_224", {"num_classes": 10},
                        {"epochs": 1, "batch_size": 8, "lora_rank": 8, "max_steps": max_steps, "lr": 1e-3})
    _enroll(root, db, master, "cam-0", "jetson-orin")
    t0 = time.perf_counter()
    train_devices(db, master.read(), root / "runs", echo=quiet)
    t1 = time.perf_counter()
    outcome = release_devices(db, master.read(), root / "rel", opts=ReleaseOptions(parity_n=parity_n), echo=quiet)
    t2 = time.perf_counter()
    assert outcome == {"cam-0": "released"}, outcome
    from keyedge.core.manifests import read_run

    detail = _release_steps(db, "cam-0")
    device = commands.status(db)["devices"][0]
    status = device["bundle"]
    metrics = read_run(Path(device["run"])).metrics or {}
    return {"model": "vit_base_patch16_224", "block_size": 16, "train_s": t1 - t0, "max_steps": max_steps,
            "train_images_per_s": metrics.get("images_per_s"), "train_batch": 8,
            "release_s": t2 - t1, "release_steps_s": detail["steps"], "parity_n": parity_n,
            "bundle_bytes": status["bytes"], "fold_mode": status["fold_mode"],
            "train_flops_per_image": lora_step_flops("vit_base_patch16_224", 8)}


def lora_step_flops(model: str, batch: int, rank: int = 8) -> float:
    """FLOPs of one LoRA training step (forward + backward, cross-entropy) per image, counted by PyTorch's
    FlopCounterMode on the model itself: the frozen base's weights take no gradient, so the backward pass
    costs about one forward, not two."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from keyedge import create_vit
    from keyedge.core.lora import attach_lora

    net = attach_lora(create_vit(model, num_classes=10), rank=rank).train()
    x, y = torch.rand(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("digits", "ensemble", "vitb16"), required=True)
    ap.add_argument("--ensemble", type=int, default=4, help="--part ensemble: members per device")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--parity-n", type=int, default=None, help="default: 200 (digits), 10 (vitb16)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.part == "digits":
            result = digits(root, args.rounds, args.parity_n or 200)
        elif args.part == "ensemble":
            result = ensemble(root, args.rounds, args.parity_n or 200, args.ensemble)
        else:
            result = vitb16(root, args.max_steps, args.parity_n or 10)
    name, flags = cpu()
    result.update(cpu=f"{name} ({', '.join(flags)})", torch_threads=__import__("torch").get_num_threads(),
                  command=f"python benchmarks/fleet_bench.py --part {args.part} --rounds {args.rounds}"
                          + (f" --ensemble {args.ensemble}" if args.part == "ensemble" else ""))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
