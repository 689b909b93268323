"""Markdown + JSON reports and the robust-accuracy-against-eps plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .artifacts import write_json
from .io import atomic_write_text

ATTACK_LABELS = {
    "pgd_linf_transfer_base": "PGD l_inf, transfer from the public base",
    "pgd_l2_transfer_base": "PGD l_2, transfer from the public base",
    "autoattack_linf_transfer_base": "AutoAttack l_inf, transfer from the public base",
    "pgd_linf_transfer_plain_ft": "PGD l_inf, transfer from a plain fine-tune of the base",
    "pgd_linf_transfer_guessed_key": "PGD l_inf, transfer from the keyed weights with a guessed key",
    "adaptive_eot_linf": "adaptive: EOT over random keys (l_inf)",
    "adaptive_bpda_linf": "adaptive: BPDA through a guessed key (l_inf)",
    "adaptive_key_search_linf": "adaptive: key search, then PGD (l_inf)",
    "whitebox_linf": "white-box PGD l_inf with the right key (lower bound)",
    "whitebox_l2": "white-box PGD l_2 with the right key (lower bound)",
}


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table (every report uses this one)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def eval_markdown(results: dict[str, Any], title: str = "keyedge robustness evaluation") -> str:
    models = results["models"]
    names = list(models)
    s = results["settings"]
    lines = [f"# {title}", "",
             f"{s['n_images']} test images. Robust accuracy is over all images; ASR (attack success "
             "rate, in brackets) is over the images the model classified correctly before the attack.", "",
    ]
    rows = [[label, *(pct(models[n].get(row)) for n in names)]
            for row, label in (("clean", "clean, right key"), ("wrong_key", "clean, wrong key (mean)"),
                               ("plain_input", "clean, un-shuffled input"))]
    for a in (a for a in ATTACK_LABELS if any(a in models[n]["attacks"] for n in names)):
        rows.append([ATTACK_LABELS[a], *("—" if models[n]["attacks"].get(a) is None else
                                         f"{pct(models[n]['attacks'][a])} ({pct(models[n]['asr'][a])})"
                                         for n in names)])
    lines.append(markdown_table(["", *names], rows))
    rec = [(n, models[n]["key_recovery"]) for n in names if "key_recovery" in models[n]]
    if rec:
        lines += ["", "## Key recovery from leaked un-fused weights", "",
                  "Linear assignment of the keyed patch embedding's columns to the public base's:", ""]
        lines += [f"- {n}: {pct(r['fraction_recovered'])} of the key recovered (chance {pct(r['chance_level'])})"
                  for n, r in rec]
    ks = [(n, models[n]["key_search"]) for n in names if "key_search" in models[n]]
    if ks:
        lines += ["", "## Key search (adaptive)", ""]
        lines += [f"- {n}: {r['trials']} keys tried; best batch accuracy {pct(r['batch_accuracy'])}; "
                  f"{pct(r['fraction_correct'])} of key entries correct" for n, r in ks]
    lines += ["", "## Settings", "",
              f"- l_inf: eps {s['linf_budget']['eps']:.4f} ({s['linf_budget']['eps'] * 255:.1f}/255), "
              f"{s['linf_budget']['steps']} steps, step {s['linf_budget']['step_size']:.4f}, "
              f"random start {s['random_start']}",
              f"- l_2: eps {s['l2_budget']['eps']}, {s['l2_budget']['steps']} steps, "
              f"step {s['l2_budget']['step_size']:.4f}",
              f"- AutoAttack: {s['autoattack']} on {s['autoattack_n']} images; adaptive attacks on "
              f"{s['adaptive_n']} images; EOT {s['eot_samples']} keys per step; key search "
              f"{s['key_search_random']} random keys + {s['key_search_swaps']} swaps on {s['key_search_batch']} images",
              ""]
    return "\n".join(lines)


def eps_plot(results: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plotted = False
    for i, (name, res) in enumerate(results["models"].items()):
        color = f"C{i}"
        for kind, style in (("transfer_base", "-o"), ("whitebox", "--x")):
            curve = res.get("eps_sweep", {}).get(kind)
            if not curve:
                continue
            eps = [float(e) * 255 for e in curve]
            ax.plot(eps, [100 * v for v in curve.values()], style, color=color,
                    label=f"{name}: {'transfer from base' if kind == 'transfer_base' else 'white-box (key known)'}")
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("l_inf eps (x/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Robust accuracy against eps (PGD l_inf)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_eval_report(results: dict[str, Any], out_dir: Path, title: str = "keyedge robustness evaluation") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    plot = eps_plot(results, out_dir / "robust_vs_eps.png")
    text = eval_markdown(results, title)
    if plot is not None:
        text += f"\n![robust accuracy against eps]({plot.name})\n"
    atomic_write_text(out_dir / "report.md", text)
