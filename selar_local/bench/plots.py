"""PNG plots of a benchmark report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"cot": "o", "selar": "s", "soft": "^", "moi": "D"}


def accuracy_vs_tokens(sections: Sequence[Any], path: Path) -> Path:
    """Accuracy (with its 95% interval) against mean generated tokens, one point per method,
    one colour per (run, data set)."""
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, section in enumerate(sections):
        colour = colours[i % len(colours)]
        xs = [r.mean_tokens for r in section.rows]
        ys = [100 * r.accuracy for r in section.rows]
        for r, x, y in zip(section.rows, xs, ys):
            ax.errorbar(x, y, yerr=[[y - 100 * r.ci_lo], [100 * r.ci_hi - y]], fmt=MARKERS.get(r.method.split()[0], "x"),
                        color=colour, capsize=3, markersize=7)
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.plot([], [], color=colour, label=f"{section.dataset} - {section.model}")
    ax.set_xlabel("mean generated tokens per item")
    ax.set_ylabel("accuracy % (95% Wilson interval)")
    ax.set_title("Accuracy vs tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def entropy_trace(record: dict, path: Path, *, tau: float | None = None) -> Path:
    """Per-step gate entropy of one item; steps whose next input was soft marked in red."""
    trace = record.get("trace") or {}
    entropy = list(trace.get("entropy") or [])
    soft = str(trace.get("soft") or "")
    steps = list(range(len(entropy)))
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=120)
    ax.plot(steps, entropy, color="0.35", linewidth=0.8, label="normalised top-k entropy")
    soft_steps = [i for i, flag in enumerate(soft) if flag == "1" and i < len(entropy)]
    if soft_steps:
        ax.scatter(soft_steps, [entropy[i] for i in soft_steps], s=10, color="tab:red", zorder=3,
                   label=f"soft step ({len(soft_steps)} of {len(entropy)})")
    if tau is not None:
        ax.axhline(tau, color="tab:blue", linestyle="--", linewidth=0.8, label=f"tau = {tau}")
    verdict = "correct" if record.get("correct") else "wrong"
    ax.set_title(f"{record.get('id')} - {record.get('method')} (seed {record.get('seed')}): "
                 f"{verdict}, answer {record.get('extracted')!r} vs gold {record.get('gold')!r}", fontsize=9)
    ax.set_xlabel("generated token")
    ax.set_ylabel("entropy")
    ax.set_ylim(-0.02, 1.05 if not entropy or max(entropy) <= 1.0 else max(entropy) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
