"""One visible training loop for every method (EDST, DST, dense, dense ensemble, static sparse).

``train(recipe, output_dir)`` trains the members, evaluates them on the test split (reporting
only), and writes ``output_dir`` as a Hub-ready folder plus ``train_summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from freetickets_hub import architectures as _architectures  # noqa: F401  (registers WRNs)
from freetickets_hub.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.ensemble import EnsembleModel
from freetickets_hub.files import write_text_atomic
from freetickets_hub.metrics import ECE_BINS, classification_metrics
from freetickets_hub.model_card import SUMMARY_NAME
from freetickets_hub.outputs import combine_member_logits

from .data import ImageData, ImageSplit, augment_batch, load_image_data, normalize
from .phases import Phase, plan_runs
from .recipe import Recipe
from .sparsity import SparseEngine, maskable_weights

__all__ = ["Ticket", "train"]

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One ensemble member as it left its phase."""

    phase: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    val_accuracy: float | None
    step: int


def train(recipe: Recipe, output_dir: str | Path, *, report_to: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` and write the ensemble to ``output_dir``; returns the summary dict."""
    output_dir = Path(output_dir)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        gradient_accumulation_steps=recipe.grad_accum_steps,
        log_with=report_to,
        project_dir=str(output_dir),
    )
    if report_to:
        accelerator.init_trackers("freetickets", config=_flat_config(recipe))
    data = load_image_data(recipe)
    accelerator.print(
        f"{recipe.method}: {recipe.architecture}, M={recipe.num_members}, "
        f"sparsity {recipe.sparsity if recipe.is_sparse else 0.0}; "
        f"{len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test images"
    )
    tickets: list[Ticket] = []
    for run in plan_runs(recipe):
        tickets += _train_run(recipe, data, run.phases, run.seed, accelerator)
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        model = _build_ensemble(recipe, data, tickets)
        summary = _summarize(recipe, data, model, tickets, time.perf_counter() - started, accelerator.device)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        model.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _train_run(
    recipe: Recipe, data: ImageData, phases: list[Phase], seed: int, accelerator: Accelerator
) -> list[Ticket]:
    """Train one model through ``phases`` (a fresh init from ``seed``); returns its tickets."""
    set_seed(seed)
    model = _create_member(recipe, data)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    engine = None
    if recipe.is_sparse:
        config = recipe.sparsity_config()
        if recipe.method == "static_sparse":
            config.update_end = 0  # masks never change
        engine = SparseEngine(model, optimizer, config, seed=seed)
    loader = DataLoader(
        TensorDataset(data.train.images, data.train.labels),
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(data.train) >= recipe.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    mean = torch.tensor(data.mean, device=accelerator.device)
    std = torch.tensor(data.std, device=accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / recipe.grad_accum_steps)
    total = sum(p.epochs for p in phases) * steps_per_epoch
    bar = tqdm(total=total, desc=f"seed {seed}", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    step, tickets = 0, []
    for phase in phases:
        if phase.escape_before and engine is not None:
            # gradient growth needs a fresh dense gradient: one forward/backward, no optimizer step
            images, labels = next(iter(loader))
            loss = torch.nn.functional.cross_entropy(model(normalize(images, mean, std)), labels)
            accelerator.backward(loss)
            stats = engine.escape()
            optimizer.zero_grad()
            accelerator.print(f"[{phase.name}] forced escape: {stats['regrown']} weights regrown, LR reset")
        phase_steps = phase.epochs * steps_per_epoch
        if engine is not None:
            engine.start_phase(step, phase_steps)
        accelerator.print(f"[{phase.name}] {phase.epochs} epochs, LR {[lr for _, lr in phase.lrs]}")
        phase_start, best = step, None
        for _ in range(phase.epochs):
            model.train()
            augment_rng = torch.Generator().manual_seed(seed * 100_003 + step * 7 + accelerator.process_index)
            for images, labels in loader:
                progress = (step - phase_start) / max(1, phase_steps)
                lr = phase.lr_at(progress, (step - phase_start) / steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.accumulate(model):
                    images = augment_batch(images, recipe.augment, recipe.pad, augment_rng)
                    logits = model(normalize(images, mean, std))
                    loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
                    accelerator.backward(loss)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        step += 1
                        bar.update(1)
                        if engine is not None:
                            update = engine.step(step)
                            if update is not None and accelerator.is_main_process:
                                logger.info("[%s] step %d mask update: %d regrown", phase.name, step, update["regrown"])
                    optimizer.zero_grad()
                if accelerator.sync_gradients and step % 10 == 0:
                    density = engine.density() if engine is not None else 1.0
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}", lr=f"{lr:.4g}", phase=phase.name, density=f"{density:.3f}"
                    )
                    accelerator.log({"train/loss": loss.item(), "train/lr": lr, "train/density": density}, step=step)
            if phase.ticket and recipe.ticket_selection == "best_val" and data.val is not None:
                val_acc = _accuracy(accelerator.unwrap_model(model), data.val, data, recipe.eval_batch_size)
                if best is None or val_acc > best.val_accuracy:
                    best = _ticket(phase, accelerator.unwrap_model(model), engine, val_acc, step)
        if phase.ticket:
            if best is None:
                val_acc = (
                    _accuracy(accelerator.unwrap_model(model), data.val, data, recipe.eval_batch_size)
                    if data.val
                    else None
                )
                best = _ticket(phase, accelerator.unwrap_model(model), engine, val_acc, step)
            tickets.append(best)
            note = f", val accuracy {best.val_accuracy:.4f}" if best.val_accuracy is not None else ""
            accelerator.print(f"[{phase.name}] ticket {len(tickets)} saved at step {best.step}{note}")
    bar.close()
    accelerator.free_memory()
    return tickets


def _create_member(recipe: Recipe, data: ImageData) -> torch.nn.Module:
    return timm.create_model(
        recipe.architecture, pretrained=False, num_classes=len(data.label_names), **_model_args(recipe, data)
    )


def _model_args(recipe: Recipe, data: ImageData) -> dict[str, Any]:
    return {"in_chans": data.input_size[0], **recipe.model_args}


def _ticket(
    phase: Phase, model: torch.nn.Module, engine: SparseEngine | None, val_acc: float | None, step: int
) -> Ticket:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    masks = {k: v.cpu().clone() for k, v in engine.masks.items()} if engine is not None else {}
    return Ticket(phase.name, state, masks, val_acc, step)


@torch.inference_mode()
def split_logits(model: torch.nn.Module, split: ImageSplit, data: ImageData, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on a whole split, ``(N, K)``, in evaluation mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mean, std = torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device)
    out = [
        model(normalize(split.images[i : i + batch_size].to(device), mean, std)).float().cpu()
        for i in range(0, len(split), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def _accuracy(model: torch.nn.Module, split: ImageSplit, data: ImageData, batch_size: int) -> float:
    return (split_logits(model, split, data, batch_size).argmax(1) == split.labels).float().mean().item()


def _build_ensemble(recipe: Recipe, data: ImageData, tickets: list[Ticket]) -> EnsembleModel:
    config = EnsembleConfig(
        architecture=recipe.architecture,
        num_classes=len(data.label_names),
        model_args=_model_args(recipe, data),
        label_names=data.label_names,
        pretrained_cfg={
            "input_size": list(data.input_size),
            "mean": list(data.mean),
            "std": list(data.std),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "num_classes": len(data.label_names),
        },
        ensemble=EnsembleInfo(
            method=recipe.method,
            num_members=len(tickets),
            sparsity=recipe.sparsity if recipe.is_sparse else 0.0,
            distribution=recipe.distribution if recipe.is_sparse else "dense",
        ),
    )
    model = EnsembleModel(config)
    for index, ticket in enumerate(tickets):
        model.load_member(index, ticket.state_dict, ticket.masks)
    return model


def _summarize(
    recipe: Recipe, data: ImageData, model: EnsembleModel, tickets: list[Ticket], wall_time: float, device: torch.device
) -> dict[str, Any]:
    """Test metrics of each member and of the ensemble, realised sparsity and wall time."""
    model.to(device)
    member_logits = torch.stack([split_logits(m, data.test, data, recipe.eval_batch_size) for m in model.members])
    ensemble = combine_member_logits(member_logits, model.temperature)
    test = {"ensemble": classification_metrics(ensemble.probs, data.test.labels)}
    for index, logits in enumerate(member_logits):
        test[f"member_{index}"] = classification_metrics(torch.softmax(logits, -1), data.test.labels)
    test["ensemble"]["disagreement"] = ensemble.disagreement.mean().item()
    model.cpu()
    return {
        "recipe": recipe.to_dict(),
        "method": recipe.method,
        "dataset": recipe.dataset,
        "num_images": {"train": len(data.train), "val": len(data.val) if data.val else 0, "test": len(data.test)},
        "test": test,
        "test_split_description": f"{recipe.dataset} [{recipe.test_split}], {len(data.test)} images",
        "ece_bins": ECE_BINS,
        "tickets": [{"phase": t.phase, "step": t.step, "val_accuracy": t.val_accuracy} for t in tickets],
        "sparsity": {
            "target": recipe.sparsity if recipe.is_sparse else 0.0,
            "realised": [_realised_sparsity(model, i) for i in range(len(tickets))],
        },
        "wall_time_s": round(wall_time, 2),
    }


def _realised_sparsity(model: EnsembleModel, index: int) -> float:
    """Zero share over all maskable (conv/linear) weights of one member, counted from its masks."""
    weights = maskable_weights(model.members[index])
    masks = model.masks[index]
    total = sum(w.numel() for w in weights.values())
    active = sum(int(masks[n].sum()) if n in masks else w.numel() for n, w in weights.items())
    return 1.0 - active / total


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in recipe.to_dict().items()}
