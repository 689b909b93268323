"""The core: what every other layer stands on, and which imports nothing above it.

Keys (:mod:`.keys`), the block shuffle (:mod:`.shuffle`), timm ViTs and the keyed classifier
(:mod:`.models`), the fold (:mod:`.fold`), LoRA (:mod:`.lora`), the typed manifests and the key
rule (:mod:`.manifests`), run directories read back (:mod:`.runs`), data sets (:mod:`.data`),
atomic writes and the output rule (:mod:`.io`), errors, progress bars, report tables and the
packaged resources. See ``docs/architecture.md``.
"""
