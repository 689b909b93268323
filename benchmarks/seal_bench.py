"""Cost of sealing: seal, and open-and-load, of a ViT-B/16 fp32 fused artifact on this CPU, next to
loading the plain file, measured interleaved in one run (ONNX Runtime session creation).

Three loads: the plain export (model.onnx, weights inside the protobuf); the same model unsealed in
the bundle's layout (model.onnx + model.onnx.data, ONNX Runtime reading the tensors from disk) --
what the sealed path costs without its cryptography; and the sealed bundle, resolved and loaded
(``open_runner``: the bundle is authenticated once to read its manifest, then decrypted again at
activation, session over the decrypted tensors, wipe). Also timed: opening alone (decrypt + wipe),
and activating a runner of the bundle that is already resolved (what every later activation costs).

    python benchmarks/seal_bench.py --out benchmarks/results/seal_vitb16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from _runs import make_run
from keyedge import Key
from keyedge.checks.bench import interleaved, ratio
from keyedge.core.progress import quiet
from keyedge.deploy.config import ExportOptions
from keyedge.deploy.seal import seal_artifact
from keyedge.workflows.export import export_run
from keyedge.runtime.runners import open_runner
from keyedge.runtime.bundle import (EXTERNAL_DATA, DeviceKey, Opener, PublisherKey, Trust, external_layout,
                                    open_bundle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = Key.generate(16)
        key.save(root / "key.bin")
        run = make_run(root, args.model, key)
        export_run(run, root / "key.bin", root / "fused", ExportOptions(mode="fused"), echo=quiet)
        device = DeviceKey.generate()
        t0 = time.perf_counter()
        publisher = PublisherKey.generate()
        opener = Opener(device, Trust((publisher.public,)))
        data, _ = seal_artifact(root / "fused", device.public, signer=publisher)
        seal_s = time.perf_counter() - t0
        (root / "model.kes").write_bytes(data)
        layout = root / "layout"
        layout.mkdir()
        graph, tensors = external_layout((root / "fused" / "model.onnx").read_bytes())
        (layout / "model.onnx").write_bytes(graph)
        (layout / EXTERNAL_DATA).write_bytes(tensors)
        (layout / "manifest.json").write_bytes((root / "fused" / "manifest.json").read_bytes())
        x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)

        def load(path, opener=None):
            with open_runner(path, opener=opener) as r:  # open (decrypt) + session creation
                return r

        resolved = open_runner(root / "model.kes", opener=opener)

        def activate():
            with resolved:  # decrypt + session + wipe
                pass

        timings = interleaved({"plain_load": lambda: load(root / "fused"),
                               "unsealed_layout_load": lambda: load(layout),
                               "sealed_open_only": lambda: open_bundle(root / "model.kes", opener).wipe(),
                               "sealed_open_and_load": lambda: load(root / "model.kes", opener),
                               "sealed_activation": activate},
                              warmup=1, rounds=args.rounds, iters=args.iters, status=lambda s: print(s, flush=True))
        with open_runner(root / "model.kes", opener=opener) as r, open_runner(root / "fused") as p:
            assert np.array_equal(r(x), p(x))  # the same model
    results = {"model": args.model, "artifact_bytes": len(data), "seal_s": seal_s,
               "load_ms": {n: t.summary() for n, t in timings.items()},
               "sealed_over_plain": ratio(timings, "sealed_open_and_load", "plain_load"),
               "sealed_activation_over_plain": ratio(timings, "sealed_activation", "plain_load"),
               "sealed_over_unsealed_layout": ratio(timings, "sealed_open_and_load", "unsealed_layout_load")}
    print(json.dumps({"bundle_mb": round(len(data) / 1e6, 1), "seal_s": round(seal_s, 2),
                      **{f"{n}_ms": round(t.median, 1) for n, t in timings.items()},
                      "sealed_over_plain": round(results["sealed_over_plain"], 3),
                      "sealed_activation_over_plain": round(results["sealed_activation_over_plain"], 3),
                      "sealed_over_unsealed_layout": round(results["sealed_over_unsealed_layout"], 3)}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
