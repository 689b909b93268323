"""Attacks on key-based defended models, one module per kind of attacker.

* :mod:`.budget` -- an attack's budget (plain data);
* :mod:`.pgd` -- PGD l_inf / l_2 on any differentiable loss (white-box or transfer), best iterate;
* :mod:`.transfer` -- stronger transfer: MI-DI ensembles, the key-invariant subspace;
* :mod:`.autoattack` -- AutoAttack (the ``pyautoattack`` package) on a surrogate;
* :mod:`.adaptive` -- around an unknown key: EOT over random keys, key search by agreement;
* :mod:`.query` -- score (Square) and label-only (HopSkipJump) queries of the deployed model;
* :mod:`.keyrecovery` -- the key read off fused weights, un-fused weights and logit probes.
"""
