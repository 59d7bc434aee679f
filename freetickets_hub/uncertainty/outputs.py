"""How member logits become the ensemble's prediction and its uncertainty (shared by torch and ONNX)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from freetickets_hub.artifact.names import OUTPUT_NAMES

__all__ = ["OUTPUT_NAMES", "EnsembleOutput", "combine_member_logits"]


@dataclass
class EnsembleOutput:
    """What an ensemble returns for ``pixel_values`` of shape ``(B, C, H, W)``."""

    logits: torch.Tensor  # (B, K) log of the mean member probability: argmax/softmax consumers just work
    probs: torch.Tensor  # (B, K) mean of the members' temperature-scaled softmax
    member_probs: torch.Tensor  # (M, B, K)
    entropy: torch.Tensor  # (B,) total predictive entropy, nats
    expected_entropy: torch.Tensor  # (B,) mean member entropy (aleatoric)
    mutual_information: torch.Tensor  # (B,) entropy - expected_entropy (epistemic)
    disagreement: torch.Tensor  # (B,) share of members whose top-1 differs from the ensemble's

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


def combine_member_logits(member_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> EnsembleOutput:
    """Average temperature-scaled member probabilities and measure how uncertain the result is.

    Args:
        member_logits: ``(M, B, K)`` raw logits of the M members.
        temperature: one positive temperature applied to every member's logits.
    """
    num_members = member_logits.shape[0]
    member_log_probs = torch.log_softmax(member_logits.float() / temperature, dim=-1)  # (M, B, K)
    member_probs = member_log_probs.exp()
    # log(mean_m p_m) computed in log space so tiny probabilities never give log(0)
    logits = torch.logsumexp(member_log_probs, dim=0) - math.log(num_members)  # (B, K)
    probs = logits.exp()
    entropy = -_plogp(probs, logits).sum(-1)
    expected_entropy = -_plogp(member_probs, member_log_probs).sum(-1).mean(0)
    mutual_information = (entropy - expected_entropy).clamp_min(0.0)
    top1 = logits.argmax(-1)  # (B,)
    disagreement = (member_logits.argmax(-1) != top1.unsqueeze(0)).float().mean(0)
    return EnsembleOutput(
        logits=logits,
        probs=probs,
        member_probs=member_probs,
        entropy=entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        disagreement=disagreement,
    )


def _plogp(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``p * log p`` with the limit 0 where ``p`` is 0 (a member logit of -inf gives 0 * -inf otherwise)."""
    return torch.where(p > 0, p * log_p, torch.zeros_like(p))
