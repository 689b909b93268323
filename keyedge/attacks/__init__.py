"""Attacks on key-based defended models.

* :mod:`.pgd` -- PGD l_inf / l_2 on any differentiable loss (white-box or transfer).
* :mod:`.adaptive` -- attacks that try to get around an unknown key: EOT over random
  keys, BPDA through a guessed key, and key search.
* :mod:`.autoattack` -- AutoAttack (the ``pyautoattack`` package) on a surrogate.
"""

from .pgd import AttackBudget, ce_loss, pgd

__all__ = ["AttackBudget", "ce_loss", "pgd"]
