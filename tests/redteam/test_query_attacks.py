"""Query attacks are real attacks: on an undefended model they lower accuracy at small budgets."""

import pytest
import torch

from keyedge.redteam.attacks.query import hopskipjump, runner_model, square
from keyedge.core.data import load_data, sample
from keyedge.runtime.runners import open_runner


@pytest.fixture(scope="module")
def images():
    return sample(load_data("digits", 16).test, 24, seed=3)


def _correct(predict, x, y):
    with torch.no_grad():
        return predict(x).argmax(1) == y


def test_square_breaks_a_plain_model_through_its_runner(trained_plain, images):
    run, _, _ = trained_plain
    x, y = images
    with open_runner(run) as runner:
        predict = runner_model(runner)
        before = _correct(predict, x, y)
        broken, x_adv = square(predict, x, y, eps=8 / 255, budgets=(10, 300), seed=0)
        after = _correct(predict, x_adv, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(broken[300], before & ~after)  # the query counts agree with the final images
    assert (broken[10] <= broken[300]).all()
    robust = float((before & ~broken[300]).float().mean())
    assert before.float().mean() > 0.5 and robust < 0.5 * float(before.float().mean())


def test_hopskipjump_label_only_breaks_a_plain_model(trained_plain, images):
    run, _, _ = trained_plain
    x, y = images[0][:8], images[1][:8]
    with open_runner(run) as runner:
        predict = runner_model(runner)
        before = _correct(predict, x, y)
        broken = hopskipjump(predict, x, y, eps=16 / 255, budgets=(50, 2000), classes=10, seed=0)
    assert broken[50].sum() <= broken[2000].sum()  # more queries never un-break an image
    robust = (before & ~broken[2000]).float().mean()
    assert before.float().mean() > 0.5 and robust < before.float().mean()
