"""Markdown + JSON reports and the robust-accuracy-against-eps plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.io import atomic_write_text
from ..core.manifests import write_json
from ..core.tables import markdown_table, pct
from .config import ATTACK_LABELS, THREAT_ROWS


def threat_markdown(models: dict[str, Any], extra: dict[str, dict[str, float | None]] | None = None) -> str:
    """The one threat-model table: robust accuracy per attacker capability (l_inf, same images); ``extra``:
    more columns (a randomized defense's, per row), beside the models'."""
    tables = {n: models[n]["threat_model"] for n in models if "threat_model" in models[n]} | (extra or {})
    if not tables:
        return ""
    rows = [["clean accuracy (these images)", *(pct(t["clean"]) for t in tables.values())]]
    rows += [[label, *(pct(t.get(row)) for t in tables.values())] for row, (label, _) in THREAT_ROWS.items()]
    return markdown_table(["attacker has", *tables], rows)


def eval_markdown(results: dict[str, Any], title: str = "keyedge robustness evaluation",
                  extra_columns: dict[str, dict[str, float | None]] | None = None) -> str:
    models = results["models"]
    names = list(models)
    s = results["settings"]
    eps = s["linf_budget"]["eps"] * 255
    q = min(s.get("query_n", 0), s["n_images"]) if s.get("query_budgets") else s["n_images"]
    lines = [f"# {title}", "",
             f"## Who breaks it: robust accuracy by attacker (l_inf {eps:.0f}/255, on {q} images)", "",
             "Each cell counts an image only if the model is right before *and* after every attack that "
             "attacker has (per image). Where a row says the defense holds, it holds against that attacker "
             "only." + (" Randomized columns (a random ensemble, RND): the mean over independent draws, against "
                        "attackers who know about the randomness (EOT over queries, the expected output); a copy of "
                        "an ensemble's graph gives every member's key, so its file row is its white-box row."
                        if extra_columns else ""), "", threat_markdown(models, extra_columns), "",
             f"## Every attack ({s['n_images']} test images)", "",
             "Robust accuracy (right before and after the attack), then the attack success rate over the "
             "images the model had right. Query rows use the first images only (n in brackets).", ""]
    rows = [[label, *(pct(models[n].get(row)) for n in names)]
            for row, label in (("clean", "clean, right key"), ("wrong_key", "clean, wrong key (mean)"),
                               ("plain_input", "clean, un-shuffled input"))]
    for a in (a for a in ATTACK_LABELS if any(a in models[n]["attacks"] for n in names)):
        rows.append([ATTACK_LABELS[a], *("—" if models[n]["attacks"].get(a) is None else
                                         f"{pct(models[n]['attacks'][a])} (ASR {pct(models[n]['asr'][a])}"
                                         + (f", n={models[n]['n'][a]})" if models[n]["n"][a] != s["n_images"]
                                            else ")") for n in names)])
    lines.append(markdown_table(["", *names], rows))
    sweeps = [(n, models[n]["whitebox_steps"]) for n in names if "whitebox_steps" in models[n]]
    if sweeps:
        steps = list(sweeps[0][1])
        lines += ["", "## White-box convergence (PGD l_inf, one restart)", "",
                  markdown_table(["steps", *names], [[st, *(pct(sw[st]) for _, sw in sweeps)] for st in steps])]
    curves = [(n, models[n]["queries"]) for n in names if "queries" in models[n]]
    if curves:
        budgets = list(curves[0][1]["curves"]["square_linf"])
        lines += ["", f"## Robust accuracy against queries (no key, no weights; {curves[0][1]['n']} images)", "",
                  markdown_table(["attack", "queries", *names],
                                 [[kind, b, *(pct(c["curves"][kind].get(b)) for _, c in curves)]
                                  for kind in ("square_linf", "hopskipjump_linf") for b in budgets
                                  if any(b in c["curves"][kind] for _, c in curves)])]
    rec = [(n, models[n]["key_recovery"]) for n in names if "key_recovery" in models[n]]
    if rec:
        lines += ["", "## Key recovery (what a copy of the device's files gives)", ""]
        for n, r in rec:
            parts = [f"chance {pct(r['chance_level'])}"]
            if "fused_file" in r:
                parts.append(f"from the fused file {pct(r['fused_file']['fraction_recovered'])} of the key "
                             f"(agreement {pct(r['fused_file']['agreement'])})")
                parts.append(f"from the un-fused columns alone {pct(r['unfused_columns']['fraction_recovered'])}")
            parts.append(f"from un-fused weights + {r['probes']['queries']} probe queries "
                         f"{pct(r['probes']['fraction_recovered'])}")
            lines.append(f"- {n}: " + "; ".join(parts))
    ks = [(n, models[n]["key_search"]) for n in names if "key_search" in models[n]]
    if ks:
        lines += ["", "## Key search (agreement with the deployed model)", ""]
        lines += [f"- {n}: {r['trials']} keys scored on {r['queries']} queries; the found key agrees with the "
                  f"true one on {pct(r['agreement'])} of the test images ({pct(r['fraction_correct'])} of its "
                  "entries right)" for n, r in ks]
    if "blast_radius" in results:
        b = results["blast_radius"]
        lines += ["", f"## Blast radius: white-box examples of device A replayed on device B "
                      f"({b['n_images']} images, PGD l_inf {eps:.0f}/255, {b['attack']['steps']} steps)", "",
                  markdown_table(["crafted on \\ replayed on", *b["devices"]],
                                 [[a, *(pct(v) for v in row)] for a, row in zip(b["devices"], b["matrix"])]),
                  "", "Clean: " + ", ".join(f"{d} {pct(c)}" for d, c in zip(b["devices"], b["clean"])) + "."]
    wb = s["whitebox_budget"]
    lines += ["", "## Settings", "",
              f"- transfer / adaptive PGD l_inf: eps {eps:.1f}/255, {s['linf_budget']['steps']} steps, step "
              f"{s['linf_budget']['step_size'] * 255:.2f}/255, random start, best iterate",
              f"- white-box PGD l_inf: {wb['steps']} steps, {wb['restarts']} restarts, best iterate; l_2 eps "
              f"{s['l2_budget']['eps']}",
              f"- AutoAttack: {s['autoattack']}; EOT {s['eot_samples']} keys per step; key search "
              f"{s['key_search_random']} random keys + {s['key_search_swaps']} swaps on {s['key_search_batch']} "
              f"queried images; query attacks at {', '.join(map(str, s['query_budgets']))} queries per image",
              f"- evaluation seed {s['seed']}", ""]
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
    return _save_robust_plot(fig, ax, "l_inf eps (x/255)", "Robust accuracy against eps (PGD l_inf)", path)


def _save_robust_plot(fig, ax, xlabel: str, title: str, path: Path) -> Path:
    """Label a robust-accuracy figure and write it atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def query_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Robust accuracy against the number of queries (Square: scores; HopSkipJump: labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(n, r["queries"]) for n, r in results["models"].items() if "queries" in r]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, q) in enumerate(curves):
        for kind, style in (("square_linf", "-o"), ("hopskipjump_linf", "--x")):
            curve = q["curves"].get(kind)
            if curve:
                ax.plot([int(b) for b in curve], [100 * v for v in curve.values()], style, color=f"C{i}",
                        label=f"{name}: {'Square (scores)' if kind == 'square_linf' else 'HopSkipJump (labels)'}")
    ax.set_xscale("log")
    return _save_robust_plot(fig, ax, "queries per image", "Robust accuracy against queries (no key, no weights)", path)


def write_eval_report(results: dict[str, Any], out_dir: Path, title: str = "keyedge robustness evaluation") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    text = eval_markdown(results, title)
    for plot, caption in ((eps_plot(results, out_dir / "robust_vs_eps.png"), "robust accuracy against eps"),
                          (query_plot(results, out_dir / "robust_vs_queries.png"), "robust accuracy against queries")):
        if plot is not None:
            text += f"\n![{caption}]({plot.name})\n"
    atomic_write_text(out_dir / "report.md", text)
