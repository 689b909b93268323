"""The red team: every attacker of the threat model, and what it achieves.

The threat model as data (:mod:`.config`), the attacks (:mod:`.attacks`), clean and robust
accuracy against every attacker (:mod:`.evaluate`), the key-leakage audit of the files a device
holds (:mod:`.audit`) and the reports (:mod:`.report`). Imports the core and the runtime (attacks
query the deployed artifact through its runner). See ``docs/architecture.md``.
"""
