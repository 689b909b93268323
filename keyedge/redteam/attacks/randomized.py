"""Attacks on a randomized defense (a random ensemble, query noise), and how its robustness is scored.

A randomized model answers the same image differently from one query to the next, which is where
robustness is most often overstated (Athalye et al., "Obfuscated Gradients", EOT; Tramer et al., "On
Adaptive Attacks to Adversarial Example Defenses"). So:

* **scoring**: an adversarial image is scored over ``R`` independent draws of the defense; per draw, an
  image counts only if that draw was right on the clean image *and* an independent draw was right on the
  adversarial one, so robust <= clean draw by draw. Reported: the mean over draws, the worst draw, and
  the images right under every draw;
* **EOT over the defense's randomness**: :func:`expectation` asks every query ``k`` times and answers with
  the mean probability; each repetition counts against the attacker's query budget;
* **Square per budget**: a separate run for every budget ``B`` with ``B // k`` (EOT) queries per image,
  the step schedule planned for that budget, on *all* images (which are "right" is itself random), each
  final image scored over draws; :func:`square_budget`;
* **HopSkipJump** (labels): one run per image at the largest budget; at budget ``B`` the attacker's image
  is the first queried point it saw misclassified within eps in its first ``B`` queries (it stops there),
  else the clean image; scored over draws, so a lucky draw does not count as a break;
* **white-box with EOT**: the gradient of the defense's *expected* output (:class:`ExpectedOutput`: the
  mean probability over all members, which is exactly what a uniform draw of ``S`` members averages to,
  for every ``S``; :class:`NoisyInput`: the mean over fresh noise per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .query import Predict, hsj_oracles

Scored = dict[str, float]


def expectation(predict: Predict, k: int) -> Predict:
    """EOT with queries: every query asked ``k`` times; the answer is the log of the mean probability."""
    if k < 1:
        raise ValueError(f"EOT repeats each query k >= 1 times, not {k}")
    if k == 1:
        return predict

    def averaged(x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([predict(x).float().softmax(1) for _ in range(k)]).mean(0)
        return probs.clamp_min(1e-30).log()

    return averaged


@torch.no_grad()
def correct_under_draws(predict: Predict, x: torch.Tensor, y: torch.Tensor, draws: int,
                        batch_size: int = 256) -> torch.Tensor:
    """(draws, N) booleans: image ``j`` classified right by the defense's ``r``-th independent draw."""
    rows = []
    for _ in range(draws):
        rows.append(torch.cat([predict(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) == y)
    return torch.stack(rows)


def score(predict: Predict, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, draws: int, *,
          clean: torch.Tensor | None = None) -> tuple[Scored, torch.Tensor]:
    """Robust accuracy of ``x_adv`` over ``draws`` independent draws, and the (draws, N) survival mask.

    ``clean``: this model's (draws, N) right-on-the-clean-image mask, drawn once for every attack."""
    before = correct_under_draws(predict, x, y, draws) if clean is None else clean
    survived = before & correct_under_draws(predict, x_adv, y, draws)
    per_draw = survived.float().mean(1)
    scored = {"robust_mean": float(per_draw.mean()), "robust_worst_draw": float(per_draw.min()),
              "robust_every_draw": float(survived.all(0).float().mean()), "clean_mean": float(before.float().mean())}
    assert scored["robust_mean"] <= scored["clean_mean"] + 1e-9
    return scored, survived


@torch.no_grad()
def square_budget(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int,
                  seed: int = 0) -> torch.Tensor:
    """Square (l_inf, margin loss) planned for ``queries`` queries per image in all (its first evaluation
    included), on every image; returns the final images."""
    import contextlib
    import io
    import logging

    from pyautoattack.square import SquareAttack

    if queries < 2:
        return x.clone()
    attack = SquareAttack(predict, norm="Linf", n_queries=queries - 1, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                          verbose=False, loss="margin", device=x.device)
    attack.init_hyperparam(x)
    logging.getLogger("pyautoattack").setLevel(logging.WARNING)
    torch.random.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        _, adv = attack.attack_single_run(x.clone(), y.clone())
    return adv.detach()


def hopskipjump_points(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, budgets: Sequence[int],
                       classes: int, repeats: int = 1, seed: int = 0) -> dict[int, torch.Tensor]:
    """Label-only HopSkipJump against a randomized model, each query asked ``repeats`` times (EOT: the label
    of the mean probability; every repetition counted). Per budget, the images the attacker would submit:
    the first point it saw misclassified within eps in that many queries, else the clean image."""
    oracles = hsj_oracles(expectation(predict, repeats), x, y, eps=eps, limit=max(budgets) // repeats,
                           classes=classes, seed=seed)
    out = {}
    for budget in budgets:
        rows = [torch.from_numpy(o.point).reshape(x.shape[1:]) if o.first_success is not None
                and o.first_success * repeats <= budget else x[i].cpu() for i, o in enumerate(oracles)]
        out[budget] = torch.stack(rows).to(x.dtype)
    return out


class ExpectedOutput(nn.Module):
    """log of a random ensemble's expected answer: the mean probability over all ``N`` members, which is what
    a uniform draw of any ``S`` of them averages to (EOT over the draw, exactly, in one forward pass)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-30).log()


class NoisyInput(nn.Module):
    """RND's expected answer, estimated: log mean probability over ``samples`` fresh Gaussian noises of
    ``sigma`` (clipped to [0, 1], as the runtime does) per forward pass; gradients flow through the noise."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], sigma: float, samples: int) -> None:
        super().__init__()
        self.model, self.sigma, self.samples = model, sigma, samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1)).softmax(1)
                             for _ in range(self.samples)]).mean(0)
        return probs.clamp_min(1e-30).log()


def combine(masks: Sequence[torch.Tensor]) -> Scored:
    """Several attacks' (draws, N) survival masks: an image survives draw ``r`` if it survived every attack's
    ``r``-th draw (each attack's draws are independent of the others')."""
    survived = torch.stack(list(masks)).all(0)
    per_draw = survived.float().mean(1)
    return {"robust_mean": float(per_draw.mean()), "robust_worst_draw": float(per_draw.min()),
            "robust_every_draw": float(survived.all(0).float().mean())}
