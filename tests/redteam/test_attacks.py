import copy

import numpy as np
import pytest
import torch

from keyedge import Key, KeyedClassifier, create_vit
from keyedge.redteam.attacks.adaptive import eot_loss, key_search
from keyedge.redteam.attacks.autoattack import QUICK, autoattack
from keyedge.redteam.attacks.pgd import AttackBudget, ce_loss, ensemble_loss, pgd
from keyedge.redteam.attacks.transfer import block_constant, block_invariant, mi_di
from keyedge.redteam.attacks.keyrecovery import audit_key
from keyedge.core.data import load_data, sample
from keyedge.redteam.evaluate import accuracy
from keyedge.core.shuffle import patch_permutation

LINF = AttackBudget("linf", 8 / 255, 10, 2 / 255)
L2 = AttackBudget("l2", 1.5, 10)
TINY_KW = dict(num_classes=10, img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def digits16():
    return sample(load_data("digits", 16).test, 96, seed=0)


def _check_budget(x, x_adv, budget):
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if budget.norm == "linf":
        assert delta.abs().max() <= budget.eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= budget.eps + 1e-5
    assert delta.abs().max() > budget.eps / 4  # it did move


@pytest.mark.parametrize("budget", [LINF, L2], ids=["linf", "l2"])
def test_pgd_breaks_undefended_model_within_budget(trained_plain, digits16, budget):
    _, _, model = trained_plain
    x, y = digits16
    assert accuracy(model, x, y) > 0.5
    x_adv = pgd(ce_loss(model), x, y, budget)
    _check_budget(x, x_adv, budget)
    assert accuracy(model, x_adv, y) <= 0.05


def test_autoattack_breaks_undefended_model(trained_plain, digits16):
    _, _, model = trained_plain
    x, y = digits16[0][:48], digits16[1][:48]
    x_adv = autoattack(model, x, y, norm="linf", eps=8 / 255, attacks=QUICK)
    _check_budget(x, x_adv, LINF)
    assert accuracy(model, x_adv, y) <= 0.05


@pytest.mark.parametrize("attack", ["eot", "block_invariant", "mi_di"])
def test_key_agnostic_attacks_in_their_white_box_limit(trained_plain, digits16, attack):
    """With block size 1 on grayscale digits every key is equivalent on clean inputs, so EOT, the
    block-invariant attack and MI-DI on the model itself reduce to (nearly) white-box."""
    _, _, plain = trained_plain
    x, y = digits16
    keyed = KeyedClassifier(plain.model, Key.generate(1, seed=0), plain.mean.flatten().tolist(),
                            plain.std.flatten().tolist()).eval()
    if attack == "eot":
        x_adv = pgd(eot_loss(keyed, samples=3), x, y, LINF)
    elif attack == "block_invariant":
        x_adv = block_invariant(ce_loss(keyed), x, y, LINF, block=1)
    else:
        x_adv = mi_di([keyed], x, y, LINF)
    _check_budget(x, x_adv, LINF)
    assert accuracy(keyed, x_adv, y) <= 0.1


def test_block_constant_perturbations_are_invariant_under_every_key():
    from keyedge import block_shuffle

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 0.5 + 0.25
    delta = block_constant(torch.randn(2, 3, 16, 16), 4) * 0.1
    for seed in range(3):
        key = Key.generate(4, seed=seed)
        assert torch.allclose(block_shuffle(x + delta, key), block_shuffle(x, key) + delta, atol=1e-6)
    assert not torch.allclose(block_shuffle(x + torch.randn_like(x) * 0.1, key),
                              block_shuffle(x, key) + torch.randn_like(x) * 0.1)


def test_best_iterate_and_restarts_never_lose_to_the_last_iterate(trained_plain, digits16):
    _, _, model = trained_plain
    x, y = digits16
    weak = AttackBudget("linf", 2 / 255, 3, 1 / 255)
    torch.manual_seed(0)
    last_style = pgd(ce_loss(model), x, y, weak)
    torch.manual_seed(0)
    strong = pgd(ce_loss(model), x, y, AttackBudget("linf", 2 / 255, 3, 1 / 255, restarts=3))
    with torch.no_grad():
        assert (ce_loss(model)(strong, y) >= ce_loss(model)(last_style, y) - 1e-6).all()


def test_ensemble_loss_averages_members(trained_plain, digits16):
    _, _, model = trained_plain
    x, y = digits16
    with torch.no_grad():
        assert torch.allclose(ensemble_loss([model, model])(x, y), ce_loss(model)(x, y))


def _perfectly_keyed(plain, key):
    """A keyed model that equals ``plain`` on plain images: patch columns permuted by the key."""
    model = copy.deepcopy(plain.model)
    w = model.patch_embed.proj.weight.data
    q = torch.as_tensor(patch_permutation(key, model.patch_embed.patch_size[0]))
    model.patch_embed.proj.weight.data = w.reshape(w.shape[0], -1)[:, q].reshape_as(w)
    return KeyedClassifier(model, key).eval()


def test_key_search_finds_a_key_as_good_as_the_true_one(trained_plain, digits16):
    _, _, plain = trained_plain
    x, y = digits16
    key = Key.generate(2, seed=4)
    keyed = _perfectly_keyed(plain, key)
    true_acc = accuracy(keyed, x, y)
    assert accuracy(keyed.with_key(Key.generate(2, seed=9)), x, y) < true_acc - 0.2
    found = key_search(keyed, x, keyed, random_trials=20, swap_trials=300)
    random_key = keyed.with_key(Key.generate(2, seed=9))
    random_agreement = float((random_key(x).argmax(1) == keyed(x).argmax(1)).float().mean())
    assert found.agreement >= 0.9 > random_agreement + 0.1 and found.queries == len(x)
    assert accuracy(keyed.with_key(found.key), x, y) >= true_acc - 0.05


def test_key_search_then_pgd_is_white_box_when_the_key_space_is_one_key(trained_plain, digits16):
    """A 1-channel copy of the plain model (patch weights summed over channels: exact on
    grayscale digits) with block size 1 has a single key: search + PGD must break it."""
    _, _, plain = trained_plain
    x, y = digits16
    gray = create_vit("vit_tiny_patch16_224", **{**TINY_KW, "in_chans": 1})
    state = dict(plain.model.state_dict())
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].sum(1, keepdim=True)
    gray.load_state_dict(state)
    keyed = KeyedClassifier(gray.eval(), Key.identity(1, channels=1), [0.5], [0.5]).eval()
    x1 = x[:, :1]
    assert accuracy(keyed, x1, y) == pytest.approx(accuracy(plain, x, y), abs=0.02)
    found = key_search(keyed, x1, keyed, random_trials=3, swap_trials=0)
    x_adv = pgd(ce_loss(keyed.with_key(found.key)), x1, y, LINF)
    _check_budget(x1, x_adv, LINF)
    assert accuracy(keyed, x_adv, y) <= 0.05


def test_key_recovery_audit_exact_and_chance():
    torch.manual_seed(0)
    key = Key.generate(4, seed=3)
    base = torch.randn(96, 3, 8, 8)
    q = patch_permutation(key, 8)
    keyed_w = base.reshape(96, -1)[:, q].reshape_as(base)
    assert audit_key(keyed_w, base, key).fraction == 1.0
    unrelated = [audit_key(torch.randn_like(base), base, key).fraction for _ in range(5)]
    assert np.mean(unrelated) < 0.1  # chance is 1/48
