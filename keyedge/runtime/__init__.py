"""The runtime: what runs an artifact on a device, and nothing that builds one.

Runners (PyTorch, ONNX Runtime, TensorRT) behind one lifecycle (:mod:`.runners`), the one path
resolver (:mod:`.artifacts`), sealed bundles opened in memory (:mod:`.bundle`), the CUDA
preprocessing kernel's loader and CPU twin (:mod:`.kernel`) and machine probes (:mod:`.platform`).
Imports only the core: never the trainer, the exporters or the TensorRT builder.
"""
