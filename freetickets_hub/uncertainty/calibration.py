"""Temperature scaling of a whole ensemble (Guo et al., 2017), fitted on held-out member logits.

One temperature T divides every member's logits before its softmax, exactly as
:func:`~freetickets_hub.uncertainty.outputs.combine_member_logits` applies it; T minimises the NLL of the
ensemble's mean probability. The search runs over log T: a coarse grid finds the basin, then
scipy's bounded Brent method refines it. An optimum on the edge of the range means the split
cannot pin T down (e.g. every image right, which drives T to 0) and is flagged as degenerate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from freetickets_hub.errors import MissingDependencyError
from freetickets_hub.uncertainty.metrics import classification_metrics
from freetickets_hub.uncertainty.outputs import combine_member_logits

__all__ = ["TEMPERATURE_BOUNDS", "TemperatureFit", "ensemble_nll", "fit_temperature"]

TEMPERATURE_BOUNDS = (0.05, 20.0)
_GRID_POINTS = 61  # coarse grid over log T before the bounded refinement


@dataclass
class TemperatureFit:
    """The fitted temperature and the split's NLL / ECE with the old and the new one."""

    temperature: float
    previous_temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    num_images: int
    degenerate: bool
    reason: str = ""  # why the fit is degenerate, for the user

    def to_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)


def ensemble_nll(member_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """NLL of the mean of the members' ``softmax(logits / temperature)``; logits are ``(M, N, K)``."""
    log_probs = torch.log_softmax(member_logits.double() / temperature, dim=-1)  # (M, N, K)
    index = labels.view(1, -1, 1).expand(len(log_probs), -1, 1)
    picked = log_probs.gather(2, index).squeeze(2).T.contiguous()  # (N, M) log p_m(label)
    return -(torch.logsumexp(picked, dim=1) - math.log(len(log_probs))).mean().item()


def fit_temperature(
    member_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    previous_temperature: float = 1.0,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> TemperatureFit:
    """Find the temperature that minimises the ensemble's NLL on held-out ``(M, N, K)`` logits.

    Args:
        member_logits: raw logits of the M members on N held-out images.
        labels: ``(N,)`` class indices.
        previous_temperature: the temperature in use so far, for the "before" numbers.
        bounds: the search range of T (positive, finite).

    Example:
        >>> logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]])  # one member
        >>> fit = fit_temperature(logits, torch.tensor([0, 1, 0, 0]))  # 3 of 4 right
        >>> round(fit.temperature, 4), fit.degenerate  # softmax(4 / T) = 3/4, so T = 4 / ln 3
        (3.641, False)
    """
    try:
        from scipy.optimize import minimize_scalar
    except ImportError as err:
        raise MissingDependencyError("fitting a temperature needs scipy: pip install scipy") from err
    low, high = bounds
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"temperature bounds must satisfy 0 < low < high < inf, got {bounds}")
    if member_logits.dim() != 3 or labels.shape != member_logits.shape[1:2] or not len(labels):
        raise ValueError(
            f"expected member logits (M, N, K) and labels (N,) with N > 0, got {tuple(member_logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    member_logits = member_logits.double()

    def objective(log_t: float) -> float:
        return ensemble_nll(member_logits, labels, math.exp(log_t))

    grid = torch.linspace(math.log(low), math.log(high), _GRID_POINTS, dtype=torch.float64).tolist()
    values = [objective(x) for x in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    result = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    log_t = float(result.x) if result.fun <= values[best] else grid[best]
    temperature = math.exp(log_t)
    degenerate, reason = False, ""
    if not math.isfinite(temperature) or best in (0, len(grid) - 1):
        degenerate = True
        edge, why = ("lower", "nearly all correct") if best == 0 else ("upper", "too often confidently wrong")
        reason = (
            f"the NLL keeps falling towards the {edge} bound of T in [{low}, {high}] (the split is {why}); "
            "fit on a larger or harder held-out split"
        )
    before = _metrics(member_logits, labels, previous_temperature)
    after = _metrics(member_logits, labels, temperature)
    return TemperatureFit(
        temperature=temperature,
        previous_temperature=previous_temperature,
        nll_before=before["nll"],
        nll_after=after["nll"],
        ece_before=before["ece"],
        ece_after=after["ece"],
        num_images=len(labels),
        degenerate=degenerate,
        reason=reason,
    )


def _metrics(member_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    return classification_metrics(combine_member_logits(member_logits, temperature).probs, labels)
