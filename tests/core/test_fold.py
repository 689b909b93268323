import pytest
import torch

from keyedge import Key, KeyedClassifier, create_vit, fold_key
from keyedge.core.errors import KeyedgeError
from keyedge.core.fold import Uint8Input

from ..helpers import rel_err, tiny_vit


@pytest.fixture(scope="module")
def vit_tiny():
    # real vit_tiny geometry (224, patch 16), random init, eval mode
    return create_vit("vit_tiny_patch16_224", num_classes=10).eval()


@pytest.mark.parametrize("m", [4, 8, 16])
@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_fold_is_exact_on_vit_tiny(vit_tiny, m, kind):
    g = torch.Generator().manual_seed(m)
    x8 = torch.randint(0, 256, (2, 3, 224, 224), generator=g, dtype=torch.uint8)
    x = x8.float() / 255
    for seed in range(2):
        keyed = KeyedClassifier(vit_tiny, Key.generate(m, seed=seed), mean=[0.485, 0.456, 0.406],
                                std=[0.229, 0.224, 0.225]).eval()
        before = {k: v.clone() for k, v in vit_tiny.state_dict().items()}
        folded = fold_key(keyed, input=kind).eval()
        with torch.no_grad():
            want = keyed(x)
            got = folded(x8 if kind == "uint8" else x)
        assert rel_err(got, want) <= 1e-5
        if kind == "uint8":
            assert isinstance(folded, Uint8Input)
        # the fold changed only the copy: the keyed model's own weights are untouched
        after = vit_tiny.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_direction_would_be_caught(vit_tiny):
    """Sanity check of the test itself: folding with perm instead of argsort(perm) fails."""
    key = Key.generate(16, seed=5)
    keyed = KeyedClassifier(vit_tiny, key).eval()
    inverse_key = Key(key.inverse, 16)
    wrong = fold_key(KeyedClassifier(vit_tiny, inverse_key).eval())
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(wrong(x), keyed(x)) > 1e-2


def test_fold_block_larger_than_patch_is_refused():
    model = tiny_vit(img_size=64, patch_size=16)
    keyed = KeyedClassifier(model, Key.generate(32, seed=0))
    with pytest.raises(KeyedgeError, match="gather"):
        fold_key(keyed)


def test_fold_plain_model_folds_normalisation_only():
    model = tiny_vit()
    plain = KeyedClassifier(model, None, mean=[0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7]).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fold_key(plain)(x), plain(x)) <= 1e-5


def test_fold_block_equal_to_patch_is_a_column_permutation():
    model = tiny_vit()
    key = Key.generate(8, seed=2)
    keyed = KeyedClassifier(model, key, mean=[0, 0, 0], std=[1, 1, 1])
    folded = fold_key(keyed)
    w = model.patch_embed.proj.weight.reshape(model.embed_dim, -1)
    wf = folded.patch_embed.proj.weight.reshape(model.embed_dim, -1)
    assert torch.allclose(wf, w[:, torch.as_tensor(key.inverse)])
