"""The sparse engine: which weights are maskable, how sparse each layer starts, how masks change.

Prune and grow rules are pure functions on tensors; :class:`SparseEngine` applies them to a model
every ``update_interval`` steps and keeps the masks, so its ``state_dict`` is part of every checkpoint.
Random draws use a generator seeded from ``(seed, update index)``, so every DDP rank draws the same.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "SparseEngine",
    "SparsityConfig",
    "draw_masks",
    "gradient_grow",
    "layer_densities",
    "magnitude_prune",
    "maskable_weights",
    "nonzero_counts",
    "prune_rate_at",
    "random_grow",
    "random_masks",
]

logger = logging.getLogger(__name__)

_MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_OPTIMIZER_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass
class SparsityConfig:
    """How sparse the members are and how their masks evolve."""

    sparsity: float = 0.8  # fraction of maskable weights that are zero
    distribution: str = "erk"  # "erk" or "uniform"
    growth: str = "gradient"  # "gradient" (RigL) or "random" (SET)
    prune_rate: float = 0.5  # p: share of a layer's active weights dropped at each update
    prune_rate_schedule: str = "constant"  # "constant" or "cosine" (restarted at each phase)
    prune_rate_final: float = 0.005  # end of the cosine decay
    update_interval: int = 1000  # ΔT, in optimizer steps
    update_end: int | None = None  # no regular updates at or after this global step
    escape_rate: float = 0.8  # q: share dropped and regrown by EDST's forced escape
    escape_growth: str | None = None  # growth used by the escape; None means `growth`
    regrow_pruned: bool = True  # regrowth may pick the positions just pruned (official code, RigL); False: not


def maskable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every conv and linear weight, first conv and classifier included, by ``state_dict`` name."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules() if isinstance(module, _MASKABLE)}


def layer_densities(shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, float]:
    """Density of each layer so that the nonzeros add up to ``(1 - sparsity) * N``.

    ``erk``: density ∝ (sum of dims) / (product of dims), one scale ε for all layers; a layer whose
    density would exceed 1 becomes dense and ε is solved again until none does. ``uniform``: 1 - S.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if distribution == "uniform":
        return {name: 1.0 - sparsity for name in shapes}
    if distribution != "erk":
        raise ValueError(f"distribution must be 'erk' or 'uniform', got {distribution!r}")
    dense: set[str] = set()
    while True:
        budget = 0.0  # nonzeros left for the sparse layers
        divisor = 0.0
        raw: dict[str, float] = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            budget += (1.0 - sparsity) * numel
            if name in dense:
                budget -= numel
            else:
                raw[name] = sum(shape) / numel
                divisor += raw[name] * numel
        epsilon = budget / divisor if divisor else 0.0
        too_dense = {name for name, score in raw.items() if epsilon * score > 1.0}
        if not too_dense:
            break
        dense |= too_dense
    return {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}


def nonzero_counts(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float]) -> dict[str, int]:
    """Exact nonzero count of each layer (at least one weight per layer)."""
    return {
        name: max(1, min(math.prod(shape), round(densities[name] * math.prod(shape)))) for name, shape in shapes.items()
    }


def draw_masks(
    shapes: Mapping[str, tuple[int, ...]], counts: Mapping[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random masks with exactly ``counts[name]`` set positions (random top-k)."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.rand(numel, generator=generator).topk(counts[name]).indices] = True
        masks[name] = mask.view(shape)
    return masks


def random_masks(
    model: nn.Module, sparsity: float, distribution: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random masks of ``model``'s maskable weights with exact per-layer counts (none for dense layers)."""
    shapes = {name: tuple(w.shape) for name, w in maskable_weights(model).items()}
    counts = nonzero_counts(shapes, layer_densities(shapes, sparsity, distribution))
    sparse = {name: shape for name, shape in shapes.items() if counts[name] < math.prod(shape)}
    return draw_masks(sparse, counts, generator)


def magnitude_prune(weight: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """Copy of ``mask`` without the ``count`` active weights of smallest magnitude."""
    score = weight.detach().abs().float().masked_fill(~mask, float("inf")).reshape(-1)
    new_mask = mask.clone().reshape(-1)
    new_mask[score.topk(count, largest=False).indices] = False
    return new_mask.view_as(mask)


def gradient_grow(grad: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` candidate positions with the largest dense-gradient magnitude (RigL)."""
    score = grad.detach().abs().float().masked_fill(~candidates, -1.0).reshape(-1)
    return _top_positions(score, count, candidates)


def random_grow(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` candidate positions drawn uniformly at random (SET)."""
    noise = torch.rand(candidates.numel(), generator=generator).to(candidates.device)
    return _top_positions(noise.masked_fill(~candidates.reshape(-1), -1.0), count, candidates)


def _top_positions(score: torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    grown = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    grown[score.topk(count).indices] = True
    return grown.view_as(like)


def prune_rate_at(config: SparsityConfig, step_in_phase: int, phase_steps: int) -> float:
    """Prune rate p at a step of the current phase: constant, or cosine-decayed to the final rate."""
    if config.prune_rate_schedule == "constant":
        return config.prune_rate
    if config.prune_rate_schedule != "cosine":
        raise ValueError(f"prune_rate_schedule must be 'constant' or 'cosine', got {config.prune_rate_schedule!r}")
    progress = min(1.0, step_in_phase / max(1, phase_steps))
    final = config.prune_rate_final
    return final + 0.5 * (config.prune_rate - final) * (1.0 + math.cos(math.pi * progress))


class SparseEngine:
    """Keeps a model's masks, applies them after every optimizer step and updates them every ΔT steps.

    The masks follow the model's weights: the engine reads the weights from ``model`` each time and
    moves a mask to its weight's device whenever they differ (a model prepared for a GPU after the
    engine was built, a checkpoint resumed on another device). :meth:`check` (run at every update)
    raises on what it cannot fix: a weight the optimizer does not hold, or gradients and optimizer
    state on another device than their weight.

    Args:
        model: the (unwrapped) model whose conv/linear weights are masked.
        optimizer: its optimizer; momentum/Adam moments of regrown weights are zeroed.
        config: sparsity settings.
        seed: seeds the initial masks and every random regrowth.
        masks: start from these masks (fine-tuning) instead of drawing them; layers without one stay
            dense, and each layer keeps its nonzero count through every update.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SparsityConfig,
        *,
        seed: int,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.seed = seed
        weights = self.weights
        shapes = {name: tuple(w.shape) for name, w in weights.items()}
        if masks is None:
            self.counts = nonzero_counts(shapes, layer_densities(shapes, config.sparsity, config.distribution))
            self.masks = random_masks(model, config.sparsity, config.distribution, torch.Generator().manual_seed(seed))
        else:
            wrong = sorted(n for n, m in masks.items() if n not in shapes or tuple(m.shape) != shapes[n])
            if wrong:
                raise ValueError(f"masks {wrong} name no maskable weight of this model or have another shape")
            self.masks = {name: mask.bool() for name, mask in masks.items()}
            self.counts = {n: int(self.masks[n].sum()) if n in self.masks else math.prod(s) for n, s in shapes.items()}
        self.forbidden: dict[str, torch.Tensor] = {}  # positions never active again (removed channels)
        self._unmasked = set(shapes) - set(self.masks)  # layers dense until a forbid masks them
        self._count_active()
        self.num_updates = 0
        self.phase_start = 0
        self.phase_steps = 1 << 62  # no phase end until start_phase() says otherwise
        self.apply_masks()
        self.check()

    @property
    def weights(self) -> dict[str, nn.Parameter]:
        """The model's maskable weights as they are now (a device or dtype move may replace them)."""
        return maskable_weights(self.model)

    def start_phase(self, start_step: int, num_steps: int) -> None:
        """Restart the prune-rate schedule for a phase of ``num_steps`` steps starting at ``start_step``."""
        self.phase_start, self.phase_steps = start_step, num_steps

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights (moving any mask to its weight's device first)."""
        weights = self.weights
        for name, mask in self._masks_on(weights).items():
            weights[name].mul_(mask)

    def check(self) -> None:
        """Raise ``RuntimeError`` naming the tensor when the masks cannot follow the model safely."""
        weights = self.weights
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name, mask in self.masks.items():
            weight = weights.get(name)
            if weight is None or weight.shape != mask.shape:
                found = None if weight is None else tuple(weight.shape)
                raise RuntimeError(f"mask {name} {tuple(mask.shape)} has no matching weight in the model ({found})")
            if id(weight) not in held:
                raise RuntimeError(
                    f"{name} is not a parameter of the engine's optimizer: the model's parameters were replaced "
                    "after the optimizer was built (build the optimizer and the engine after moving the model)"
                )
            tensors = {"gradient": weight.grad, **self.optimizer.state.get(weight, {})}
            for key, tensor in tensors.items():
                if isinstance(tensor, torch.Tensor) and tensor.shape == weight.shape and tensor.device != weight.device:
                    raise RuntimeError(f"{name}: {key} is on {tensor.device} but the weight is on {weight.device}")

    def step(self, global_step: int) -> dict[str, float] | None:
        """Call after each applied ``optimizer.step()`` with the number of steps done so far (from 1).

        Re-applies the masks and, every ``update_interval`` steps (except on the last step of a
        phase), prunes and regrows.
        Returns the update's statistics when one happened.
        """
        self.apply_masks()
        cfg = self.config
        if global_step % cfg.update_interval or (cfg.update_end is not None and global_step >= cfg.update_end):
            return None
        if global_step >= self.phase_start + self.phase_steps:
            return None  # the phase's last step: regrown weights would leave it untrained, at zero
        rate = prune_rate_at(cfg, global_step - self.phase_start, self.phase_steps)
        stats = self.update(rate, cfg.growth)
        logger.info("step %d: mask update, prune rate %.4f, %d weights regrown", global_step, rate, stats["regrown"])
        return stats

    def escape(self) -> dict[str, float]:
        """EDST's forced escape: drop q of each sparse layer's active weights and regrow as many."""
        stats = self.update(self.config.escape_rate, self.config.escape_growth or self.config.growth)
        logger.info("forced escape: q=%.2f, %d weights regrown", self.config.escape_rate, stats["regrown"])
        return stats

    @torch.no_grad()
    def update(self, rate: float, growth: str) -> dict[str, float]:
        """Magnitude-prune ``rate`` of each sparse layer's active weights and regrow the same count.

        With ``regrow_pruned`` (the official code and RigL) regrowth picks among every position
        inactive after pruning, so a weight pruned and regrown at once keeps its value and state;
        without it, only among positions inactive before the update (and at most that many).
        Newly active weights and their optimizer state start at zero. Layers left dense are untouched.

        Returns:
            ``regrown``: weights pruned (and as many regrown); ``moved``: positions whose state
            changed (pruned and not regrown); ``density``: the density after the update.
        """
        if growth not in ("gradient", "random"):
            raise ValueError(f"growth must be 'gradient' or 'random', got {growth!r}")
        self.check()
        weights = self.weights
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.num_updates + 1)
        regrown_total = 0
        for name, mask in self._masks_on(weights).items():
            weight = weights[name]
            active = self._active[name]
            count = int(rate * active)
            allowed = ~self.forbidden[name] if name in self.forbidden else torch.ones_like(mask)
            if not self.config.regrow_pruned:
                count = min(count, int((~mask & allowed).sum()))
            if count == 0:
                continue
            kept = magnitude_prune(weight, mask, count)
            candidates = (~kept if self.config.regrow_pruned else ~mask) & allowed
            if growth == "gradient":
                if weight.grad is None:
                    raise RuntimeError(f"gradient growth needs {name}.grad; update masks before zero_grad()")
                grown = gradient_grow(weight.grad, candidates, count)
            else:
                grown = random_grow(candidates, count, generator)
            survivors = kept | (grown & mask)  # a weight pruned and regrown at once is unchanged
            weight.mul_(survivors)  # dropped weights -> 0; newly active ones were inactive, hence already 0
            self._zero_optimizer_state(weight, survivors)
            self.masks[name] = kept | grown
            regrown_total += count
        self.num_updates += 1
        return {"regrown": regrown_total, "density": self.density()}

    @torch.no_grad()
    def forbid(self, forbidden: Mapping[str, torch.Tensor]) -> int:
        """Deactivate ``forbidden`` positions (``name.weight`` -> bool) for good: zeroed, never regrown.

        Removed channels (``channel_training.py``) go this way; a dense layer gets a mask to hold them.
        The layer's active count falls by what was active there. Returns the weights deactivated.
        """
        weights = self.weights
        dropped = 0
        for name, positions in forbidden.items():
            weight = weights[name]
            positions = positions.to(weight.device, torch.bool)
            mask = self.masks.get(name, torch.ones_like(positions))
            self.forbidden[name] = self.forbidden.get(name, torch.zeros_like(positions)) | positions
            dropped += int((mask & positions).sum())
            self.masks[name] = mask & ~self.forbidden[name]
            weight.mul_(self.masks[name])
            self._zero_optimizer_state(weight, ~positions)
        self._count_active()
        return dropped

    @torch.no_grad()
    def restore(self, values: Mapping[str, torch.Tensor], generator: torch.Generator) -> int:
        """Lift every :meth:`forbid`: each layer regrows back to its own count, drawn at random among
        the positions it had lost, and the regrown weights take ``values`` there (a fresh init).

        Returns the weights regrown.
        """
        weights = self.weights
        grown_total = 0
        for name, forbidden in self.forbidden.items():
            weight, mask = weights[name], self.masks[name]
            count = min(self.counts[name] - int(mask.sum()), int(forbidden.sum()))
            grown = random_grow(forbidden, count, generator) if count > 0 else torch.zeros_like(mask)
            weight[grown] = values[name].to(weight)[grown]
            self._zero_optimizer_state(weight, ~grown)
            self.masks[name] = mask | grown
            if name in self._unmasked and bool(self.masks[name].all()):
                del self.masks[name]  # dense again, as it started
            grown_total += count
        self.forbidden = {}
        self._count_active()
        return grown_total

    def _masks_on(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks, each moved to its weight's device if it is not there yet."""
        for name, mask in self.masks.items():
            if mask.device != weights[name].device:
                self.masks[name] = mask.to(weights[name].device)
        return self.masks

    def _count_active(self) -> None:
        """Active weights per masked layer: constant, as every update regrows what it prunes."""
        self._active = {name: int(mask.sum()) for name, mask in self.masks.items()}
        weights = self.weights
        total = sum(w.numel() for w in weights.values())
        active = sum(self._active.get(n, w.numel()) for n, w in weights.items())
        self._density = active / total

    def _zero_optimizer_state(self, weight: torch.Tensor, survivors: torch.Tensor) -> None:
        state = self.optimizer.state.get(weight, {})
        for key in _OPTIMIZER_BUFFERS:
            buffer = state.get(key)
            if isinstance(buffer, torch.Tensor) and buffer.shape == weight.shape:
                buffer.mul_(survivors)

    def density(self) -> float:
        """Share of nonzero-able maskable weights, over all maskable weights."""
        return self._density

    def state_dict(self) -> dict[str, object]:
        return {
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "num_updates": self.num_updates,
            "phase_start": self.phase_start,
            "phase_steps": self.phase_steps,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore masks and counters (saved on any device: the masks move to the weights' device)."""
        masks = state["masks"]
        assert isinstance(masks, Mapping)
        # a checkpoint may also mask layers that start dense: a forbid (removed channels) masked them
        if not set(self.masks) <= set(masks) <= set(self.weights):
            raise ValueError(f"mask names differ: checkpoint {sorted(masks)} vs model {sorted(self.masks)}")
        self.masks = {name: mask.to(torch.bool) for name, mask in masks.items()}
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        self.phase_start = int(state["phase_start"])  # type: ignore[arg-type]
        self.phase_steps = int(state["phase_steps"])  # type: ignore[arg-type]
        self._count_active()
        self.apply_masks()
        self.check()
