"""Mean and range over several `keyedge demo` runs (different seeds and keys), as Markdown.

    python benchmarks/aggregate_demo.py demo-s0 demo-s1 demo-s2

First the threat-model table (robust accuracy per attacker capability, l_inf 8/255, per image over
everything that attacker has), then every attack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from keyedge.redteam.config import ATTACK_LABELS, THREAT_ROWS

MODELS = ["plain", "keyed_full", "keyed_lora"]


def get(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def table(runs: list[dict], rows: list[tuple[str, str]], title: str) -> str:
    lines = [f"| {title} | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for label, path in rows:
        cells = []
        for m in MODELS:
            vals = [v for r in runs if (v := get(r["models"][m], path)) is not None]
            cells.append("—" if not vals else
                         f"{100 * sum(vals) / len(vals):.1f}% ({100 * min(vals):.1f}–{100 * max(vals):.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(dirs: list[str]) -> None:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    q = runs[0]["settings"]["query_n"]
    print(table(runs, [("clean accuracy (these images)", "threat_model.clean")] +
                [(label, f"threat_model.{row}") for row, (label, _) in THREAT_ROWS.items()],
                f"attacker has (mean, min–max over {len(runs)} seeds; {q} images each)"))
    print()
    print(table(runs, [("clean, right key", "clean"), ("clean, wrong key (mean)", "wrong_key"),
                       ("clean, un-shuffled input", "plain_input")] +
                [(label, f"attacks.{a}") for a, label in ATTACK_LABELS.items()] +
                [("key read off the fused file (fraction)", "key_recovery.fused_file.fraction_recovered"),
                 ("key from un-fused weights alone (fraction; chance 2.1%)",
                  "key_recovery.unfused_columns.fraction_recovered"),
                 ("key from un-fused weights + 48 probe queries (fraction)", "key_recovery.probes.fraction_recovered"),
                 ("key search: agreement of the found key", "key_search.agreement")],
                f"every attack (mean, min–max over {len(runs)} seeds; {runs[0]['settings']['n_images']} images)"))
    blasts = [r["blast_radius"] for r in runs if "blast_radius" in r]
    if blasts:
        off = [v for b in blasts for i, row in enumerate(b["matrix"]) for j, v in enumerate(row) if i != j]
        diag = [row[i] for b in blasts for i, row in enumerate(b["matrix"])]
        print(f"\nBlast radius: white-box from one device, replayed on another: {100 * min(off):.1f}–"
              f"{100 * max(off):.1f}% robust (mean {100 * sum(off) / len(off):.1f}%); on the device itself "
              f"{100 * min(diag):.1f}–{100 * max(diag):.1f}%.")
    total = [r["timings_s"]["total"] for r in runs]
    print(f"\nDemo wall time: {min(total):.0f}–{max(total):.0f} s on this machine.")


if __name__ == "__main__":
    main(sys.argv[1:])
