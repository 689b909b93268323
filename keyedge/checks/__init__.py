"""The checks every artifact passes: the post-export verification (:mod:`.verify`), clean and adversarial
accuracy parity with the PyTorch reference (:mod:`.parity`) and interleaved latency (:mod:`.bench`).
Configs in :mod:`.config`. Imports the core, the runtime and the red team's attacks."""
