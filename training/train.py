"""One visible training loop for every method (EDST, DST, dense, dense ensemble, static sparse).

``train(recipe, output_dir)`` trains the members, evaluates them on the test split (reporting
only), and writes ``output_dir`` as a Hub-ready folder plus ``train_summary.json``. It checkpoints
every ``checkpoint_every`` steps and at each phase end; ``resume=True`` continues from the latest.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from freetickets_hub import architectures as _architectures  # noqa: F401  (registers WRNs)
from freetickets_hub.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.ensemble import EnsembleModel
from freetickets_hub.files import write_text_atomic
from freetickets_hub.metrics import ECE_BINS, classification_metrics
from freetickets_hub.model_card import SUMMARY_NAME
from freetickets_hub.outputs import combine_member_logits

from .checkpoint import Progress, Ticket, latest_checkpoint, load_checkpoint, load_engine_state, save_checkpoint
from .costs import layer_flops
from .data import ImageData, Split, load_image_data
from .phases import Phase, Run, plan_runs
from .recipe import Recipe
from .sparsity import SparseEngine, maskable_weights

__all__ = ["MemberStart", "train"]


class MemberStart(Protocol):
    """Where members start instead of a random init, and what else the run reports (fine-tuning).

    ``training/finetune.py`` implements it; the loop, checkpoints and summary stay the trainer's own.
    """

    config: EnsembleConfig  # the config of the ensemble the run writes

    def create_member(self, index: int, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """Member ``index``'s model (on CPU) and its initial masks (empty for a dense member)."""

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's ``lr_scale`` multiplies the scheduled LR (as in timm)."""

    def set_train_mode(self, model: torch.nn.Module) -> None:
        """Called after ``model.train()`` at each epoch, e.g. to keep a frozen backbone in eval mode."""

    def extend_summary(self, summary: dict[str, Any], model: EnsembleModel, data: ImageData) -> None:
        """Add to (or correct) ``train_summary.json`` before it is written."""


def train(
    recipe: Recipe,
    output_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    report_to: str | None = None,
    data: ImageData | None = None,
    start: MemberStart | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` and write the ensemble to ``output_dir``.

    Args:
        recipe: what to train.
        output_dir: the Hub-ready folder to write (checkpoints go to ``output_dir/checkpoints``).
        resume: continue from the latest checkpoint in ``output_dir``.
        max_steps: stop after this many optimizer steps of the whole job, with a checkpoint, as if
            interrupted (continue later with ``resume=True``).
        report_to: an accelerate tracker name, e.g. "tensorboard".
        data: the data to train on (default: ``load_image_data(recipe)``).
        start: where members start (default: a random init and random masks).

    Returns:
        The summary written to ``train_summary.json`` (empty on other processes or when stopped early).
    """
    output_dir = Path(output_dir)
    started = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=recipe.mixed_precision,
        gradient_accumulation_steps=recipe.grad_accum_steps,
        log_with=report_to,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if report_to:
        accelerator.init_trackers("freetickets", config=_flat_config(recipe))
    data = data if data is not None else load_image_data(recipe)
    accelerator.print(
        f"{recipe.method}: {recipe.architecture}, M={recipe.num_members}, "
        f"sparsity {recipe.sparsity if recipe.is_sparse else 0.0}; {accelerator.num_processes} process(es); "
        f"{len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test images"
    )
    checkpoint = latest_checkpoint(output_dir) if resume else None
    progress, tickets, best = Progress(), [], None
    if checkpoint is not None:
        progress, tickets, best = load_checkpoint(checkpoint)
        accelerator.print(f"resuming from {checkpoint} (step {progress.total_steps})")
    elif resume:
        accelerator.print(f"no checkpoint in {output_dir / 'checkpoints'}: starting from scratch")
    runs = plan_runs(recipe)
    loop = _Loop(recipe, data, accelerator, output_dir, progress, tickets, best, max_steps, started, start)
    for index in range(progress.run, len(runs)):
        if not loop.run(runs[index], index, checkpoint if index == progress.run else None):
            accelerator.print(f"stopped after {progress.total_steps} steps; continue with --resume")
            accelerator.end_training()
            return {}
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        model = _build_ensemble(recipe, data, loop.tickets, start.config if start is not None else None)
        summary = _summarize(recipe, data, model, loop, loop.seconds())
        if start is not None:
            start.extend_summary(summary, model, data)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        model.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class _Loop:
    """The state one job carries across runs: accelerator, data, progress and the tickets so far."""

    def __init__(
        self,
        recipe: Recipe,
        data: ImageData,
        accelerator: Accelerator,
        output_dir: Path,
        progress: Progress,
        tickets: list[Ticket],
        best: Ticket | None,
        max_steps: int | None,
        started: float,
        start: MemberStart | None = None,
    ) -> None:
        self.recipe, self.data, self.accelerator, self.output_dir = recipe, data, accelerator, output_dir
        self.start = start
        self.progress, self.tickets, self.best, self.max_steps = progress, tickets, best, max_steps
        self.started, self.seconds_before = started, progress.seconds
        self.batches_per_epoch = 0
        self.mask_hashes: list[str] = []
        self.densities: dict[str, float] = {}

    def run(self, run: Run, index: int, checkpoint: Path | None) -> bool:
        """Train one model through its phases; False when ``max_steps`` stopped it."""
        recipe, data, accelerator, progress = self.recipe, self.data, self.accelerator, self.progress
        if checkpoint is None:
            progress.run, progress.phase, progress.epoch, progress.batch, progress.step = index, 0, 0, 0, 0
            progress.escaped = False
        set_seed(run.seed)
        initial_masks = None
        if self.start is None:
            model = timm.create_model(
                recipe.architecture, pretrained=False, num_classes=len(data.label_names), **_model_args(recipe, data)
            )
            params: Any = model.parameters()
        else:
            model, initial_masks = self.start.create_member(index, run.seed)
            params = self.start.param_groups(model)
        optimizer = torch.optim.SGD(
            params,
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
            engine = SparseEngine(model, optimizer, config, seed=run.seed, masks=initial_masks)
            self.densities = {n: engine.counts[n] / w.numel() for n, w in engine.weights.items()}
        loader = DataLoader(
            data.training_set(),
            batch_size=recipe.batch_size,
            shuffle=True,
            drop_last=len(data.train) >= recipe.batch_size * accelerator.num_processes,
            num_workers=recipe.num_workers,
        )
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            if engine is not None:
                load_engine_state(checkpoint, engine)
        self.batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(len(loader) / recipe.grad_accum_steps)
        bar = tqdm(
            total=sum(p.epochs for p in run.phases) * steps_per_epoch,
            initial=progress.step,
            desc=f"run {index + 1} (seed {run.seed})",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        for phase_index in range(progress.phase, len(run.phases)):
            phase = run.phases[phase_index]
            phase_steps = phase.epochs * steps_per_epoch
            phase_start = progress.step - progress.epoch * steps_per_epoch - progress.batch // recipe.grad_accum_steps
            if progress.epoch == 0 and progress.batch == 0:
                bar.write(f"[{phase.name}] {phase.epochs} epochs, LR {[lr for _, lr in phase.lrs]}")
                if phase.escape_before and engine is not None and not progress.escaped:
                    self._escape(model, optimizer, engine, phase, bar)
                if engine is not None:
                    engine.start_phase(progress.step, phase_steps)
            while progress.epoch < phase.epochs:
                model.train()
                if self.start is not None:
                    self.start.set_train_mode(accelerator.unwrap_model(model))
                loader.set_epoch(phase_index * 100_000 + progress.epoch)  # a new, reproducible order
                batches = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
                for images, labels in batches:
                    epochs_done = (progress.step - phase_start) / steps_per_epoch  # fractional, for warm-up
                    lr = phase.lr_at(epochs_done / phase.epochs, epochs_done)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    with accelerator.accumulate(model):
                        augment_rng = torch.Generator().manual_seed(
                            run.seed * 1_000_003
                            + progress.total_steps * 101
                            + progress.batch * 11
                            + accelerator.process_index
                        )
                        logits = model(data.prepare_batch(images, recipe.augment, recipe.pad, augment_rng))
                        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
                        accelerator.backward(loss)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            self._after_step(engine, phase, bar, loss.item(), lr)
                        optimizer.zero_grad()
                    progress.batch += 1
                    if accelerator.sync_gradients and self._should_stop():
                        self._checkpoint(engine)
                        bar.close()
                        accelerator.free_memory()
                        return False
                    if (
                        accelerator.sync_gradients
                        and recipe.checkpoint_every
                        and not progress.total_steps % recipe.checkpoint_every
                    ):
                        self._checkpoint(engine)
                progress.epoch += 1
                progress.batch = 0
                if phase.ticket and recipe.ticket_selection == "best_val" and data.val is not None:
                    unwrapped = accelerator.unwrap_model(model)
                    val_acc = _accuracy(unwrapped, data.val, data, recipe.eval_batch_size)
                    if self.best is None or val_acc > (self.best.val_accuracy or 0.0):
                        self.best = _ticket(phase, unwrapped, engine, val_acc, progress.step)
            if phase.ticket:
                self._take_ticket(phase, accelerator.unwrap_model(model), engine, bar)
            progress.phase, progress.epoch, progress.batch, progress.escaped = phase_index + 1, 0, 0, False
            self._checkpoint(engine)
        if engine is not None:
            self.mask_hashes = gather_object([_mask_hash(engine)])
        bar.close()
        accelerator.free_memory()
        return True

    def _after_step(self, engine: SparseEngine | None, phase: Phase, bar: tqdm, loss: float, lr: float) -> None:
        progress, recipe = self.progress, self.recipe
        progress.step += 1
        progress.total_steps += 1
        progress.images += recipe.batch_size * recipe.grad_accum_steps * self.accelerator.num_processes
        bar.update(1)
        density = 1.0
        if engine is not None:
            update = engine.step(progress.step)
            density = engine.density()
            if update is not None:
                progress.dense_gradients += engine.config.growth == "gradient"
                self._check_masks_agree(engine)
                bar.write(
                    f"[{phase.name}] step {progress.step}: mask update, {update['regrown']} weights pruned and regrown"
                )
        self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/density": density}, step=progress.total_steps)
        if progress.step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", phase=phase.name, density=f"{density:.3f}")

    def seconds(self) -> float:
        """Wall time of the job, including the processes that ran before a resume."""
        return self.seconds_before + time.perf_counter() - self.started

    def _checkpoint(self, engine: SparseEngine | None) -> None:
        self.progress.seconds = self.seconds()
        save_checkpoint(self.accelerator, self.output_dir, self.progress, engine, self.tickets, self.best)

    def _should_stop(self) -> bool:
        return self.max_steps is not None and self.progress.total_steps >= self.max_steps

    def _escape(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        engine: SparseEngine,
        phase: Phase,
        bar: tqdm,
    ) -> None:
        """EDST's forced escape, with a fresh dense gradient (one batch, no optimizer step) for gradient growth."""
        growth = engine.config.escape_growth or engine.config.growth
        if growth == "gradient":
            device, count = self.accelerator.device, self.recipe.batch_size
            images = next(self.data.eval_batches(self.data.train, count, device))  # the same batch on every process
            labels = self.data.train.labels[:count].to(device)
            self.accelerator.backward(torch.nn.functional.cross_entropy(model(images), labels))
            self.progress.dense_gradients += 1
        stats = engine.escape()
        optimizer.zero_grad()
        self._check_masks_agree(engine)
        self.progress.escaped = True
        bar.write(f"[{phase.name}] forced escape: {stats['regrown']} weights pruned and regrown, LR reset")

    def _take_ticket(self, phase: Phase, model: torch.nn.Module, engine: SparseEngine | None, bar: tqdm) -> None:
        ticket = self.best
        if ticket is None:
            val = self.data.val
            val_acc = _accuracy(model, val, self.data, self.recipe.eval_batch_size) if val is not None else None
            ticket = _ticket(phase, model, engine, val_acc, self.progress.step)
        self.tickets.append(ticket)
        self.best = None
        note = f", val accuracy {ticket.val_accuracy:.4f}" if ticket.val_accuracy is not None else ""
        bar.write(f"[{phase.name}] ticket {len(self.tickets)} saved (step {ticket.step}{note})")

    def _check_masks_agree(self, engine: SparseEngine) -> None:
        """Every process must hold the same masks after an update; anything else is a bug."""
        if self.accelerator.num_processes == 1:
            return
        hashes = gather_object([_mask_hash(engine)])
        if len(set(hashes)) != 1:
            raise RuntimeError(f"masks diverged across processes at step {self.progress.step}: {hashes}")


def _mask_hash(engine: SparseEngine) -> str:
    digest = hashlib.sha256()
    for name in sorted(engine.masks):
        digest.update(name.encode())
        digest.update(engine.masks[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def _model_args(recipe: Recipe, data: ImageData) -> dict[str, Any]:
    return {"in_chans": data.input_size[0], **recipe.model_args}


def _ticket(
    phase: Phase, model: torch.nn.Module, engine: SparseEngine | None, val_acc: float | None, step: int
) -> Ticket:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    masks = {k: v.cpu().clone() for k, v in engine.masks.items()} if engine is not None else {}
    return Ticket(phase.name, state, masks, val_acc, step)


@torch.inference_mode()
def split_logits(model: torch.nn.Module, split: Split, data: ImageData, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on a whole split, ``(N, K)``, in evaluation mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images).float().cpu() for images in data.eval_batches(split, batch_size, device)]
    model.train(was_training)
    return torch.cat(out)


def _accuracy(model: torch.nn.Module, split: Split, data: ImageData, batch_size: int) -> float:
    return (split_logits(model, split, data, batch_size).argmax(1) == split.labels).float().mean().item()


def _build_ensemble(
    recipe: Recipe, data: ImageData, tickets: list[Ticket], config: EnsembleConfig | None = None
) -> EnsembleModel:
    config = config or EnsembleConfig(
        architecture=recipe.architecture,
        num_classes=len(data.label_names),
        model_args=_model_args(recipe, data),
        label_names=data.label_names,
        pretrained_cfg={
            "input_size": list(data.input_size),
            "mean": list(data.mean),
            "std": list(data.std),
            "crop_pct": data.crop_pct,
            "interpolation": data.interpolation,
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


def _summarize(recipe: Recipe, data: ImageData, model: EnsembleModel, loop: _Loop, wall_time: float) -> dict[str, Any]:
    """Test metrics of each member and of the ensemble, sparsity, costs and wall time."""
    device = loop.accelerator.device
    model.to(device)
    member_logits = torch.stack([split_logits(m, data.test, data, recipe.eval_batch_size) for m in model.members])
    model.cpu()
    ensemble = combine_member_logits(member_logits, model.temperature)
    test = {"ensemble": classification_metrics(ensemble.probs, data.test.labels)}
    for index, logits in enumerate(member_logits):
        test[f"member_{index}"] = classification_metrics(torch.softmax(logits, -1), data.test.labels)
    test["ensemble"]["disagreement"] = ensemble.disagreement.mean().item()
    return {
        "recipe": recipe.to_dict(),
        "method": recipe.method,
        "dataset": recipe.dataset,
        "num_images": {"train": len(data.train), "val": len(data.val) if data.val else 0, "test": len(data.test)},
        "test": test,
        "test_split_description": f"{recipe.dataset} [{recipe.test_split}], {len(data.test)} images",
        "ece_bins": ECE_BINS,
        "tickets": [{"phase": t.phase, "step": t.step, "val_accuracy": t.val_accuracy} for t in loop.tickets],
        "sparsity": {
            "target": recipe.sparsity if recipe.is_sparse else 0.0,
            "realised": [_realised_sparsity(model, i) for i in range(model.num_members)],
        },
        "costs": _costs(model, data, loop),
        "distributed": {
            "num_processes": loop.accelerator.num_processes,
            "batches_per_epoch_per_process": loop.batches_per_epoch,
            "mask_hashes_by_process": loop.mask_hashes,
        },
        "total_steps": loop.progress.total_steps,
        "wall_time_s": round(wall_time, 2),
    }


def _costs(model: EnsembleModel, data: ImageData, loop: _Loop) -> dict[str, float]:
    """FLOPs (RigL convention) and parameter counts, relative to the dense model of the same recipe."""
    flops = layer_flops(model.members[0], data.input_size)
    f_dense = flops.dense
    f_sparse = flops.sparse(loop.densities)
    images = loop.progress.images
    dense_gradient_images = loop.progress.dense_gradients * loop.recipe.batch_size * loop.accelerator.num_processes
    training = 3 * f_sparse * images + (f_dense - f_sparse) * dense_gradient_images
    member_flops = [flops.sparse({n: m.float().mean().item() for n, m in masks.items()}) for masks in model.masks]
    total_params = sum(p.numel() for p in model.members[0].parameters())
    nonzero = [sum(int(torch.count_nonzero(p)) for p in m.parameters()) for m in model.members]
    return {
        "training_flops": training,
        "training_flops_dense_same_steps": 3 * f_dense * images,
        "training_flops_ratio_vs_dense_same_steps": training / (3 * f_dense * images) if images else 0.0,
        "train_images_processed": images,
        "inference_flops_dense_member": f_dense,
        "inference_flops_member": member_flops[0],
        "inference_flops_ensemble": sum(member_flops),
        "inference_flops_ensemble_vs_dense_member": sum(member_flops) / f_dense,
        "params_total_per_member": total_params,
        "params_nonzero_per_member": nonzero,
        "params_nonzero_ensemble_vs_dense_member": sum(nonzero) / total_params,
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
