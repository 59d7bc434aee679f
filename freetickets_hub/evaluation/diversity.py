"""How different the members are: in what they predict and in which weights they keep.

Pairwise results are ``M × M`` matrices (row i, column j) with a ``mean`` over the pairs i ≠ j.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mask_distance", "prediction_diversity"]


def prediction_diversity(member_logits: torch.Tensor, temperature: float = 1.0) -> dict[str, Any]:
    """Pairwise top-1 disagreement and KL divergence of members' predictions on the same images.

    Args:
        member_logits: ``(M, N, K)`` raw logits; each member's softmax uses ``temperature``.

    Returns:
        ``disagreement`` (share of images where members i and j pick different classes) and ``kl``
        (mean over images of KL(p_i ‖ p_j), nats; not symmetric), each with its pair mean.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]])  # two members, one image
        >>> prediction_diversity(logits)["disagreement"]["matrix"]
        [[0.0, 1.0], [1.0, 0.0]]
    """
    log_probs = torch.log_softmax(member_logits.double() / temperature, dim=-1)  # (M, N, K)
    top1 = log_probs.argmax(-1)  # (M, N)
    num_members = len(log_probs)
    disagreement = torch.zeros(num_members, num_members, dtype=torch.float64)
    kl = torch.zeros_like(disagreement)
    for i in range(num_members):
        for j in range(num_members):
            disagreement[i, j] = (top1[i] != top1[j]).double().mean()
            kl[i, j] = (log_probs[i].exp() * (log_probs[i] - log_probs[j])).sum(-1).mean()
    return {"disagreement": _pairwise(disagreement), "kl": _pairwise(kl)}


def mask_distance(masks: list[dict[str, torch.Tensor]]) -> dict[str, Any] | None:
    """Jaccard and Hamming distance between members' sparsity masks, per layer and over all layers.

    Jaccard distance is ``1 − |A ∩ B| / |A ∪ B|`` over kept weights; Hamming distance is the share of
    positions where the masks differ. A layer that one member keeps dense (no mask entry) counts as
    all kept for that member; layers dense in every member are left out, and so are layers whose
    shapes differ between members (slim members: their positions do not correspond).

    Args:
        masks: one ``{weight name: bool mask}`` dict per member (``EnsembleModel.masks``).

    Returns:
        ``layers`` (name -> ``jaccard``/``hamming`` pair matrices) and ``overall`` (all layers pooled),
        or None when no layer can be compared (a dense ensemble, or slim members whose every masked
        layer differs in shape).
    """
    shapes = {name: mask.shape for member in masks for name, mask in member.items()}
    shapes = {n: shape for n, shape in shapes.items() if all(m[n].shape == shape for m in masks if n in m)}
    if not shapes:
        return None
    num_members = len(masks)
    inter = torch.zeros(num_members, num_members, dtype=torch.float64)
    union, differ, total = torch.zeros_like(inter), torch.zeros_like(inter), 0
    layers = {}
    for name in sorted(shapes):
        flat = torch.stack(
            [
                m[name].reshape(-1).bool() if name in m else torch.ones(shapes[name].numel(), dtype=torch.bool)
                for m in masks
            ]
        )
        kept = flat.double()  # (M, P)
        layer_inter = kept @ kept.T
        counts = kept.sum(1)
        layer_union = counts[:, None] + counts[None, :] - layer_inter
        layer_differ = layer_union - layer_inter
        layers[name] = {
            "jaccard": _pairwise(1 - layer_inter / layer_union.clamp_min(1)),
            "hamming": _pairwise(layer_differ / flat.shape[1]),
        }
        inter += layer_inter
        union += layer_union
        differ += layer_differ
        total += flat.shape[1]
    return {
        "layers": layers,
        "overall": {"jaccard": _pairwise(1 - inter / union.clamp_min(1)), "hamming": _pairwise(differ / total)},
    }


def _pairwise(matrix: torch.Tensor) -> dict[str, Any]:
    num = len(matrix)
    off_diagonal = matrix[~torch.eye(num, dtype=torch.bool)]
    return {"matrix": matrix.tolist(), "mean": off_diagonal.mean().item() if num > 1 else 0.0}
