"""Quality over training steps, per arm: the ``quality/*`` metrics logged by
:class:`seqcpo.training.quality.QualityCallback`, the step where each stops improving, beside the step where the
arm's negatives became separated, and one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

QUALITY_KEYS = ("quality/rouge_l", "quality/similarity", "quality/repetition", "quality/distinct_2")
HIGHER_IS_BETTER = {"quality/rouge_l": True, "quality/similarity": True, "quality/repetition": False,
                    "quality/distinct_2": True}


def quality_curves(history: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Trainer log history (rows without the metric skipped; a step
    logged twice, as after a resume, keeps its last value)."""
    out: dict[str, dict[int, float]] = {}
    for row in history:
        for key in QUALITY_KEYS:
            if isinstance(row.get(key), (int, float)):
                out.setdefault(key, {})[int(row["step"])] = float(row[key])
    return {k: sorted(v.items()) for k, v in out.items()}


def best_step(curve: Sequence[tuple[int, float]], higher_is_better: bool = True) -> int | None:
    """The step with the best value (the first of equals): where quality stopped improving.

    >>> best_step([(0, 0.1), (50, 0.3), (100, 0.3), (150, 0.2)])
    50
    >>> best_step([(0, 0.5), (50, 0.4)], higher_is_better=False)
    50
    """
    if not curve:
        return None
    sign = 1.0 if higher_is_better else -1.0
    best = max(curve, key=lambda sv: (sign * sv[1], -sv[0]))
    return best[0]


def curves_summary(curves: dict[str, list[tuple[int, float]]]) -> dict[str, int | None]:
    """``{metric: best step}`` for the metrics an arm logged."""
    return {k: best_step(v, HIGHER_IS_BETTER[k]) for k, v in curves.items()}


def curves_markdown(training: dict[str, dict]) -> list[str]:
    """The report's table: per arm, the step of best ROUGE-L / similarity / repetition and the separation step."""
    rows = [(name, t) for name, t in training.items() if t.get("quality")]
    if not rows:
        return []
    lines = ["## Quality over training steps", "",
             "Every `eval_steps` each trained arm continued a fixed slice of held-out prefixes (greedy); the table "
             "gives the step where each metric was best (where it stopped improving) beside the step where the "
             "arm's negatives were all ranked below the gold (separation). Curves: `quality.png`.", "",
             "| arm | best ROUGE-L at | best similarity at | least repetition at | separated at |",
             "|---|---|---|---|---|"]
    for name, t in rows:
        best = t["quality_best_step"]
        cells = [best.get(k) for k in ("quality/rouge_l", "quality/similarity", "quality/repetition")]
        sep = t.get("separated_at_step")
        lines.append(f"| {name} | " + " | ".join("" if c is None else str(c) for c in cells)
                     + f" | {'' if sep is None else sep} |")
    return lines + [""]


def plot_quality(training: dict[str, dict], out_dir: Path) -> str | None:
    """``quality.png``: one panel per quality metric, one line per arm; None when no arm logged quality."""
    arms = {name: t["quality"] for name, t in training.items() if t.get("quality")}
    if not arms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seqcpo.io import atomic_output

    fig, axes = plt.subplots(1, len(QUALITY_KEYS), figsize=(4.2 * len(QUALITY_KEYS), 3.6))
    for ax, key in zip(axes, QUALITY_KEYS):
        for name, curves in arms.items():
            pts = curves.get(key) or []
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=name)
        ax.set_title(key.split("/")[1])
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "quality.png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path.name
