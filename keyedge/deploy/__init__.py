"""Deployment: turning a keyed model into what a device runs.

ONNX export with the key folded or kept as a gather (:mod:`.onnx_export`, options in :mod:`.config`),
TensorRT target profiles (:mod:`.targets`), build plans and the TensorRT builder (:mod:`.tensorrt`),
sealing an artifact to one device (:mod:`.seal`) and the C++ package generator (:mod:`.bindings`).
Imports the core and the runtime (bundles, probes), never a runner. See ``docs/architecture.md``.
"""
