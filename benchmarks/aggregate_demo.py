"""Mean and range over several `keyedge demo` runs (different seeds and keys), as Markdown.

    python benchmarks/aggregate_demo.py demo-s0 demo-s1 demo-s2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("clean accuracy (right key)", "clean"),
    ("clean accuracy, wrong key (mean of 5)", "wrong_key"),
    ("clean accuracy, un-shuffled input", "plain_input"),
    ("PGD l_inf 8/255, transfer from the base", "attacks.pgd_linf_transfer_base"),
    ("PGD l_2 0.5, transfer from the base", "attacks.pgd_l2_transfer_base"),
    ("AutoAttack (APGD-CE+DLR) l_inf, transfer from the base", "attacks.autoattack_linf_transfer_base"),
    ("PGD l_inf, transfer from a plain fine-tune", "attacks.pgd_linf_transfer_plain_ft"),
    ("PGD l_inf, keyed weights + guessed key", "attacks.pgd_linf_transfer_guessed_key"),
    ("adaptive: EOT over random keys", "attacks.adaptive_eot_linf"),
    ("adaptive: BPDA through a guessed key", "attacks.adaptive_bpda_linf"),
    ("adaptive: key search, then PGD", "attacks.adaptive_key_search_linf"),
    ("white-box PGD l_inf with the key", "attacks.whitebox_linf"),
    ("key recovered from leaked weights (chance 2.1%)", "key_recovery.fraction_recovered"),
]


def get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def main(dirs: list[str]) -> None:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    models = ["plain", "keyed_full", "keyed_lora"]
    print(f"| mean (min–max) over {len(runs)} seeds | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for label, path in ROWS:
        cells = []
        for m in models:
            vals = [v for r in runs if (v := get(r["models"][m], path)) is not None]
            cells.append("—" if not vals else
                         f"{100 * sum(vals) / len(vals):.1f}% ({100 * min(vals):.1f}–{100 * max(vals):.1f})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    total = [r["timings_s"]["total"] for r in runs]
    print(f"\nDemo wall time: {min(total):.0f}–{max(total):.0f} s on this machine.")


if __name__ == "__main__":
    main(sys.argv[1:])
