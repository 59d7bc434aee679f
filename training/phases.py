"""The schedule of a run: which phases it has, their learning rates, where tickets are taken.

EDST is one run: exploration at the high LR, then M refinement phases, each ending in a ticket and
each but the first preceded by a forced escape (with the LR reset). Every other method is M runs
(one per seed, DST/static-sparse/dense ensembles) of one phase with a step-decayed LR.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import Recipe

__all__ = ["Phase", "Run", "plan_runs"]


@dataclass
class Phase:
    name: str
    epochs: int
    lrs: list[tuple[float, float]]  # (start as a fraction of the phase, lr), piecewise constant
    ticket: bool  # the phase ends with a saved ticket (one ensemble member)
    escape_before: bool = False  # EDST: forced escape before the phase starts
    warmup_epochs: int = 0
    # the prune-rate schedule restarts here for a cycle of this many epochs (None: the cycle goes on)
    prune_cycle_epochs: int | None = None

    def lr_at(self, progress: float, epoch_progress: float) -> float:
        """LR at ``progress`` in [0, 1) of the phase; ``epoch_progress`` counts epochs for warm-up."""
        lr = self.lrs[0][1]
        for start, value in self.lrs:
            if progress >= start:
                lr = value
        if epoch_progress < self.warmup_epochs:
            lr *= (epoch_progress + 1e-3) / self.warmup_epochs
        return lr


@dataclass
class Run:
    seed: int  # seeds the member's initial weights and masks
    phases: list[Phase]


def plan_runs(recipe: Recipe) -> list[Run]:
    if recipe.method == "edst":
        return [Run(recipe.seed, _edst_phases(recipe))]
    lrs = [(0.0, recipe.lr)] + [(m, recipe.lr * 0.1 ** (i + 1)) for i, m in enumerate(recipe.lr_milestones)]
    return [
        Run(
            recipe.seed + i,
            [
                Phase(
                    f"member {i + 1}/{recipe.num_members}",
                    recipe.epochs,
                    lrs,
                    ticket=True,
                    warmup_epochs=recipe.warmup_epochs,
                    prune_cycle_epochs=recipe.epochs,
                )
            ],
        )
        for i in range(recipe.num_members)
    ]


def _edst_phases(recipe: Recipe) -> list[Phase]:
    """Exploration, then M refinements (escape before all but the first).

    The prune-rate cycle restarts at every phase (``prune_rate_restart: phase``), or at each
    forced escape (``escape``, the official code): exploration and the first refinement share one.
    """
    starts = recipe.refine_lr_milestones
    if starts is None:  # split evenly over the refine LRs
        starts = [i / len(recipe.refine_lrs) for i in range(1, len(recipe.refine_lrs))]
    refine_lrs = list(zip([0.0, *starts], recipe.refine_lrs, strict=True))
    explore = Phase("explore", recipe.explore_epochs, [(0.0, recipe.lr)], ticket=False)
    explore.warmup_epochs = recipe.warmup_epochs
    refines = [
        Phase(f"refine {i + 1}/{recipe.num_members}", recipe.refine_epochs, refine_lrs, True, escape_before=i > 0)
        for i in range(recipe.num_members)
    ]
    phases = [explore, *refines] if recipe.explore_epochs else refines
    for phase in phases:
        phase.prune_cycle_epochs = phase.epochs
    if recipe.prune_rate_restart == "escape" and recipe.explore_epochs:
        explore.prune_cycle_epochs = recipe.explore_epochs + recipe.refine_epochs
        refines[0].prune_cycle_epochs = None
    return phases
