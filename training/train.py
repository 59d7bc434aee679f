"""One visible training loop for every method (EDST, DST, dense, dense ensemble, static sparse).

``train(recipe, output_dir)`` trains the members, evaluates them on the test split (reporting
only), and writes ``output_dir`` as a Hub-ready folder plus ``train_summary.json``. It checkpoints
every ``checkpoint_every`` steps and at each phase end; ``resume=True`` continues from the latest.

The method reads off :meth:`_Loop.run`: each run (one EDST run, or one per DST member) goes through
its phases; a phase may start with EDST's forced escape, trains epoch by epoch (the sparse engine
prunes and regrows every ΔT steps) and may end in a ticket, an ensemble member.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import SUMMARY_NAME
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.model import architectures as _architectures  # noqa: F401  (registers WRNs)
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.model.widths import Widths

from .averaging import CyclePosition, TicketAverage, cycle_position, in_window
from .channel_training import ChannelPruner
from .checkpoint import (
    CHECKPOINTS,
    Progress,
    Ticket,
    latest_checkpoint,
    load_average_state,
    load_channel_state,
    load_checkpoint,
    load_engine_state,
    save_checkpoint,
)
from .data import ImageData, load_image_data
from .phases import Phase, Run, plan_runs
from .random_mask import forward_with_random_mask
from .recipe import Recipe
from .sparsity import SparseEngine
from .summary import JobStats, accuracy, build_ensemble, create_member, member_widths, summarize

__all__ = ["MemberStart", "train", "weight_decay_groups"]


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
    method = recipe.method if start is None else start.config.ensemble.method  # fine-tuning: the base's own
    accelerator.print(
        f"{method}: {recipe.architecture}, M={recipe.num_members}, "
        f"sparsity {recipe.sparsity if recipe.is_sparse else 0.0}; {accelerator.num_processes} process(es); "
        f"{len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test images"
    )
    checkpoint = latest_checkpoint(output_dir) if resume else None
    progress, tickets, best = Progress(), [], None
    if checkpoint is not None:
        progress, tickets, best = load_checkpoint(checkpoint)
        accelerator.print(f"resuming from {checkpoint} (step {progress.total_steps})")
    elif resume:  # the CLI refuses this before anything loads (checkpoint.prepare_run_dir)
        raise FreeTicketsError(f"resume: no checkpoint in {output_dir / CHECKPOINTS} to continue from")
    runs = plan_runs(recipe)
    widths = member_widths(recipe, data) if start is None else None  # fine-tuned members keep their own
    loop = _Loop(recipe, data, accelerator, output_dir, progress, tickets, best, max_steps, started, start, widths)
    for index in range(progress.run, len(runs)):
        if not loop.run(runs[index], index, checkpoint if index == progress.run else None):
            accelerator.print(f"stopped after {progress.total_steps} steps; continue with --resume")
            accelerator.end_training()
            return {}
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        model = build_ensemble(recipe, data, loop.tickets, start.config if start is not None else None, widths)
        summary = summarize(recipe, data, model, loop.stats(), accelerator.device)
        if start is not None:
            start.extend_summary(summary, model, data)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        model.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


@dataclass
class _Member:
    """What one run trains: the prepared model, its optimizer and loader, and the sparse engine."""

    seed: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: SparseEngine | None
    steps_per_epoch: int  # optimizer steps (not batches) per epoch and process
    bar: tqdm
    average: TicketAverage  # the ticket phase's weight average (``average_fraction``)
    channels: ChannelPruner | None  # ``structure: channel``: the channels this run keeps


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
        widths: Widths | None = None,
    ) -> None:
        self.recipe, self.data, self.accelerator, self.output_dir = recipe, data, accelerator, output_dir
        self.start, self.widths = start, widths
        self.progress, self.tickets, self.best, self.max_steps = progress, tickets, best, max_steps
        self.started, self.seconds_before = started, progress.seconds
        self.batches_per_epoch = 0
        self.mask_hashes: list[str] = []
        self.densities: dict[str, float] = {}

    def run(self, run: Run, index: int, checkpoint: Path | None) -> bool:
        """Train one model through its phases; False when ``max_steps`` stopped it."""
        progress = self.progress
        if checkpoint is None:
            progress.run, progress.phase, progress.epoch, progress.batch, progress.step = index, 0, 0, 0, 0
            progress.escaped = False
        member = self._build(run, index, checkpoint)
        for phase_index in range(progress.phase, len(run.phases)):
            phase = run.phases[phase_index]
            if progress.epoch == 0 and progress.batch == 0:
                self._begin_phase(member, phase)  # EDST: the forced escape and the LR reset
            while progress.epoch < phase.epochs:
                if not self._train_epoch(member, phase, phase_index):
                    return self._stop(member)
                self._end_epoch(member, phase)  # best-validation ticket candidates
            self._end_phase(member, phase, phase_index)  # the ticket, a checkpoint
        if member.engine is not None:
            self.mask_hashes = gather_object([_mask_hash(member.engine)])
        member.bar.close()
        self.accelerator.free_memory()
        return True

    def stats(self) -> JobStats:
        """What the summary reports about the job so far."""
        return JobStats(
            progress=self.progress,
            tickets=self.tickets,
            densities=self.densities,
            num_processes=self.accelerator.num_processes,
            batches_per_epoch=self.batches_per_epoch,
            mask_hashes=self.mask_hashes,
            wall_time=self.seconds(),
        )

    def seconds(self) -> float:
        """Wall time of the job, including the processes that ran before a resume."""
        return self.seconds_before + time.perf_counter() - self.started

    # ----- one run: build, phases, epochs, steps ---------------------------------------------------------

    def _build(self, run: Run, index: int, checkpoint: Path | None) -> _Member:
        """A fresh seeded model, optimizer, sparse engine and loader, prepared (and restored on resume)."""
        recipe, data, accelerator = self.recipe, self.data, self.accelerator
        set_seed(run.seed)
        initial_masks = None
        if self.start is not None:  # fine-tuning: a released member, its masks, its own param groups
            model, initial_masks = self.start.create_member(index, run.seed)
            params: Any = self.start.param_groups(model)
        else:
            model = create_member(recipe, data, self.widths)
            params = weight_decay_groups(model, recipe.weight_decay, recipe.filter_bias_and_bn)
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
        channels = None
        if engine is not None and self.start is None and recipe.structure == "channel":
            channels = ChannelPruner(model, engine, recipe, data.input_size)
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
            if channels is not None:
                channels.load_state_dict(accelerator.unwrap_model(model), load_channel_state(checkpoint))
        average = TicketAverage()
        if checkpoint is not None:
            average.load_state_dict(load_average_state(checkpoint), accelerator.unwrap_model(model))
        self.batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(len(loader) / recipe.grad_accum_steps)
        bar = tqdm(
            total=sum(p.epochs for p in run.phases) * steps_per_epoch,
            initial=self.progress.step,
            desc=f"run {index + 1} (seed {run.seed})",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        return _Member(run.seed, model, optimizer, loader, engine, steps_per_epoch, bar, average, channels)

    def _begin_phase(self, member: _Member, phase: Phase) -> None:
        """Before a phase's first batch: EDST's forced escape, and the prune-rate schedule's restart."""
        member.bar.write(f"[{phase.name}] {phase.epochs} epochs, LR {[lr for _, lr in phase.lrs]}")
        if member.engine is None:
            return
        if phase.escape_before and not self.progress.escaped:
            self._escape(member, phase)
        if phase.prune_cycle_epochs is not None:
            member.engine.start_phase(self.progress.step, phase.prune_cycle_epochs * member.steps_per_epoch)

    def _train_epoch(self, member: _Member, phase: Phase, phase_index: int) -> bool:
        """The rest of the current epoch, batch by batch; False when ``max_steps`` stopped it."""
        progress, accelerator, model, optimizer = self.progress, self.accelerator, member.model, member.optimizer
        model.train()
        if self.start is not None:
            self.start.set_train_mode(accelerator.unwrap_model(model))
        member.loader.set_epoch(phase_index * 100_000 + progress.epoch)  # a new, reproducible order
        batches = accelerator.skip_first_batches(member.loader, progress.batch) if progress.batch else member.loader
        for images, labels in batches:
            lr = self._set_lr(member, phase)
            with accelerator.accumulate(model):
                loss = self._loss(member, images, labels)
                accelerator.backward(loss)
                optimizer.step()
                stepped = accelerator.sync_gradients and not optimizer.step_was_skipped
                if stepped:
                    self._after_step(member, phase, loss.item(), lr)
                elif accelerator.sync_gradients:
                    self._skipped_step(member, phase)
                optimizer.zero_grad()
            progress.batch += 1
            if stepped:
                if self._should_stop():
                    return False
                if self.recipe.checkpoint_every and not progress.total_steps % self.recipe.checkpoint_every:
                    self._checkpoint(member)
        progress.epoch += 1
        progress.batch = 0
        return True

    def _step_in_phase(self, member: _Member) -> int:
        """The phase's optimizer step (from 1) the current micro-batch belongs to."""
        progress = self.progress
        return progress.epoch * member.steps_per_epoch + progress.batch // self.recipe.grad_accum_steps + 1

    def _averaging(self, member: _Member, phase: Phase) -> bool:
        """Whether the current step falls in the ticket phase's averaging window (``average_fraction``)."""
        phase_steps = phase.epochs * member.steps_per_epoch
        return phase.ticket and in_window(self._step_in_phase(member), phase_steps, self.recipe.average_fraction)

    def _set_lr(self, member: _Member, phase: Phase) -> float:
        """The phase's LR schedule at the current position (fractional epochs drive the warm-up).

        With ``average_cycles``, the averaging window's LR falls linearly in each cycle from
        ``average_cycle_lr`` (default 10x the window's own LR) to the window's own LR.
        """
        recipe, step = self.recipe, self._step_in_phase(member)
        epochs_done = (step - 1) / member.steps_per_epoch
        lr = phase.lr_at(epochs_done / phase.epochs, epochs_done)
        if recipe.average_cycles and self._averaging(member, phase):
            high = recipe.average_cycle_lr or 10 * lr
            lr = high + (lr - high) * self._cycle_position(member, phase).progress
        for group in member.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _loss(self, member: _Member, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of one augmented batch; the augmentation is seeded by the batch's position."""
        recipe, progress = self.recipe, self.progress
        augment_rng = torch.Generator().manual_seed(
            member.seed * 1_000_003 + progress.total_steps * 101 + progress.batch * 11 + self.accelerator.process_index
        )
        inputs = self.data.prepare_batch(images, recipe.augment, recipe.pad, augment_rng)
        drop_seed = member.seed * 1_000_003 + progress.total_steps * 101 + progress.batch * 11  # same on every process
        logits = forward_with_random_mask(member.model, inputs, recipe.random_mask_rate, drop_seed)
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)

    def _after_step(self, member: _Member, phase: Phase, loss: float, lr: float) -> None:
        """Count the optimizer step; the engine re-applies the masks and, every ΔT steps, prunes and regrows."""
        progress, recipe, engine = self.progress, self.recipe, member.engine
        progress.step += 1
        progress.total_steps += 1
        progress.images += recipe.batch_size * recipe.grad_accum_steps * self.accelerator.num_processes
        member.bar.update(1)
        density = 1.0
        averaging = self._averaging(member, phase)
        if engine is not None and averaging:
            engine.apply_masks()  # masks frozen over the averaging window
            density = engine.density()
        elif engine is not None:
            update = engine.step(progress.step)
            density = engine.density()
            if update is not None:
                progress.dense_gradients += engine.config.growth == "gradient"
                self._check_masks_agree(engine)
                member.bar.write(
                    f"[{phase.name}] step {progress.step}: mask update, {update['regrown']} weights pruned and regrown"
                )
        if member.channels is not None and phase.ticket:
            self._remove_channels(member, phase)
        if averaging and (not recipe.average_cycles or self._cycle_position(member, phase).last):
            member.average.update(self.accelerator.unwrap_model(member.model))
        self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/density": density}, step=progress.total_steps)
        if progress.step % 10 == 0:
            member.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", phase=phase.name, density=f"{density:.3f}")

    def _remove_channels(self, member: _Member, phase: Phase) -> None:
        """``structure: channel``: the ticket phase's channel schedule at this step (Chase)."""
        assert member.channels is not None and member.engine is not None
        model = self.accelerator.unwrap_model(member.model)
        removed = member.channels.step(model, self._step_in_phase(member), phase.epochs * member.steps_per_epoch)
        if removed:
            self._check_masks_agree(member.engine)
            member.bar.write(
                f"[{phase.name}] step {self.progress.step}: {removed} channels removed "
                f"({member.channels.removed()} of {sum(g.width for g in member.channels.groups)})"
            )

    def _cycle_position(self, member: _Member, phase: Phase) -> CyclePosition:
        """``average_cycles``: where the current step falls in its LR cycle of the averaging window."""
        recipe, phase_steps = self.recipe, phase.epochs * member.steps_per_epoch
        return cycle_position(self._step_in_phase(member), phase_steps, recipe.average_fraction, recipe.average_cycles)

    def _skipped_step(self, member: _Member, phase: Phase) -> None:
        """fp16: the grad scaler found inf/NaN gradients and skipped the step; it neither counts nor updates masks."""
        progress = self.progress
        progress.skipped_steps += 1
        progress.images += self.recipe.batch_size * self.recipe.grad_accum_steps * self.accelerator.num_processes
        member.bar.write(f"[{phase.name}] after step {progress.step}: step skipped by the fp16 grad scaler")

    def _end_epoch(self, member: _Member, phase: Phase) -> None:
        """``ticket_selection: best_val``: keep the ticket phase's best epoch on the validation split."""
        if not (phase.ticket and self.recipe.ticket_selection == "best_val" and self.data.val is not None):
            return
        model = self.accelerator.unwrap_model(member.model)
        val_acc = accuracy(model, self.data.val, self.data, self.recipe.eval_batch_size)
        if self.best is None or val_acc > (self.best.val_accuracy or 0.0):
            self.best = _ticket(phase, model, member, val_acc, self.progress.step)

    def _end_phase(self, member: _Member, phase: Phase, phase_index: int) -> None:
        """Save the phase's ticket (if it yields one) and checkpoint at the phase boundary."""
        model = self.accelerator.unwrap_model(member.model)
        if phase.ticket and member.average.count:
            batches = self.data.eval_batches(self.data.train, self.recipe.eval_batch_size, self.accelerator.device)
            with member.average.applied(model, batches):  # the ticket is the average; training goes on from the last
                self._take_ticket(phase, model, member)
            member.bar.write(
                f"[{phase.name}] ticket averaged over {member.average.count} iterates, BatchNorm recomputed"
            )
        elif phase.ticket:
            self._take_ticket(phase, model, member)
        member.average.reset()
        progress = self.progress
        progress.phase, progress.epoch, progress.batch, progress.escaped = phase_index + 1, 0, 0, False
        self._checkpoint(member)

    def _stop(self, member: _Member) -> bool:
        """``max_steps`` reached: checkpoint as if interrupted."""
        self._checkpoint(member)
        member.bar.close()
        self.accelerator.free_memory()
        return False

    # ----- the rules the phases call -------------------------------------------------------------------

    def _escape(self, member: _Member, phase: Phase) -> None:
        """EDST's forced escape, with a fresh dense gradient (one batch, no optimizer step) for gradient growth."""
        engine = member.engine
        assert engine is not None
        if member.channels is not None:  # the next ticket chooses its own channels (channel_training.py)
            self._restore_channels(member, phase)
        growth = engine.config.escape_growth or engine.config.growth
        if growth == "gradient":
            device, count = self.accelerator.device, self.recipe.batch_size
            images = next(self.data.eval_batches(self.data.train, count, device))  # the same batch on every process
            labels = self.data.train.labels[:count].to(device)
            with _buffers_kept(member.model):  # a gradient probe: BatchNorm statistics must not move
                self.accelerator.backward(torch.nn.functional.cross_entropy(member.model(images), labels))
            self.progress.dense_gradients += 1
        stats = engine.escape()
        member.optimizer.zero_grad()
        self._check_masks_agree(engine)
        self.progress.escaped = True
        member.bar.write(f"[{phase.name}] forced escape: {stats['regrown']} weights pruned and regrown, LR reset")

    def _restore_channels(self, member: _Member, phase: Phase) -> None:
        """Every removed channel back before EDST's escape, freshly initialised (seeded by run and phase)."""
        assert member.channels is not None
        seed = member.seed * 1_000_003 + 7919 * (self.progress.phase + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            grown = member.channels.restore(
                self.accelerator.unwrap_model(member.model),
                lambda: create_member(self.recipe, self.data, None),
                torch.Generator().manual_seed(seed),
            )
        if grown:
            member.bar.write(f"[{phase.name}] every channel restored, {grown} weights regrown at a fresh init")

    def _take_ticket(self, phase: Phase, model: torch.nn.Module, member: _Member) -> None:
        ticket = self.best
        if ticket is None:
            val = self.data.val
            val_acc = accuracy(model, val, self.data, self.recipe.eval_batch_size) if val is not None else None
            ticket = _ticket(phase, model, member, val_acc, self.progress.step)
        self.tickets.append(ticket)
        self.best = None
        note = f", val accuracy {ticket.val_accuracy:.4f}" if ticket.val_accuracy is not None else ""
        member.bar.write(f"[{phase.name}] ticket {len(self.tickets)} saved (step {ticket.step}{note})")

    def _checkpoint(self, member: _Member) -> None:
        self.progress.seconds = self.seconds()
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.progress,
            member.engine,
            self.tickets,
            self.best,
            member.average.state_dict(),
            member.channels.state_dict() if member.channels is not None else None,
        )

    def _should_stop(self) -> bool:
        return self.max_steps is not None and self.progress.total_steps >= self.max_steps

    def _check_masks_agree(self, engine: SparseEngine) -> None:
        """Every process must hold the same masks after an update; anything else is a bug."""
        if self.accelerator.num_processes == 1:
            return
        hashes = gather_object([_mask_hash(engine)])
        if len(set(hashes)) != 1:
            raise RuntimeError(f"masks diverged across processes at step {self.progress.step}: {hashes}")


@contextmanager
def _buffers_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, batch counts) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _mask_hash(engine: SparseEngine) -> str:
    digest = hashlib.sha256()
    for name in sorted(engine.masks):
        digest.update(name.encode())
        digest.update(engine.masks[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def _ticket(phase: Phase, model: torch.nn.Module, member: _Member, val_acc: float | None, step: int) -> Ticket:
    """The model as one ensemble member; ``structure: channel``: sliced to its physical widths."""
    engine = member.engine
    masks = {k: v.cpu().clone() for k, v in engine.masks.items()} if engine is not None else {}
    if member.channels is not None:
        state, masks, widths = member.channels.slim(model, masks)
        kept = {root: channels.tolist() for root, channels in member.channels.state_dict().items()}
        return Ticket(phase.name, state, masks, val_acc, step, widths, kept)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Ticket(phase.name, state, masks, val_acc, step)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float, filter_bias_and_bn: bool) -> list[dict[str, Any]]:
    """Optimizer groups: with ``filter_bias_and_bn`` timm's rule (no decay on biases and 1-D norm
    parameters, ``param_groups_weight_decay``), else one group at the optimizer's ``weight_decay``."""
    if filter_bias_and_bn:
        return param_groups_weight_decay(model, weight_decay)
    return [{"params": list(model.parameters())}]


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in recipe.to_dict().items()}
