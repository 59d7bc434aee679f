"""benchmarks/finetune.py and its datasets: written once and checked, the sweep's rule, the targets' verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from freetickets_hub.errors import FreeTicketsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import finetune
    import finetune_data
    import ood_stats

    return finetune, finetune_data, ood_stats


def test_a_dataset_folder_is_written_once_and_checked(
    bench: tuple[ModuleType, ModuleType, ModuleType], tmp_path: Path
) -> None:
    from datasets import load_dataset

    _, data, _ = bench
    dest = data.write_digits(tmp_path / "digits")
    splits = load_dataset(str(dest))
    assert (len(splits["train"]), len(splits["test"])) == (1347, 450)
    written = {p: p.stat().st_mtime_ns for p in (dest / "data").iterdir()}
    assert data.write_digits(dest) == dest and {p: p.stat().st_mtime_ns for p in written} == written
    (dest / data.WRITTEN).unlink()  # as if interrupted before the record: written again, in full
    data.write_digits(dest)
    assert (dest / data.WRITTEN).is_file() and not list((dest / "data").glob(".*partial"))
    marker = json.loads((dest / data.WRITTEN).read_text())
    (dest / data.WRITTEN).write_text(json.dumps({**marker, "test_size": 0.5}))
    with pytest.raises(FreeTicketsError, match="holds another dataset"):
        data.write_digits(dest)


def _scores(pairs: list[tuple[float, float]], nll: list[float]) -> dict:
    return {"scores": [{"lr": lr, "backbone_lr": b, "val_nll": v} for (lr, b), v in zip(pairs, nll, strict=True)]}


def test_the_sweep_picks_the_lowest_mean_rank(bench: tuple[ModuleType, ModuleType, ModuleType]) -> None:
    finetune, _, _ = bench
    pairs = [(0.1, 0.02), (0.1, 0.1), (0.3, 0.06), (0.3, 0.3)]
    # the first is best on one transfer and worst on two (mean rank 3); the second is second everywhere (2)
    sweeps = {
        "one": _scores(pairs, [0.1, 0.2, 0.3, 0.4]),
        "two": _scores(pairs, [0.4, 0.2, 0.1, 0.3]),
        "three": _scores(pairs, [0.4, 0.2, 0.3, 0.1]),
    }
    table, best = finetune.sweep_table(sweeps)
    assert best == (0.1, 0.1)
    assert "2.00 ◀" in table and table.count("◀") == 1
    with pytest.raises(FreeTicketsError, match="different LR grids"):
        finetune.sweep_table({"one": sweeps["one"], "two": _scores(pairs[::-1], [0.1, 0.2, 0.3, 0.4])})


def _row(correct: np.ndarray, nll: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    metrics = {"calibrated": {"ece": 0.01}, "ood_auroc": 0.8, "diversity": None, "wall_time_s": 1.0, "total_steps": 9}
    scores = np.linspace(0, 1, len(correct))
    return metrics, {"correct": correct, "nll": nll, "in_score": scores, "out_score": scores[:50] - 0.5}


def test_the_targets_verdict_needs_every_seed_and_the_interval(
    bench: tuple[ModuleType, ModuleType, ModuleType],
) -> None:
    """Better at every seed beyond the paired interval: *better*; the same images: *tie*; the reverse: *worse*."""
    finetune, _, stats = bench
    n = 400
    rng = np.random.default_rng(0)
    strong = {s: _row((rng.random(n) < 0.95).astype(float), rng.random(n) * 0.2) for s in (0, 1, 2)}
    weak = {s: _row((rng.random(n) < 0.6).astype(float), 1.0 + rng.random(n)) for s in (0, 1, 2)}
    rows = {"frozen_masks": strong, "scratch": weak, "dense": weak}
    table = finetune.summarize(rows, stats.Draws.make(n, 50, 200, seed=0))
    versus = table["frozen_masks_vs_scratch"]
    assert (versus["correct"]["verdict"], versus["nll"]["verdict"]) == ("better", "better")
    assert versus["seeds"] == [0, 1, 2] and versus["correct"]["mean"] > 0.2
    same = finetune.summarize({"frozen_masks": strong, "scratch": strong}, stats.Draws.make(n, 50, 200, seed=0))
    assert same["frozen_masks_vs_scratch"]["nll"]["verdict"] == "tie"
    reverse = finetune.summarize({"frozen_masks": weak, "dense": strong}, stats.Draws.make(n, 50, 200, seed=0))
    assert reverse["frozen_masks_vs_dense"]["correct"]["verdict"] == "worse"
    assert table["frozen_masks"]["seeds"] == [0, 1, 2] and table["frozen_masks"]["accuracy"] > 0.9
