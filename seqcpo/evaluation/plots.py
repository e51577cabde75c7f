"""The PNG plots of an evaluation's results dict: win rate and MAUVE per run, the alpha sweep of weight-space
ensembles, a grid's separation curves. Every write is atomic."""

from __future__ import annotations

import io
import os
from pathlib import Path

from seqcpo.io import atomic_write_bytes

PLOT_WINRATE = "winrate.png"
PLOT_MAUVE = "mauve.png"
PLOT_ALPHA = "alpha_sweep.png"
PLOT_SEPARATION = "separation.png"


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _grouped_bars(runs: list[dict], value, error, ylabel: str, title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [r for r in runs if value(r) is not None]
    if not runs:
        return False
    labels = list(dict.fromkeys(r["label"] for r in runs))
    decodings = list(dict.fromkeys(r["decoding"] for r in runs))
    width = 0.8 / len(decodings)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) * max(1, len(decodings)) ** 0.5 + 2), 3.5))
    for j, dec in enumerate(decodings):
        xs, ys, errs = [], [], [[], []]
        for i, lab in enumerate(labels):
            r = next((r for r in runs if r["label"] == lab and r["decoding"] == dec), None)
            if r is None:
                continue
            xs.append(i + (j - (len(decodings) - 1) / 2) * width)
            ys.append(value(r))
            lo, hi = error(r) if error else (value(r), value(r))
            errs[0].append(value(r) - lo)
            errs[1].append(hi - value(r))
        ax.bar(xs, ys, width=width, label=dec, yerr=errs if error else None, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, title="decoding", title_fontsize=7)
    _save_png(fig, path)
    plt.close(fig)
    return True


def _alpha_plot(runs: list[dict], judge: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.get("alpha") is not None]
    if len({r["alpha"] for r in runs}) < 2:
        return False
    metrics = [("win rate vs gold", lambda r: (r.get("win_rate_vs_gold") or {}).get("rate")),
               ("MAUVE", lambda r: (r.get("mauve") or {}).get("score"))]
    metrics = [(name, f) for name, f in metrics if any(f(r) is not None for r in runs)]
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, (name, f) in zip(axes[0], metrics):
        for dec in dict.fromkeys(r["decoding"] for r in runs):
            pts = sorted(((r["alpha"], f(r), r) for r in runs if r["decoding"] == dec and f(r) is not None),
                         key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", label=dec)
            if name.startswith("win"):
                lo = [p[2]["win_rate_vs_gold"]["ci_low"] for p in pts]
                hi = [p[2]["win_rate_vs_gold"]["ci_high"] for p in pts]
                ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xlabel("alpha (ensemble weight)")
        ax.set_ylabel(name)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"weight-space ensemble sweep; judge: {judge}", fontsize=8)
    _save_png(fig, path)
    plt.close(fig)
    return True


def write_plots(results: dict, out_dir: str | os.PathLike, judge: str = "no judge") -> list[str]:
    """Write the PNGs that the results support (``judge``: the judge's one-line label, for the titles).
    Returns their file names."""
    out_dir = Path(out_dir)
    runs = results.get("runs", [])
    written = []

    def wr_rate(r):
        return (r.get("win_rate_vs_gold") or {}).get("rate")

    def wr_ci(r):
        w = r["win_rate_vs_gold"]
        return w["ci_low"], w["ci_high"]

    if _grouped_bars(runs, wr_rate, wr_ci, "win rate vs gold (95% CI)", f"judge: {judge}", out_dir / PLOT_WINRATE):
        written.append(PLOT_WINRATE)
    if _grouped_bars(runs, lambda r: (r.get("mauve") or {}).get("score"), None, "MAUVE vs gold",
                     "MAUVE (n per side in report.md)", out_dir / PLOT_MAUVE):
        written.append(PLOT_MAUVE)
    if _alpha_plot(runs, judge, out_dir / PLOT_ALPHA):
        written.append(PLOT_ALPHA)
    if _separation_plot((results.get("grid") or {}).get("training") or {}, out_dir / PLOT_SEPARATION):
        written.append(PLOT_SEPARATION)
    return written


def _separation_plot(training: dict, path: Path) -> bool:
    """``rewards/accuracies``, ``rewards/margins`` and ``rewards/gold_top1`` over steps, one line per arm,
    a dotted line where the arm's negatives became separated."""
    keys = ("rewards/accuracies", "rewards/margins", "rewards/gold_top1")
    arms = {a: t for a, t in training.items() if any(t["curves"].get(k) for k in keys)}
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (arm, t) in enumerate(arms.items()):
            pts = t["curves"].get(key) or []
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=arm, lw=1.2)
            if t.get("separated_at_step") is not None and key == "rewards/accuracies":
                ax.axvline(t["separated_at_step"], color=line.get_color(), ls=":", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_title(key, fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("pairwise signal per arm (dotted: negatives separated)", fontsize=9)
    _save_png(fig, path)
    plt.close(fig)
    return True
