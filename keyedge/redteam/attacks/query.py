"""Query attacks on a deployed model: no key, no weights, only its answers.

* **Square** (l_inf, scores): the Square Attack of Andriushchenko et al. as maintained in
  ``pyautoattack`` (``pyautoattack.square.SquareAttack``, margin loss). One run at the largest
  budget; Square reports how many queries each image took, so the curve at smaller budgets is
  what that run had achieved by then (its step schedule is the one tuned for the largest budget,
  so the smaller budgets slightly understate an attacker who planned for them).
* **HopSkipJump** (l_inf, labels only): Chen et al.'s decision-based attack as maintained in the
  Adversarial Robustness Toolbox (``art.attacks.evasion.HopSkipJump``). The model is wrapped so
  that every query is counted and every queried point is checked: an image counts as broken at
  budget B when one of its first B queries was misclassified within eps of it (the attacker saw
  that answer, and stops there), so one run gives the whole robust-accuracy-against-queries curve.

Both query the model as it is deployed: :func:`runner_model` turns any keyedge runner (ONNX
Runtime, TensorRT, PyTorch) into the canonical-image callable they attack.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

Predict = Callable[[torch.Tensor], torch.Tensor]


def runner_model(runner) -> Predict:
    """Canonical images (float [0, 1], NCHW) -> logits of the deployed artifact (its own input spec)."""
    spec = runner.input_spec

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner(spec.from_canonical(x.detach().cpu()))).float()

    return predict


@torch.no_grad()
def square(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, budgets: Sequence[int],
           seed: int = 0) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Square Attack (l_inf, margin loss) with ``max(budgets)`` queries per image.

    Returns, per budget, which images were broken within that many queries, and the adversarial
    images of the full run.
    """
    from pyautoattack.square import SquareAttack

    limit = max(budgets)
    attack = SquareAttack(predict, norm="Linf", n_queries=limit, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                          verbose=False, loss="margin", device=x.device)
    attack.init_hyperparam(x)
    logging.getLogger("pyautoattack").setLevel(logging.WARNING)
    torch.random.manual_seed(seed)
    right = predict(x).argmax(1) == y
    used = torch.full((len(x),), float(limit + 1))
    x_adv = x.clone()
    idx = torch.nonzero(right).flatten()
    if len(idx):
        with contextlib.redirect_stdout(io.StringIO()):
            queries, adv = attack.attack_single_run(x[idx].clone(), y[idx].clone())
        broken = predict(adv).argmax(1) != y[idx]
        used[idx[broken]] = queries.cpu().float()[broken]
        x_adv[idx] = adv
    return {b: used <= b for b in budgets}, x_adv.detach()


class _Exhausted(Exception):
    pass


class _CountingOracle:
    """Labels for ART; counts queries and notes the first query that broke the image within eps."""

    def __init__(self, predict: Predict, x0: np.ndarray, y0: int, eps: float, limit: int, classes: int) -> None:
        self.predict, self.x0, self.y0, self.eps, self.limit, self.classes = predict, x0, y0, eps, limit, classes
        self.used = 0
        self.first_success: int | None = None  # the query (1-based) that broke the image
        self.point: np.ndarray | None = None   # and the point it asked about

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        allowed = batch[: max(0, self.limit - self.used)]  # the budget ends inside this batch: no more answers
        if len(allowed):
            labels = self.predict(torch.from_numpy(np.ascontiguousarray(allowed, dtype=np.float32))).argmax(1).numpy()
            if self.first_success is None:
                dist = np.abs(allowed.reshape(len(allowed), -1) - self.x0.reshape(1, -1)).max(axis=1)
                hits = np.flatnonzero((labels != self.y0) & (dist <= self.eps + 1e-7))
                if hits.size:
                    self.first_success = self.used + int(hits[0]) + 1
                    self.point = allowed[int(hits[0])].copy()
            self.used += len(allowed)
        if len(allowed) < len(batch) or self.first_success is not None:  # out of budget, or done
            raise _Exhausted
        onehot = np.zeros((len(batch), self.classes), dtype=np.float32)
        onehot[np.arange(len(batch)), labels] = 1.0
        return onehot


def hsj_oracles(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, limit: int, classes: int,
                 seed: int = 0) -> list[_CountingOracle]:
    """One HopSkipJump run of at most ``limit`` queries per image; each image's oracle (what it saw)."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    oracles = []
    np.random.seed(seed)  # ART draws its random directions from numpy's global generator
    logging.getLogger("art").setLevel(logging.ERROR)
    for i in range(len(x)):
        x0 = x[i:i + 1].cpu().numpy().astype(np.float32)
        oracle = _CountingOracle(predict, x0, int(y[i]), eps, limit, classes)
        classifier = BlackBoxClassifier(oracle, input_shape=tuple(x0.shape[1:]), nb_classes=classes,
                                        clip_values=(0.0, 1.0))
        attack = HopSkipJump(classifier, targeted=False, norm=np.inf, max_iter=1000, max_eval=1000,
                             init_eval=100, init_size=100, batch_size=64, verbose=False)
        with contextlib.suppress(_Exhausted), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            attack.generate(x0, y=np.eye(classes, dtype=np.float32)[[int(y[i])]])
        oracles.append(oracle)
    return oracles


def hopskipjump(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, budgets: Sequence[int],
                classes: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """Label-only HopSkipJump (l_inf) with ``max(budgets)`` queries per image.

    Returns, per budget, which images were broken (misclassified within eps) within that many queries.
    """
    first = [o.first_success for o in hsj_oracles(predict, x, y, eps=eps, limit=max(budgets), classes=classes,
                                                    seed=seed)]
    return {b: torch.tensor([f is not None and f <= b for f in first]) for b in budgets}
