"""AutoAttack (the ``pyautoattack`` package) run on a surrogate, for transfer."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import torch

from ...core.models import KeyedClassifier

QUICK = ("apgd-ce", "apgd-dlr")


def autoattack(surrogate: KeyedClassifier, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
               attacks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """Adversarial examples from AutoAttack on ``surrogate``.

    ``attacks=None`` runs the standard version (APGD-CE, APGD-T, FAB-T, Square);
    a list runs those attacks ('custom' version), e.g. :data:`QUICK`.
    """
    from pyautoattack import AutoAttack

    device = x.device
    kwargs = {"attacks": list(attacks), "version": "custom"} if attacks else {"version": "standard"}
    adversary = AutoAttack(surrogate.eval(), norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                           seed=seed, device=device, **kwargs)
    adversary.verbose = False
    logging.getLogger("pyautoattack").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()
