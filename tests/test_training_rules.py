"""The loop's rules, observed on tiny real runs: LR reset after the escape, BatchNorm statistics kept by
the escape's gradient probe, fp16-skipped steps, the prune-rate cycles and weight-decay groups."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from freetickets_hub.training.recipe import load_recipe
from freetickets_hub.training.sparsity import SparseEngine

TINY = ["max_train_samples=48", "val_size=24", "batch_size=16", "eval_batch_size=64", "update_interval=2"]
train_module = importlib.import_module("freetickets_hub.training.train")  # the package exports train()
RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "fmnist_tiny_edst.yaml"


def _train(out: Path, dataset: Path, *overrides: str) -> dict:
    recipe = load_recipe(RECIPE, [f"dataset={dataset}", *TINY, *overrides])
    return train_module.train(recipe, out)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def test_escape_resets_the_lr_and_keeps_batchnorm_statistics(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observed through public seams only: ``Accelerator.log`` and ``SparseEngine.step`` / ``escape``."""
    logged: dict[int, float] = {}
    last_step: dict[str, object] = {}
    escapes: list[tuple[int, bool, dict, dict]] = []
    original_log, original_step, original_escape = Accelerator.log, SparseEngine.step, SparseEngine.escape

    def log(self: Accelerator, values: dict, step: int | None = None, **kwargs: object) -> None:
        logged[step] = values["train/lr"]
        original_log(self, values, step=step, **kwargs)

    def step(self: SparseEngine, global_step: int) -> dict | None:
        stats = original_step(self, global_step)  # called after every optimizer step
        last_step.update(step=global_step, buffers=_buffers(self.model))
        return stats

    def escape(self: SparseEngine) -> dict:
        # the gradient probe has run by now (its forward in train mode), and nothing else since the last step
        escapes.append((last_step["step"], self.model.training, last_step["buffers"], _buffers(self.model)))
        return original_escape(self)

    monkeypatch.setattr(Accelerator, "log", log)
    monkeypatch.setattr(SparseEngine, "step", step)
    monkeypatch.setattr(SparseEngine, "escape", escape)
    summary = _train(tmp_path, tiny_dataset, "explore_epochs=1", "refine_epochs=2", "num_members=3")
    assert [e[0] for e in escapes] == [3 + 6, 3 + 12]  # 3 steps per epoch: after refinements 1 and 2
    for step_index, training, before, after in escapes:
        assert logged[step_index] == 0.001 and logged[step_index + 1] == 0.01  # the step after the escape: reset LR
        assert training  # the gradient probe ran in train mode ...
        assert summary["total_steps"] > step_index
        for name in before:  # ... and left every BatchNorm statistic as it was
            assert torch.equal(before[name], after[name]), f"{name} moved during the escape's probe"
    assert any(n.endswith("running_mean") for n in escapes[0][2])


def test_fp16_skipped_steps_neither_count_nor_update_masks(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grad-scaler skip (inf/NaN gradients) is simulated: the step is not taken and ``step_was_skipped`` is set."""
    calls, skip = {"n": 0}, {2, 5}
    original_step = AcceleratedOptimizer.step
    update_steps: list[int] = []
    original_engine_step = SparseEngine.step

    def step(self: AcceleratedOptimizer, closure: object = None) -> None:
        calls["n"] += 1
        self._is_overflow = calls["n"] in skip
        if not self._is_overflow:
            original_step(self, closure)

    def engine_step(self: SparseEngine, global_step: int) -> dict | None:
        stats = original_engine_step(self, global_step)
        if stats is not None:
            update_steps.append(global_step)
        return stats

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    monkeypatch.setattr(SparseEngine, "step", engine_step)
    summary = _train(tmp_path, tiny_dataset, "explore_epochs=2", "refine_epochs=1", "num_members=1")
    batches = 3 * 3  # three epochs of three batches
    assert calls["n"] == batches
    assert summary["total_steps"] == batches - len(skip) and summary["skipped_steps"] == len(skip)
    assert summary["costs"]["train_images_processed"] == batches * 16  # the compute was spent all the same
    assert update_steps == [2, 4, 6]  # every ΔT=2 of the 7 *applied* steps (counting batches: 2, 4, 6, 8)
    assert capsys.readouterr().out.count("skipped by the fp16 grad scaler") == len(skip)


def test_prune_rate_cycles_restart_at_escapes(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: list[tuple[int, int]] = []
    original = SparseEngine.start_phase
    monkeypatch.setattr(
        SparseEngine, "start_phase", lambda self, s, n: (starts.append((s, n)), original(self, s, n))[1]
    )
    common = ("explore_epochs=2", "refine_epochs=1", "num_members=3", "prune_rate_schedule=cosine")
    _train(tmp_path / "escape", tiny_dataset, *common)
    assert starts == [(0, 9), (9, 3), (12, 3)]  # exploration + refinement 1 share one cycle (3 steps per epoch)
    starts.clear()
    _train(tmp_path / "phase", tiny_dataset, *common, "prune_rate_restart=phase")
    assert starts == [(0, 6), (6, 3), (9, 3), (12, 3)]


def test_no_weight_decay_on_biases_and_norms_is_a_setting(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[list[dict]] = []
    original = SparseEngine.__init__

    def init(self: SparseEngine, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *args, **kwargs) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        groups.append(
            [{"wd": g["weight_decay"], "names": {names[id(p)] for p in g["params"]}} for g in optimizer.param_groups]
        )
        original(self, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(SparseEngine, "__init__", init)
    for setting in ("true", "false"):
        _train(
            tmp_path / setting,
            tiny_dataset,
            "explore_epochs=0",
            "refine_epochs=1",
            "num_members=1",
            f"filter_bias_and_bn={setting}",
        )
    filtered, plain = groups
    no_decay = next(g["names"] for g in filtered if g["wd"] == 0.0)
    decay = next(g["names"] for g in filtered if g["wd"] == 5e-4)
    assert no_decay and all(n.endswith(".bias") or ".bn" in n or "norm" in n for n in no_decay)
    assert "fc.bias" in no_decay and "fc.weight" in decay and all(n.endswith("weight") for n in decay)
    assert len(plain) == 1 and plain[0]["wd"] == 5e-4  # the CIFAR code: weight decay on every parameter
