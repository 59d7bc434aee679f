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
        refine_lrs = [(i / len(recipe.refine_lrs), lr) for i, lr in enumerate(recipe.refine_lrs)]
        phases = [
            Phase(
                "explore", recipe.explore_epochs, [(0.0, recipe.lr)], ticket=False, warmup_epochs=recipe.warmup_epochs
            )
        ]
        phases += [
            Phase(
                f"refine {i + 1}/{recipe.num_members}",
                recipe.refine_epochs,
                refine_lrs,
                ticket=True,
                escape_before=i > 0,
            )
            for i in range(recipe.num_members)
        ]
        if recipe.explore_epochs == 0:
            phases = phases[1:]
        return [Run(recipe.seed, phases)]
    lrs = [(0.0, recipe.lr)] + [(m, recipe.lr * 0.1 ** (i + 1)) for i, m in enumerate(sorted(recipe.lr_milestones))]
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
                )
            ],
        )
        for i in range(recipe.num_members)
    ]
