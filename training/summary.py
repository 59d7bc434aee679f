"""What a finished job reports and publishes: the ensemble of its tickets and ``train_summary.json``.

Test metrics of each member and of the ensemble (reporting only: nothing here feeds back into
training), realised sparsity, and the costs by the RigL convention relative to the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch

from freetickets_hub.artifact.config import EnsembleConfig, EnsembleInfo
from freetickets_hub.data.sources import public_dataset
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.model.widths import Widths, create_slim_model
from freetickets_hub.uncertainty.metrics import ECE_BINS, classification_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

from .channel_sparsity import narrow_widths
from .checkpoint import Progress, Ticket
from .costs import layer_flops, training_flops
from .data import ImageData, Split
from .recipe import Recipe
from .sparsity import maskable_weights

__all__ = [
    "JobStats",
    "accuracy",
    "build_ensemble",
    "channel_summary",
    "create_member",
    "member_widths",
    "model_args",
    "split_logits",
    "split_metrics",
    "summarize",
]


@dataclass
class JobStats:
    """What the loop measured that the summary reports."""

    progress: Progress
    tickets: list[Ticket]
    densities: dict[str, float]  # per maskable weight, as ERK drew them (empty for dense methods)
    num_processes: int
    batches_per_epoch: int  # per process
    mask_hashes: list[str]  # one per process, of the last run's final masks
    wall_time: float


def model_args(recipe: Recipe, data: ImageData) -> dict[str, Any]:
    """``timm.create_model`` kwargs of the recipe's members for this data."""
    return {"in_chans": data.input_size[0], **recipe.model_args}


def member_widths(recipe: Recipe, data: ImageData) -> Widths | None:
    """The members' widths record when they are narrower than the architecture (``narrow_dense_ensemble``)."""
    if recipe.method != "narrow_dense_ensemble":
        return None
    full = create_member(recipe, data, None)
    return narrow_widths(full, data.input_size, recipe.channel_sparsity, recipe.channel_multiple)


def create_member(recipe: Recipe, data: ImageData, widths: Widths | None) -> torch.nn.Module:
    """A freshly initialised member: the recipe's timm architecture, at ``widths`` when given."""
    kwargs = {"num_classes": len(data.label_names), **model_args(recipe, data)}
    if widths is None:
        return timm.create_model(recipe.architecture, pretrained=False, **kwargs)
    return create_slim_model(recipe.architecture, widths, **kwargs)


@torch.inference_mode()
def split_logits(model: torch.nn.Module, split: Split, data: ImageData, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on a whole split, ``(N, K)``, in evaluation mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images).float().cpu() for images in data.eval_batches(split, batch_size, device)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: torch.nn.Module, split: Split, data: ImageData, batch_size: int) -> float:
    return (split_logits(model, split, data, batch_size).argmax(1) == split.labels).float().mean().item()


def split_metrics(member_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, dict[str, float]]:
    """Metrics of the ensemble (with its members' disagreement) and of each member on one split.

    Args:
        member_logits: ``(M, N, K)`` logits of the members.
        labels: ``(N,)`` class indices.
        temperature: the ensemble's temperature (members are scored at 1).
    """
    ensemble = combine_member_logits(member_logits, temperature)
    metrics = {"ensemble": classification_metrics(ensemble.probs, labels)}
    for index, logits in enumerate(member_logits):
        metrics[f"member_{index}"] = classification_metrics(torch.softmax(logits, -1), labels)
    metrics["ensemble"]["disagreement"] = ensemble.disagreement.mean().item()
    return metrics


def build_ensemble(
    recipe: Recipe,
    data: ImageData,
    tickets: list[Ticket],
    config: EnsembleConfig | None = None,
    widths: Widths | None = None,
) -> EnsembleModel:
    """The tickets as one :class:`EnsembleModel` with the data's preprocessing in its config (or ``config``).

    ``widths``: every member's widths record when they are narrower than the architecture
    (``narrow_dense_ensemble``); slim tickets (``structure: channel``) bring their own.
    """
    if widths is not None:
        member_widths: list[Widths] | None = [widths] * len(tickets)
    else:
        member_widths = [t.widths for t in tickets] if any(t.widths for t in tickets) else None
    config = config or EnsembleConfig(
        architecture=recipe.architecture,
        num_classes=len(data.label_names),
        model_args=model_args(recipe, data),
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
            member_widths=member_widths,
        ),
    )
    model = EnsembleModel(config)
    for index, ticket in enumerate(tickets):
        model.load_member(index, ticket.state_dict, ticket.masks)
    return model


def summarize(
    recipe: Recipe, data: ImageData, model: EnsembleModel, stats: JobStats, device: torch.device
) -> dict[str, Any]:
    """Test metrics of each member and of the ensemble, sparsity, costs and wall time."""
    model.to(device)
    member_logits = torch.stack([split_logits(m, data.test, data, recipe.eval_batch_size) for m in model.members])
    model.cpu()
    test = split_metrics(member_logits, data.test.labels, model.temperature)
    return {
        "recipe": recipe.to_dict(),
        "method": recipe.method,
        "dataset": public_dataset(recipe.dataset),  # no machine path (the recipe above keeps what was given)
        "num_images": {"train": len(data.train), "val": len(data.val) if data.val else 0, "test": len(data.test)},
        "test": test,
        "test_split_description": f"{public_dataset(recipe.dataset)} [{recipe.test_split}], {len(data.test)} images",
        "ece_bins": ECE_BINS,
        "tickets": [{"phase": t.phase, "step": t.step, "val_accuracy": t.val_accuracy} for t in stats.tickets],
        "sparsity": {
            "target": recipe.sparsity if recipe.is_sparse else 0.0,
            "realised": [_realised_sparsity(model, i) for i in range(model.num_members)],
        },
        "costs": _costs(recipe, model, data, stats),
        **({"channels": channel_summary(stats.tickets)} if any(t.kept for t in stats.tickets) else {}),
        "distributed": {
            "num_processes": stats.num_processes,
            "batches_per_epoch_per_process": stats.batches_per_epoch,
            "mask_hashes_by_process": stats.mask_hashes,
        },
        "total_steps": stats.progress.total_steps,
        "skipped_steps": stats.progress.skipped_steps,
        "wall_time_s": round(stats.wall_time, 2),
    }


def _costs(recipe: Recipe, model: EnsembleModel, data: ImageData, stats: JobStats) -> dict[str, float]:
    """FLOPs (RigL convention) and parameter counts, relative to the dense model of the same recipe."""
    flops = layer_flops(model.members[0], data.input_size)
    slim = model.config.ensemble.member_widths is not None  # the dense reference is the full-width model
    reference = create_member(recipe, data, None) if slim else model.members[0]
    f_dense = layer_flops(reference, data.input_size).dense if slim else flops.dense
    # structure: channel trains at full width, removed channels masked: its steps cost the full model's
    f_sparse = (layer_flops(reference, data.input_size) if recipe.structure == "channel" else flops).sparse(
        stats.densities
    )
    images = stats.progress.images
    dense_gradient_images = stats.progress.dense_gradients * recipe.batch_size * stats.num_processes
    training = training_flops(f_sparse, f_dense, images, dense_gradient_images)
    member_flops = [
        layer_flops(member, data.input_size).sparse({n: m.float().mean().item() for n, m in masks.items()})
        for member, masks in zip(model.members, model.masks, strict=True)
    ]
    total_params = sum(p.numel() for p in reference.parameters())
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


def channel_summary(tickets: list[Ticket]) -> dict[str, Any]:
    """``structure: channel``: the channels each ticket kept (over all groups), and how much the
    tickets' channel sets overlap (Jaccard index of the kept ``(group, channel)`` pairs, per pair of
    tickets: 1 means they kept the same channels, so the slimming added no diversity)."""
    sets = [{(root, c) for root, kept in (t.kept or {}).items() for c in kept} for t in tickets]
    overlap = {
        f"{i}-{j}": len(sets[i] & sets[j]) / len(sets[i] | sets[j])
        for i in range(len(sets))
        for j in range(i + 1, len(sets))
    }
    return {"kept_channels": [len(s) for s in sets], "kept_overlap": overlap}


def _realised_sparsity(model: EnsembleModel, index: int) -> float:
    """Zero share over all maskable (conv/linear) weights of one member, counted from its masks."""
    weights = maskable_weights(model.members[index])
    masks = model.masks[index]
    total = sum(w.numel() for w in weights.values())
    active = sum(int(masks[n].sum()) if n in masks else w.numel() for n, w in weights.items())
    return 1.0 - active / total
