import pytest
import torch
from peft import PeftModel

from keyedge import Key, KeyedClassifier, attach_lora, merge_lora
from keyedge.core.lora import count_parameters, load_adapter, save_adapter

from ..helpers import rel_err, tiny_vit


def _train_a_few_steps(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, 3, 32, 32)
        y = torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("train_patch_embed", [False, True])
def test_merge_is_exact_and_keeps_trained_modules(train_patch_embed):
    base = tiny_vit()
    head_before = base.head.weight.detach().clone()
    pe_before = base.patch_embed.proj.weight.detach().clone()
    peft_model = attach_lora(base, rank=4, train_patch_embed=train_patch_embed)
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < total
    keyed = KeyedClassifier(peft_model, Key.generate(4, seed=0))
    _train_a_few_steps(keyed)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = keyed(x)
    merged = merge_lora(keyed)
    assert not isinstance(merged.model, PeftModel)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        got = merged(x)
    assert rel_err(got, want) <= 1e-5
    assert not torch.equal(merged.model.head.weight, head_before)  # head trained and kept
    assert torch.equal(merged.model.patch_embed.proj.weight, pe_before) != train_patch_embed


def test_lora_targets_blocks_not_patch_embed():
    peft_model = attach_lora(tiny_vit(), rank=2)
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert names and all(".blocks." in n for n in names)
    assert {n.split(".")[-2] for n in names} == {"qkv", "proj", "fc1", "fc2"}


def test_adapter_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    base_state = tiny_vit().state_dict()
    base = tiny_vit()
    base.load_state_dict(base_state)
    peft_model = attach_lora(base, rank=4, train_patch_embed=True)
    _train_a_few_steps(peft_model)
    save_adapter(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = tiny_vit()
    fresh.load_state_dict(base_state)
    loaded = load_adapter(fresh, tmp_path / "adapter").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(loaded(x), peft_model(x)) <= 1e-6
        assert rel_err(merge_lora(loaded)(x), peft_model(x)) <= 1e-5
