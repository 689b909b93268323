"""The demo's recipe: one dataclass, the one source of its defaults (the CLI reads them). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..redteam.config import EvalConfig, RandomizedConfig

SMALL_VIT = dict(depth=4, embed_dim=96, num_heads=3)


@dataclass
class DemoConfig:
    out: str = "demo-out"
    seed: int = 0
    model: str = "vit_tiny_patch16_224"
    img_size: int = 32
    patch_size: int = 4
    block_size: int = 4
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(SMALL_VIT))
    base_epochs: int = 18
    base_lr: float = 2e-3
    plain_epochs: int = 5
    plain_lr: float = 5e-4
    keyed_epochs: int = 12
    keyed_lr: float = 1e-3
    lora_epochs: int = 12
    lora_lr: float = 3e-3
    lora_rank: int = 8
    own_keys: int = 2            # the attacker's own-key fine-tunes (and fleet devices B, C)
    own_key_epochs: int = 4
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n=160, query_n=10, whitebox_restarts=1, eot_samples=4,
                                                                key_search_random=50, key_search_swaps=200))
    ensemble_members: int = 4    # a random ensemble of keyed LoRA members (its own keys)
    ensemble_epochs: int = 6
    ensemble_draws: tuple[int, ...] = (1, 2)  # members answering each query
    rnd_sigma: float = 0.02      # RND on the keyed LoRA model
    randomized: RandomizedConfig = field(default_factory=lambda: RandomizedConfig(draws=10, whitebox_steps=20))
    parity_n: int = 100
    bench_batches: tuple[int, ...] = (1, 8)
    bench_rounds: int = 5
    bench_iters: int = 20
    force: bool = False

    @classmethod
    def quick(cls, out: str, **overrides: Any) -> "DemoConfig":
        """A few-epoch smoke version (tests, a first look): same steps, tiny budgets."""
        cfg = cls(out=out, base_epochs=2, plain_epochs=1, keyed_epochs=1, lora_epochs=1, own_key_epochs=1,
                  eval=EvalConfig(n=48, steps=2, whitebox_steps=(2, 5), whitebox_restarts=1, autoattack="off",
                                  eps_sweep=(8 / 255, 64 / 255), eot_samples=2, key_search_random=4,
                                  key_search_swaps=4, key_search_batch=16, query_n=8, query_budgets=(20, 100),
                                  wrong_keys=2), parity_n=32, bench_rounds=1, bench_iters=2,
                  ensemble_members=2, ensemble_epochs=1,
                  randomized=RandomizedConfig(budgets=(20, 100), eot=(1, 2), draws=3, whitebox_steps=2,
                                              square_expected_max=100))
        return replace(cfg, **overrides)
