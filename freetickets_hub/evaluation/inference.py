"""Member logits on a whole split, under accelerate: each process runs its shard, then all are gathered.

``accelerator.prepare`` shards the batches across processes (padding the last round with repeated
images); ``gather_for_metrics`` drops those repeats, and each image carries its index so the gathered
rows are put back in dataset order whatever the process count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from freetickets_hub.errors import MissingDependencyError
from freetickets_hub.model.ensemble import EnsembleModel

__all__ = ["ImageTransform", "Inference", "create_accelerator", "run_inference"]

# (image (C, H, W) uint8, dataset index) -> transformed uint8 image; used for corruptions
ImageTransform = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Inference:
    """Raw member logits on a split, in dataset order, and how the work was shared."""

    member_logits: torch.Tensor  # (M, N, K) float32, on the CPU, before any temperature
    images_per_process: list[int]  # images each process ran, padding repeats included


def create_accelerator() -> Any:
    """An ``Accelerator`` for evaluation (CPU, one GPU or several processes, as launched)."""
    try:
        from accelerate import Accelerator
    except ImportError as err:
        raise MissingDependencyError("evaluation needs accelerate: pip install 'freetickets-hub[train]'") from err
    return Accelerator()


class _IndexedImages(Dataset):
    def __init__(self, images: torch.Tensor, transform: ImageTransform | None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        return (self.transform(image, index) if self.transform else image), index


@torch.inference_mode()
def run_inference(
    model: EnsembleModel,
    images: torch.Tensor,
    accelerator: Any,
    *,
    batch_size: int = 256,
    transform: ImageTransform | None = None,
    desc: str = "evaluate",
) -> Inference:
    """Raw logits of every member on uint8 ``images`` ``(N, C, H, W)``, normalised per the config.

    Args:
        model: the ensemble (moved to ``accelerator.device``).
        images: uint8 images at the model's input size, e.g. ``EvalSplit.images``.
        accelerator: an ``accelerate.Accelerator``; every process must call this with the same images.
        batch_size: images per forward pass on each process.
        transform: applied to each uint8 image (with its dataset index, for seeding) before normalising.
        desc: the progress bar's label (shown on the main process only).
    """
    cfg = model.config.pretrained_cfg
    channels = images.shape[1]
    model.to(accelerator.device).eval()
    mean = torch.tensor(cfg.get("mean", (0.0,) * channels), dtype=torch.float32, device=accelerator.device)
    std = torch.tensor(cfg.get("std", (1.0,) * channels), dtype=torch.float32, device=accelerator.device)
    loader = accelerator.prepare(DataLoader(_IndexedImages(images, transform), batch_size=batch_size, shuffle=False))
    logits_parts, index_parts = [], []
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)
    for batch, index in bar:
        seen += len(index)
        pixels = (batch.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        logits = model.member_logits(pixels).float().transpose(0, 1)  # (B, M, K): gather joins on dim 0
        logits, index = accelerator.gather_for_metrics((logits.contiguous(), index))
        logits_parts.append(logits.cpu())
        index_parts.append(index.cpu())
    counts = accelerator.gather(torch.tensor([seen], device=accelerator.device)).cpu().tolist()
    logits = torch.cat(logits_parts)
    order = torch.cat(index_parts).argsort()
    # every image exactly once: what makes N processes give the numbers of one
    assert torch.equal(torch.cat(index_parts)[order], torch.arange(len(images))), (
        "gathered indices are not a permutation"
    )
    return Inference(member_logits=logits[order].transpose(0, 1).contiguous(), images_per_process=counts)
