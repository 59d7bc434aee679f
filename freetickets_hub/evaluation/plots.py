"""PNG figures from evaluation results: reliability diagram, member disagreement, risk–coverage curve.

Figures are drawn from the results dict alone (no model, no data), with matplotlib's object API
and the Agg canvas, so no display or global pyplot state is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freetickets_hub.artifact.files import atomic_path
from freetickets_hub.errors import MissingDependencyError

__all__ = ["PLOT_NAMES", "write_plots"]

PLOT_NAMES = {
    "reliability": "reliability.png",
    "disagreement": "disagreement.png",
    "risk_coverage": "risk_coverage.png",
}


def write_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the three figures into ``folder`` (created if needed); returns their paths.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib") from err
    folder = Path(folder)
    drawers = {"reliability": _reliability, "disagreement": _disagreement, "risk_coverage": _risk_coverage}
    paths = []
    for key, draw in drawers.items():
        figure = Figure(figsize=(4.8, 4.2), dpi=120, layout="constrained")
        draw(figure.add_subplot(), results)
        path = folder / PLOT_NAMES[key]
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        paths.append(path)
    return paths


def _reliability(ax: Any, results: dict[str, Any]) -> None:
    bins = results["reliability"]
    edges = bins["edges"]
    width = edges[1] - edges[0]
    filled = [i for i, count in enumerate(bins["count"]) if count]
    centers = [(edges[i] + edges[i + 1]) / 2 for i in filled]
    accuracy = [bins["accuracy"][i] for i in filled]
    confidence = [bins["confidence"][i] for i in filled]
    ax.bar(centers, accuracy, width=width, color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    low = [min(a, c) for a, c in zip(accuracy, confidence, strict=True)]
    gap = [abs(a - c) for a, c in zip(accuracy, confidence, strict=True)]
    ax.bar(centers, gap, bottom=low, width=width, facecolor="none", edgecolor="tab:red", hatch="///", linewidth=0.5,
           label="gap to mean confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy")
    ece = results["ensemble"]["ece"]
    ax.set_title(
        f"Reliability, ensemble (T={results['temperature']:.2f}, {results['num_images']} images)\n"
        f"ECE {ece:.4f} over {results['ece_bins']} equal-width bins"
    )
    ax.legend(loc="upper left", fontsize="small")


def _disagreement(ax: Any, results: dict[str, Any]) -> None:
    matrix = results["diversity"]["disagreement"]["matrix"]
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.3f}",
                ha="center",
                va="center",
                color="white" if value < max(map(max, matrix)) / 2 else "black",
            )
    ticks = range(len(matrix))
    ax.set(xticks=ticks, yticks=ticks, xlabel="member", ylabel="member")
    ax.set_title(f"Top-1 disagreement between members\n{results['dataset']} [{results['split']}]")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def _risk_coverage(ax: Any, results: dict[str, Any]) -> None:
    selective = results["selective"]
    ax.plot(
        selective["coverage"], selective["risk"], color="tab:blue", label=f"ensemble (AURC {selective['aurc']:.4f})"
    )
    error = selective["risk"][-1]  # at full coverage: the error rate; an oracle accepts the right ones first
    oracle = [max(0.0, (c - (1 - error)) / c) for c in selective["coverage"]]
    ax.plot(selective["coverage"], oracle, "--", color="gray", label=f"oracle (AURC {selective['aurc_optimal']:.4f})")
    threshold = (selective.get("stored_rule") or {}).get("threshold")
    if threshold and threshold["risk"] is not None:  # the stored abstention rule on this split, and its target
        ax.axhline(threshold["target_risk"], color="tab:red", linestyle=":", linewidth=1, label="target risk")
        ax.plot(threshold["coverage"], threshold["risk"], "o", color="tab:red",
                label=f"stored rule ({threshold['score']}): coverage {threshold['coverage']:.2f}")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage", ylabel="risk (error rate of accepted)")
    ax.set_title("Risk–coverage (accept by max probability)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
