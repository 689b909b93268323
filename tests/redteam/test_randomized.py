"""Attacks on randomized defenses: every query counted against the budget, scoring over independent draws,
and the white-box expectation exact."""

import itertools

import pytest
import torch
from torch import nn

from keyedge.redteam.attacks.randomized import (ExpectedOutput, NoisyInput, combine, expectation, hopskipjump_points,
                                                score, square_budget)


class Counting:
    """A model that counts the images it is asked about; ``flip`` = probability a query is answered by a
    random class instead of the true model (a randomized defense)."""

    def __init__(self, model, flip=0.0, classes=10, seed=0):
        self.model, self.flip, self.classes, self.images = model, flip, classes, 0
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x):
        self.images += len(x)
        logits = self.model(x).detach()
        noisy = torch.rand(len(x), generator=self.gen) < self.flip
        if noisy.any():
            logits[noisy] = torch.randn(int(noisy.sum()), self.classes, generator=self.gen) * 10
        return logits


def _linear(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes)).eval()


def test_eot_counts_every_repetition_and_averages_probabilities():
    model = Counting(_linear())
    x = torch.rand(5, 3, 8, 8)
    out = expectation(model, 4)(x)
    assert model.images == 20
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(out.exp(), model.model(x).softmax(1), atol=1e-5)  # deterministic: the mean is itself
    with pytest.raises(ValueError):
        expectation(model, 0)


@pytest.mark.parametrize("budget,k", [(100, 1), (100, 4), (300, 8)])
def test_square_spends_at_most_its_budget_per_image_with_eot_repetitions_counted(budget, k):
    model = Counting(_linear(1), flip=0.3)
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([3])
    adv = square_budget(expectation(model, k), x, y, eps=8 / 255, queries=budget // k)
    assert model.images <= budget
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_hopskipjump_spends_at_most_its_budget_and_submits_points_within_eps():
    model = Counting(_linear(2), flip=0.2)
    x = torch.rand(2, 3, 8, 8)
    y = model.model(x).argmax(1)
    model.images = 0
    points = hopskipjump_points(model, x, y, eps=16 / 255, budgets=(50, 400), classes=10, repeats=4)
    assert model.images <= 2 * 400  # two images, 400 queries each at most, every repetition counted
    for b, adv in points.items():
        assert adv.shape == x.shape and (adv - x).abs().max() <= 16 / 255 + 1e-6


def test_a_lucky_draw_is_not_a_break_and_robust_never_exceeds_clean():
    model = Counting(_linear(3), flip=0.5)
    x = torch.rand(64, 3, 8, 8)
    y = model.model(x).argmax(1)  # the true model is right on every image; half the draws are noise
    scored, survived = score(model, x, x.clone(), y, draws=20)
    assert survived.shape == (20, 64)
    assert scored["robust_mean"] <= scored["clean_mean"]
    assert scored["robust_every_draw"] <= scored["robust_worst_draw"] <= scored["robust_mean"]
    # a draw is right with p ~ 0.55, independently before and after: ~0.3 per draw, never all 20 draws
    assert 0.15 < scored["robust_mean"] < 0.45 and scored["robust_every_draw"] == 0.0
    deterministic = Counting(_linear(3))
    exact, _ = score(deterministic, x, x.clone(), y, draws=3)
    assert exact["robust_mean"] == exact["robust_worst_draw"] == exact["robust_every_draw"] == 1.0
    both = combine([survived, torch.ones_like(survived)])
    assert both["robust_mean"] == pytest.approx(scored["robust_mean"])


def test_the_expected_output_is_the_mean_over_every_draw_of_any_size():
    members = [_linear(s, classes=4) for s in range(4)]
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        expected = ExpectedOutput(members)(x).exp()
        for s in (1, 2, 3):  # a uniform draw of s members, averaged over all draws, is the mean of all members
            draws = list(itertools.combinations(range(4), s))
            mean = torch.stack([torch.stack([members[m](x).softmax(1) for m in d]).mean(0) for d in draws]).mean(0)
            assert torch.allclose(mean, expected, atol=1e-6)
    x.requires_grad_(True)
    ExpectedOutput(members)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_noisy_input_averages_fresh_noise_and_passes_gradients():
    model = _linear(5)
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    noisy = NoisyInput(model, 0.05, samples=4)
    a = noisy(x)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(noisy(x), noisy(x))
        assert torch.allclose(NoisyInput(model, 1e-9, 2)(x).exp(), model(x).softmax(1), atol=1e-5)


def test_images_crafted_without_the_randomness_do_not_depend_on_what_ran_before():
    """The white-box and leaked-member images an ensemble's S = 1 and S = 2 rows share are crafted from the
    seed alone: a later process (another S, a resumed benchmark) crafts the same images."""
    from keyedge.redteam.config import RandomizedConfig
    from keyedge.redteam.randomized import RandomizedTarget, evaluate_randomized

    members = [_linear(s) for s in range(3)]
    x = torch.rand(6, 3, 8, 8)
    y = ExpectedOutput(members)(x).argmax(1)
    cfg = RandomizedConfig(budgets=(10,), eot=(1,), label_only=False, draws=2, whitebox_steps=3)
    crafted = []
    for noise in (0.0, 0.5):
        torch.manual_seed(123)
        torch.rand(int(noise * 1000) + 1)  # the global generator left elsewhere by earlier work
        target = RandomizedTarget("t", Counting(members[0], flip=noise), ExpectedOutput(members),
                                  leaked={"member_0": members[0]})
        shared: dict = {}
        evaluate_randomized(target, x, y, cfg, transfer={}, classes=10, shared=shared)
        crafted.append(shared)
    assert crafted[0].keys() == crafted[1].keys() == {"whitebox_eot", "leaked_member_0"}
    for name in crafted[0]:
        assert torch.equal(crafted[0][name], crafted[1][name])


def test_a_threat_row_holds_every_attack_up_to_its_budget():
    """An attacker with 30 queries per image also has the 10-query attacks: its row is never above the
    smaller budget's, and the expected-output attack capped below the largest budget still counts there."""
    from keyedge.redteam.config import RandomizedConfig
    from keyedge.redteam.randomized import RandomizedTarget, evaluate_randomized

    members = [_linear(s) for s in range(3)]
    x = torch.rand(8, 3, 8, 8)
    y = ExpectedOutput(members)(x).argmax(1)
    cfg = RandomizedConfig(budgets=(10, 30), eot=(1,), label_only=False, draws=2, whitebox_steps=2,
                           square_expected_max=10)
    target = RandomizedTarget("t", Counting(members[0], flip=0.3), ExpectedOutput(members),
                              expected=ExpectedOutput(members))
    result = evaluate_randomized(target, x, y, cfg, transfer={}, classes=10)
    assert "square_expected@10" in result["attacks"] and "square_expected@30" not in result["attacks"]
    low, high = result["threat_model"]["scores"]["10"], result["threat_model"]["scores"]["30"]
    for k in ("robust_mean", "robust_worst_draw", "robust_every_draw"):
        assert high[k] <= low[k]
        assert high[k] <= min(result["attacks"][a][k] for a in ("square_k1@30", "square_expected@10")) + 1e-9
