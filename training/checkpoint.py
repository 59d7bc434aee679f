"""Resumable checkpoints of a training job, kept under ``OUTPUT_DIR/checkpoints/``.

A checkpoint is accelerate's ``save_state`` (model, optimizer, RNG states: local resume only, never
published) plus our own state as safetensors + JSON: the sparse engine's masks and counters, the
tickets taken so far and the loop's position. It is written to a temporary folder and renamed, so
an interrupted save never shadows the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from safetensors.torch import load_file, save_file

from freetickets_hub.artifact.files import prepare_output_dir, write_text_atomic
from freetickets_hub.artifact.names import CONFIG_NAME
from freetickets_hub.errors import FreeTicketsError
from freetickets_hub.model.widths import Widths

from .sparsity import SparseEngine

__all__ = [
    "Progress",
    "Ticket",
    "latest_checkpoint",
    "load_average_state",
    "load_channel_state",
    "load_checkpoint",
    "load_engine_state",
    "prepare_run_dir",
    "save_checkpoint",
]

AVERAGE_FILE = "ticket_average.safetensors"
CHANNELS_FILE = "channels_kept.safetensors"

CHECKPOINTS = "checkpoints"


@dataclass
class Progress:
    """Where the loop is; every counter counts completed work."""

    run: int = 0  # index of the current run (EDST has one; DST and the others one per member)
    phase: int = 0  # phase of the current run
    epoch: int = 0  # epochs finished in the current phase
    batch: int = 0  # loader batches finished in the current epoch
    step: int = 0  # optimizer steps of the current run
    total_steps: int = 0  # optimizer steps of the whole job
    skipped_steps: int = 0  # fp16 steps the grad scaler skipped (inf/NaN gradients), whole job: not counted above
    escaped: bool = False  # the forced escape before the current phase is done
    dense_gradients: int = 0  # batches that needed a dense weight gradient (gradient growth), whole job
    images: int = 0  # training images processed, whole job, all processes
    seconds: float = 0.0  # wall time of the job so far, summed over interrupted and resumed processes


@dataclass
class Ticket:
    """One ensemble member as it left its phase."""

    phase: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    val_accuracy: float | None
    step: int
    widths: Widths | None = None  # ``structure: channel``: the slim ticket's widths record
    kept: dict[str, list[int]] | None = None  # and the full-width channels it kept, per channel group


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    progress: Progress,
    engine: SparseEngine | None,
    tickets: list[Ticket],
    best: Ticket | None,
    average: dict[str, torch.Tensor] | None = None,
    channels: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint (every process takes part) and drop the older ones.

    ``average``: a ticket average in progress (``training/averaging.py``); ``channels``: the kept
    channels of a ``structure: channel`` run (``training/channel_training.py``); both as safetensors."""
    root = output_dir / CHECKPOINTS
    final = root / f"step_{progress.total_steps:09d}_run{progress.run}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if engine is not None:
            save_file({k: v.to(torch.uint8) for k, v in engine.masks.items()}, str(tmp / "engine_masks.safetensors"))
            state = {k: v for k, v in engine.state_dict().items() if k != "masks"}
            write_text_atomic(tmp / "engine.json", json.dumps(state))
        if average:
            save_file(average, str(tmp / AVERAGE_FILE))
        if channels is not None:
            save_file(channels, str(tmp / CHANNELS_FILE))
        for i, ticket in enumerate([*tickets, *([best] if best else [])]):
            _save_ticket(ticket, tmp / f"ticket_{i}")
        meta = {"progress": asdict(progress), "num_tickets": len(tickets), "has_best": best is not None}
        write_text_atomic(tmp / "progress.json", json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.iterdir():
            if old != final and old.name.startswith("step_"):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / "progress.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def prepare_run_dir(output_dir: Path, state: PartialState, *, resume: bool, overwrite: bool) -> None:
    """The one-model-per-folder guard of a training or fine-tuning run (``files.prepare_output_dir``).

    Every process checks, so a refusal is raised by all of them alike; only the main process removes
    anything (``overwrite``), and the others wait for it. ``resume`` needs a checkpoint to continue
    from, as ``accelerate``'s and the HF Trainer's ``resume_from_checkpoint`` do: it never silently
    starts a new run.

    Raises:
        FreeTicketsError: both flags, ``resume`` without a checkpoint, or a folder holding a model.
    """
    if resume and overwrite:
        raise FreeTicketsError("--resume continues the run in --output-dir, --overwrite replaces it: pass one")
    if resume and latest_checkpoint(output_dir) is None:
        if (output_dir / CONFIG_NAME).is_file():
            raise FreeTicketsError(
                f"--resume: {str(output_dir)!r} holds a finished model and no checkpoint to continue from; "
                "nothing was changed (pass --overwrite instead of --resume to train it again)"
            )
        raise FreeTicketsError(
            f"--resume: no checkpoint in {str(output_dir / CHECKPOINTS)!r} to continue from; "
            "drop --resume to start a new run there"
        )
    state.wait_for_everyone()
    if not overwrite or state.is_main_process:
        prepare_output_dir(output_dir, overwrite=overwrite, resume=resume, can_resume=True)
    state.wait_for_everyone()


def load_checkpoint(path: Path) -> tuple[Progress, list[Ticket], Ticket | None]:
    """The loop position and tickets of a checkpoint (model and optimizer: ``accelerator.load_state``)."""
    meta = json.loads((path / "progress.json").read_text())
    names = {f.name for f in fields(Progress)}
    progress = Progress(**{k: v for k, v in meta["progress"].items() if k in names})
    tickets = [_load_ticket(path / f"ticket_{i}") for i in range(meta["num_tickets"])]
    best = _load_ticket(path / f"ticket_{meta['num_tickets']}") if meta["has_best"] else None
    return progress, tickets, best


def load_engine_state(path: Path, engine: SparseEngine) -> None:
    masks = {k: v.bool() for k, v in load_file(str(path / "engine_masks.safetensors")).items()}
    engine.load_state_dict({"masks": masks, **json.loads((path / "engine.json").read_text())})


def load_average_state(path: Path) -> dict[str, torch.Tensor]:
    """The ticket average a checkpoint holds (empty when it was taken outside an averaging window)."""
    file = path / AVERAGE_FILE
    return load_file(str(file)) if file.is_file() else {}


def load_channel_state(path: Path) -> dict[str, torch.Tensor]:
    """The kept channels a checkpoint holds (``structure: channel``)."""
    return load_file(str(path / CHANNELS_FILE))


def _save_ticket(ticket: Ticket, stem: Path) -> None:
    tensors = {f"state.{k}": v.contiguous() for k, v in ticket.state_dict.items()}
    tensors |= {f"mask.{k}": v.to(torch.uint8) for k, v in ticket.masks.items()}
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    meta = {"phase": ticket.phase, "val_accuracy": ticket.val_accuracy, "step": ticket.step}
    meta |= {"widths": ticket.widths, "kept": ticket.kept}
    write_text_atomic(stem.with_suffix(".json"), json.dumps(meta))


def _load_ticket(stem: Path) -> Ticket:
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    meta = json.loads(stem.with_suffix(".json").read_text())
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    masks = {k.removeprefix("mask."): v.bool() for k, v in tensors.items() if k.startswith("mask.")}
    return Ticket(meta["phase"], state, masks, meta["val_accuracy"], meta["step"], meta.get("widths"), meta.get("kept"))
