"""The OOD benchmark's analysis: detection metrics per set and kind, seeds, paired bootstrap intervals, diagnostics.

Reads the member logits ``benchmarks/ood.py`` cached per run and writes ``results.json``,
``results.md``, ``benchmarks/ood_cpu.png`` and the ``ood-cpu`` section of ``benchmarks/RESULTS.md``.
Conventions: in-distribution (the test split's 8 kept classes) is the positive class; scores are
oriented so that higher means more in-distribution (max probability, -entropy, -mutual information);
"calibrated" uses the run's temperature fitted on its own validation carve.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ood_stats import Draws, bootstrap_detection, interval, separated
from quality_report import markdown_table, provenance, write_results

from freetickets_hub.evaluation import prediction_diversity
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.calibration import fit_temperature
from freetickets_hub.uncertainty.metrics import classification_metrics, detection_metrics
from freetickets_hub.uncertainty.outputs import EnsembleOutput, combine_member_logits

if TYPE_CHECKING:
    from ood_sets import SeedGroup
    from quality_runs import RunSpec

__all__ = [
    "KINDS",
    "Grid",
    "analyse",
    "goal",
    "kind_draws",
    "kind_point",
    "none_worse_or_below",
    "paired_differences",
    "rank_levers",
    "report",
    "shared_draws",
    "training_flops",
    "validation_score",
    "validation_sets",
    "verdict",
]

SCORES = ("entropy", "mutual_information", "msp")
SCORE_LABELS = {"entropy": "entropy", "mutual_information": "mutual information", "msp": "max probability"}
KINDS = ("near", "shifted", "far")
DRAWS = 1000
BASELINE = "single_dense"
FLOPS_GOAL = 0.65
PLOT = Path(__file__).resolve().parent / "ood_cpu.png"


@dataclass(frozen=True)
class Grid:
    """What ``benchmarks/ood.py`` ran: method and lever names with their labels, and the seeds."""

    methods: dict[str, str]
    levers: dict[str, str]  # only the levers that were trained
    seeds: tuple[int, ...]


def report(
    specs: Sequence[RunSpec],
    groups: dict[int, SeedGroup],
    logits: dict[str, dict[str, torch.Tensor]],
    out: Path,
    results_md: str,
    selected: str,
    grid: Grid,
) -> None:
    """Analyse every run, aggregate over seeds, write the tables (see the module docstring).

    ``selected`` is the lever :func:`rank_levers` put first (its seeds 1 and 2 join the tables when trained).
    """
    levers, seeds = grid.levers, grid.seeds
    started = time.time()
    any_group = next(iter(groups.values()))
    draws = shared_draws(any_group)
    runs = {}
    for spec in specs:
        group = groups[spec.load().seed]
        runs[spec.name] = analyse(logits[spec.name], group, draws)
        runs[spec.name]["label"] = spec.label
        runs[spec.name]["training_flops"] = training_flops(out / spec.name)
    base_flops = np.mean([runs[f"{BASELINE}_s{s}"]["training_flops"] for s in seeds])
    for run in runs.values():
        run["training_flops_vs_single_dense"] = run["training_flops"] / base_flops
    lever_names = ["edst_ensemble_s0", *levers]
    eligible = [n for n in lever_names if within_budget(out / n, out / f"{BASELINE}_s0")]
    labels = dict(grid.methods)
    methods = {m: [runs[f"{m}_s{s}"] for s in seeds] for m in grid.methods}
    if selected in levers and all(f"{selected}_s{s}" in runs for s in seeds[1:]):  # the selected lever, 3 seeds
        labels["selected_lever"] = f"EDST, {levers[selected]}"
        methods["selected_lever"] = [runs[selected], *(runs[f"{selected}_s{s}"] for s in seeds[1:])]
    summary = {m: _seed_summary(rows) for m, rows in methods.items()}
    differences = {m: paired_differences(rows, methods[BASELINE]) for m, rows in methods.items() if m != BASELINE}
    stems = {name: _stem_density(out / name) for name in ("edst_ensemble_s0", "edst_uniform") if (out / name).is_dir()}
    results = {
        "provenance": provenance(started),
        "conventions": __doc__,
        "sets": {s.name: {"kind": s.kind, "num_images": len(s.images)} for s in any_group.test_sets},
        "val_sets": {s.name: {"kind": s.kind, "num_images": len(s.images)} for s in any_group.val_sets},
        "in_distribution_test_images": len(any_group.data.test.labels),
        "draws": DRAWS,
        "runs": {name: {k: v for k, v in run.items() if k != "draws"} for name, run in runs.items()},
        "methods": summary,
        "differences_vs_single_dense": differences,
        "stem_density": stems,
        "levers": {"candidates": lever_names, "within_flops_budget": eligible, "selected_on_validation": selected},
    }
    write_plot(logits, runs, PLOT)
    markdown = render(results, labels, levers, runs)
    for line in write_results(out, results, markdown, results_md, "ood-cpu"):
        print("wrote", line)


def shared_draws(group: SeedGroup) -> dict[str, Draws]:
    """One set of in-distribution draws shared by every OOD set, one set of OOD draws per set."""
    first = None
    out = {}
    for s in group.test_sets:
        seed = zlib.crc32(s.name.encode())
        draws = Draws.make(first.inside if first else len(group.data.test.labels), len(s.images), DRAWS, seed)
        first = first or draws
        out[s.name] = draws
    return out


def _scores(output: EnsembleOutput, members: int) -> dict[str, np.ndarray]:
    scores = {"msp": output.probs.max(-1).values, "entropy": -output.entropy}
    if members > 1:  # one member has no mutual information: a constant score says nothing
        scores["mutual_information"] = -output.mutual_information
    return {k: v.double().numpy() for k, v in scores.items()}


def _detection(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {k: detection_metrics(torch.from_numpy(inside[k]), torch.from_numpy(outside[k])) for k in inside}


def analyse(logits: dict[str, torch.Tensor], group: SeedGroup, draws: dict[str, Draws]) -> dict[str, Any]:
    """Every number of one run: accuracy, detection per set (both temperatures), members, diversity, logits."""
    val_labels, test_labels = group.data.val.labels, group.data.test.labels
    members = logits["test"].shape[0]
    temperature = fit_temperature(logits["val"], val_labels).temperature
    member_t = [fit_temperature(logits["val"][i : i + 1], val_labels).temperature for i in range(members)]
    inside = {t: combine_member_logits(logits["test"], t) for t in (1.0, temperature)}
    run: dict[str, Any] = {
        "members": members,
        "temperature": temperature,
        "member_temperatures": member_t,
        "test": classification_metrics(inside[temperature].probs, test_labels),
        "test_diversity": _diversity(logits["test"], temperature),
        "test_logits": _logit_stats(logits["test"]),
        "sets": {},
        "draws": {},
    }
    inside_scores = {t: _scores(output, members) for t, output in inside.items()}
    member_inside = [_scores(combine_member_logits(logits["test"][i : i + 1], member_t[i]), 1) for i in range(members)]
    for s in group.test_sets:
        ood = logits[f"test/{s.name}"]
        entry: dict[str, Any] = {"kind": s.kind}
        outside = {t: _scores(combine_member_logits(ood, t), members) for t in inside_scores}
        entry["calibrated"] = _detection(inside_scores[temperature], outside[temperature])
        entry["uncalibrated"] = _detection(inside_scores[1.0], outside[1.0])
        run["draws"][s.name] = {
            k: bootstrap_detection(inside_scores[temperature][k], outside[temperature][k], draws[s.name])
            for k in inside_scores[temperature]
        }
        entry["member_auroc"] = [
            {
                k: v["auroc"]
                for k, v in _detection(
                    member_inside[i], _scores(combine_member_logits(ood[i : i + 1], member_t[i]), 1)
                ).items()
            }
            for i in range(members)
        ]
        entry["diversity"] = _diversity(ood, temperature)
        entry["logits"] = _logit_stats(ood)
        if f"bn/test/{s.name}" in logits:  # BatchNorm statistics recomputed on clean training images; T = 1
            entry["bn_recomputed"] = _detection(
                _scores(combine_member_logits(logits["bn/test"]), members),
                _scores(combine_member_logits(logits[f"bn/test/{s.name}"]), members),
            )
        run["sets"][s.name] = entry
    if "bn/test" in logits:
        run["bn_test_accuracy"] = classification_metrics(combine_member_logits(logits["bn/test"]).probs, test_labels)[
            "accuracy"
        ]
    run["val_sets"] = validation_sets(logits, group, temperature)
    run["val_score"] = validation_score(run["val_sets"])
    return run


def validation_sets(logits: dict[str, torch.Tensor], group: SeedGroup, temperature: float) -> dict[str, Any]:
    """AUROC per score of the validation carve against each validation OOD set (what levers are ranked on)."""
    members = logits["val"].shape[0]
    inside = _scores(combine_member_logits(logits["val"], temperature), members)
    return {
        s.name: {
            "kind": s.kind,
            **{
                k: v["auroc"]
                for k, v in _detection(
                    inside, _scores(combine_member_logits(logits[f"val/{s.name}"], temperature), members)
                ).items()
            },
        }
        for s in group.val_sets
    }


def validation_score(val_sets: dict[str, Any]) -> float:
    """Mean over the three kinds of the mean entropy AUROC over that kind's validation sets."""
    return float(np.mean([np.mean([v["entropy"] for v in val_sets.values() if v["kind"] == k]) for k in KINDS]))


def within_budget(folder: Path, single_dense_folder: Path) -> bool:
    """Whether a run's training FLOPs are at most ``FLOPS_GOAL`` x the single dense model's."""
    return training_flops(folder) <= FLOPS_GOAL * training_flops(single_dense_folder)


def rank_levers(
    logits: dict[str, dict[str, torch.Tensor]], groups: dict[int, SeedGroup], names: list[str], out: Path
) -> list[str]:
    """The candidates within the FLOPs budget, best validation score first (T fitted on its validation carve)."""

    def score(name: str) -> float:
        group = groups[0]
        temperature = fit_temperature(logits[name]["val"], group.data.val.labels).temperature
        return validation_score(validation_sets(logits[name], group, temperature))

    return sorted((n for n in names if within_budget(out / n, out / f"{BASELINE}_s0")), key=score, reverse=True)


def _diversity(member_logits: torch.Tensor, temperature: float) -> dict[str, float] | None:
    """Pairwise disagreement and KL of the members, and the mean mutual information, on one set."""
    if member_logits.shape[0] == 1:
        return None
    pairs = prediction_diversity(member_logits, temperature)
    return {
        "disagreement": pairs["disagreement"]["mean"],
        "kl": pairs["kl"]["mean"],
        "mutual_information": combine_member_logits(member_logits, temperature).mutual_information.mean().item(),
    }


def _logit_stats(member_logits: torch.Tensor) -> dict[str, float]:
    """Members' raw logits on one set: mean L2 norm, mean top logit, mean max probability (T = 1), averaged."""
    logits = member_logits.double()
    return {
        "logit_norm": logits.norm(dim=-1).mean().item(),
        "max_logit": logits.max(-1).values.mean().item(),
        "msp": logits.softmax(-1).max(-1).values.mean().item(),
    }


def training_flops(folder: Path) -> float:
    """The run's training FLOPs, from its ``train_summary.json``."""
    return float(json.loads((folder / "train_summary.json").read_text())["costs"]["training_flops"])


def _stem_density(folder: Path) -> dict[str, float]:
    """Density of the first convolution (the stem) and of the whole masked model, member 0."""
    model = EnsembleModel.from_pretrained(folder)
    member, masks = model.members[0], model.masks[0]
    stem = next(name for name, m in member.named_modules() if isinstance(m, torch.nn.Conv2d)) + ".weight"
    total = sum(p.numel() for n, p in member.named_parameters() if n in masks)
    kept = sum(int(masks[n].sum()) for n in masks)
    return {
        "stem": stem,
        "stem_density": float(masks[stem].float().mean()) if stem in masks else 1.0,
        "masked_density": kept / total,
    }


def kind_point(run: dict[str, Any], kind: str, score: str, which: str = "calibrated", metric: str = "auroc") -> float:
    """Mean ``metric`` of ``score`` over one run's sets of one OOD kind (NaN when it has none)."""
    values = [e[which][score][metric] for e in run["sets"].values() if e["kind"] == kind and score in e[which]]
    return float(np.mean(values)) if values else float("nan")


def kind_draws(run: dict[str, Any], kind: str, score: str, metric: str = "auroc") -> np.ndarray | None:
    """Bootstrap draws of :func:`kind_point` (the mean over the kind's sets, draw by draw), or None."""
    parts = [
        run["draws"][n][score][metric] for n, e in run["sets"].items() if e["kind"] == kind and score in run["draws"][n]
    ]
    return np.mean(parts, axis=0) if parts else None


def _seed_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds, seed spread and the bootstrap interval of the seed mean, per set and per kind."""
    out: dict[str, Any] = {
        "accuracy": [r["test"]["accuracy"] for r in rows],
        "nll": [r["test"]["nll"] for r in rows],
        "ece": [r["test"]["ece"] for r in rows],
        "training_flops_vs_single_dense": float(np.mean([r["training_flops_vs_single_dense"] for r in rows])),
        "kinds": {},
        "sets": {},
    }
    for score in SCORES:
        if score not in rows[0]["draws"][next(iter(rows[0]["draws"]))]:
            continue
        for kind in KINDS:
            points = [kind_point(r, kind, score) for r in rows]
            draws = np.mean([kind_draws(r, kind, score) for r in rows], axis=0)
            out["kinds"].setdefault(kind, {})[score] = {
                "auroc": float(np.mean(points)),
                "auroc_seeds": points,
                "auroc_seed_std": float(np.std(points, ddof=1)),
                "auroc_interval": interval(draws),
                "auroc_uncalibrated": float(np.mean([kind_point(r, kind, score, "uncalibrated") for r in rows])),
                "aupr": float(np.mean([kind_point(r, kind, score, metric="aupr") for r in rows])),
                "fpr_at_95_tpr": float(np.mean([kind_point(r, kind, score, metric="fpr_at_95_tpr") for r in rows])),
            }
        for name in rows[0]["sets"]:
            points = [r["sets"][name]["calibrated"][score]["auroc"] for r in rows]
            fpr = [r["sets"][name]["calibrated"][score]["fpr_at_95_tpr"] for r in rows]
            draws = np.mean([r["draws"][name][score]["auroc"] for r in rows], axis=0)
            out["sets"].setdefault(name, {})[score] = {
                "auroc": float(np.mean(points)),
                "auroc_seed_std": float(np.std(points, ddof=1)),
                "auroc_interval": interval(draws),
                "aupr": float(np.mean([r["sets"][name]["calibrated"][score]["aupr"] for r in rows])),
                "fpr_at_95_tpr": float(np.mean(fpr)),
            }
    out["diagnostics"] = _diagnostics(rows)
    return out


def _diagnostics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of: member vs ensemble entropy AUROC, diversity and logit statistics, per kind and on test."""
    out: dict[str, Any] = {"test": {}, "kinds": {}}
    if rows[0]["test_diversity"]:
        out["test"]["diversity"] = {
            k: float(np.mean([r["test_diversity"][k] for r in rows])) for k in rows[0]["test_diversity"]
        }
    out["test"]["logits"] = {k: float(np.mean([r["test_logits"][k] for r in rows])) for k in rows[0]["test_logits"]}
    for kind in KINDS:
        entries = [[e for e in r["sets"].values() if e["kind"] == kind] for r in rows]
        block: dict[str, Any] = {
            "ensemble_entropy_auroc": float(np.mean([kind_point(r, kind, "entropy") for r in rows])),
            "member_entropy_auroc": float(
                np.mean([np.mean([m["entropy"] for e in es for m in e["member_auroc"]]) for es in entries])
            ),
            "logits": {
                k: float(np.mean([e["logits"][k] for es in entries for e in es])) for k in rows[0]["test_logits"]
            },
        }
        if rows[0]["test_diversity"]:
            block["diversity"] = {
                k: float(np.mean([e["diversity"][k] for es in entries for e in es])) for k in rows[0]["test_diversity"]
            }
        if all("bn_recomputed" in e for e in entries[0]):  # seed 0 only
            block["bn_recomputed_entropy_auroc_seed0"] = float(
                np.mean([e["bn_recomputed"]["entropy"]["auroc"] for e in entries[0]])
            )
            block["stored_entropy_auroc_seed0_t1"] = float(
                np.mean([e["uncalibrated"]["entropy"]["auroc"] for e in entries[0]])
            )
        out["kinds"][kind] = block
    return out


def paired_differences(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed-mean AUROC minus the single dense model's, per kind and score, on paired draws; and whether it separates."""
    out: dict[str, Any] = {}
    for score in ("entropy", "msp"):
        for kind in KINDS:
            per_seed = [
                kind_point(r, kind, score) - kind_point(b, kind, score) for r, b in zip(rows, base, strict=True)
            ]
            draws = np.mean(
                [kind_draws(r, kind, score) - kind_draws(b, kind, score) for r, b in zip(rows, base, strict=True)],
                axis=0,
            )
            out.setdefault(kind, {})[score] = {
                "difference": float(np.mean(per_seed)),
                "per_seed": per_seed,
                "interval": interval(draws),
                "separated": separated(draws, per_seed),
            }
    return out


def _cell(block: dict[str, Any]) -> str:
    low, high = block["auroc_interval"]
    return f"{block['auroc']:.3f} [{low:.3f}, {high:.3f}] ±{block['auroc_seed_std']:.3f}"


def render(results: dict[str, Any], label: dict[str, str], levers: dict[str, str], runs: dict[str, Any]) -> str:
    """The Markdown of the ``ood-cpu`` section (``label``: method key -> its name in the tables)."""
    summary, diffs = results["methods"], results["differences_vs_single_dense"]
    methods = list(label)
    lines = [
        "AUROC cells: mean of 3 seeds [95 % bootstrap interval of that mean over test images] ±std over seeds; "
        "calibrated (temperature fitted on each run's validation carve).",
        "",
        "**Detection by OOD kind** (near: held-out classes Shirt + Sneaker; shifted: 9 corruptions at severity 5, "
        "inverted, rotated 90°; far: sklearn digits, Gaussian / uniform noise, constant images)",
        "",
    ]
    rows = []
    for m in methods:
        for score in SCORES:
            if score in summary[m]["kinds"]["near"]:
                rows.append([label[m], SCORE_LABELS[score], *(_cell(summary[m]["kinds"][k][score]) for k in KINDS)])
    lines += [markdown_table(["method", "score", "near", "shifted", "far"], rows), ""]
    lines += [
        "**Against the single dense model** (difference of seed means; ✔ = interval excludes 0 and all 3 seeds agree)",
        "",
    ]
    rows = []
    for m, block in diffs.items():
        for score in ("entropy", "msp"):
            cells = []
            for k in KINDS:
                d = block[k][score]
                cells.append(
                    f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
                    + (" ✔" if d["separated"] else "")
                )
            rows.append([label[m], SCORE_LABELS[score], *cells])
    lines += [markdown_table(["method", "score", "near", "shifted", "far"], rows), ""]
    lines += [
        f"**The goal** (a sparse ensemble at <= {FLOPS_GOAL}x one dense model's training FLOPs that flags OOD "
        "inputs at least as well as the single dense model, by entropy): per kind, *worse* / *better* = the "
        "difference separates below / above 0; *below* / *above (seeds disagree)* = its interval over test "
        "images excludes 0 but a seed has the other sign; *tie* = the interval holds 0. PASS needs no kind "
        "worse or below, and the calibrated test NLL and ECE (seed means) at most the single dense model's",
        "",
    ]
    rows = []
    for m, block in diffs.items():
        if m in ("dense_ensemble",):
            continue
        g = goal(summary[m], summary[BASELINE], block)
        cells = [f"{value:.4f} (dense {dense:.4f})" for value, dense in g["calibration"].values()]
        rows.append([label[m], f"{g['flops']:.3f}", *g["kinds"].values(), *cells, "PASS" if g["met"] else "**MISS**"])
    header = ["method", "train FLOPs x dense", "near", "shifted", "far", "NLL (T)", "ECE (T)", "goal"]
    lines += [markdown_table(header, rows), ""]
    lines += ["**Per set** (entropy, calibrated: AUROC mean of 3 seeds [interval] / FPR@95)", ""]
    rows = []
    for name, info in results["sets"].items():
        cells = []
        for m in methods:
            b = summary[m]["sets"][name]["entropy"]
            cells.append(
                f"{b['auroc']:.3f} [{b['auroc_interval'][0]:.2f}, {b['auroc_interval'][1]:.2f}]"
                + f" / {b['fpr_at_95_tpr']:.2f}"
            )
        rows.append([f"{name} ({info['kind']}, {info['num_images']})", *cells])
    lines += [markdown_table(["set", *(label[m] for m in methods)], rows), ""]
    lines += [
        "**Before → after calibration, AUPR and FPR@95** (seed means, per kind: AUROC at T=1 → calibrated; "
        "AUPR; FPR@95)",
        "",
    ]
    rows = []
    for m in methods:
        for score in ("entropy", "msp"):
            cells = []
            for k in KINDS:
                b = summary[m]["kinds"][k][score]
                cells.append(
                    f"{b['auroc_uncalibrated']:.3f} → {b['auroc']:.3f}; {b['aupr']:.3f}; {b['fpr_at_95_tpr']:.2f}"
                )
            rows.append([label[m], SCORE_LABELS[score], *cells])
    lines += [markdown_table(["method", "score", "near", "shifted", "far"], rows), ""]
    lines += ["**Why: members, diversity, logits** (seed means; test → near / shifted / far)", ""]
    rows = []
    for m in methods:
        d = summary[m]["diagnostics"]
        ens = " / ".join(f"{d['kinds'][k]['ensemble_entropy_auroc']:.3f}" for k in KINDS)
        mem = " / ".join(f"{d['kinds'][k]['member_entropy_auroc']:.3f}" for k in KINDS)
        dis, mi = (_test_to_kinds(d, "diversity", key, "{:.3f}") for key in ("disagreement", "mutual_information"))
        norm, msp = _test_to_kinds(d, "logits", "logit_norm", "{:.1f}"), _test_to_kinds(d, "logits", "msp", "{:.3f}")
        rows.append([label[m], ens, mem, dis, mi, norm, msp])
    header = [
        "method",
        "ensemble H AUROC",
        "mean member H AUROC",
        "disagreement",
        "MI (nats)",
        "member logit norm",
        "member max prob",
    ]
    lines += [markdown_table(header, rows), ""]
    lines += [
        "**BatchNorm statistics recomputed** on clean training images (seed 0, entropy AUROC at T=1: "
        "stored → recomputed)",
        "",
    ]
    rows = []
    for m in methods:
        d = summary[m]["diagnostics"]["kinds"]
        if "bn_recomputed_entropy_auroc_seed0" in d["near"]:
            cells = [
                f"{d[k]['stored_entropy_auroc_seed0_t1']:.3f} → {d[k]['bn_recomputed_entropy_auroc_seed0']:.3f}"
                for k in KINDS
            ]
            acc = runs[f"{m}_s0"]
            rows.append(
                [label[m], *cells, f"{100 * acc['test']['accuracy']:.2f} → {100 * acc['bn_test_accuracy']:.2f}"]
            )
    lines += [markdown_table(["method", "near", "shifted", "far", "accuracy %"], rows), ""]
    stems = results["stem_density"]
    lines += [
        "Stem convolution density (member 0): "
        + "; ".join(
            f"{n}: {s['stem']} {s['stem_density']:.3f} (masked layers {s['masked_density']:.3f})"
            for n, s in stems.items()
        ),
        "",
        f"**Levers** (EDST, seed 0, one change each; those within {FLOPS_GOAL}x the single dense model's training "
        "FLOPs are ranked by the validation suite: mean over kinds of the "
        "entropy AUROC on the validation carve vs held-out classes' training images and shifted / synthetic "
        "copies of validation images; test numbers: entropy AUROC [interval], one seed)",
        "",
    ]
    rows = []
    candidates = results["levers"]["candidates"]
    base_val = runs["edst_ensemble_s0"]["val_score"]
    for name in [f"{BASELINE}_s0", *candidates]:
        run = runs[name]
        cells = []
        for k in KINDS:
            point = kind_point(run, k, "entropy")
            low, high = interval(kind_draws(run, k, "entropy"))
            cells.append(f"{point:.3f} [{low:.3f}, {high:.3f}]")
        what = (
            "single dense (reference)"
            if name == f"{BASELINE}_s0"
            else ("EDST as in the grid" if name == "edst_ensemble_s0" else levers[name])
        )
        mark = " **selected**" if name == results["levers"]["selected_on_validation"] else ""
        rows.append(
            [
                f"{name}{mark}",
                what,
                f"{run['val_score']:.3f}",
                f"{run['val_score'] - base_val:+.3f}",
                *cells,
                f"{100 * run['test']['accuracy']:.2f}",
                f"{run['training_flops_vs_single_dense']:.3f}",
            ]
        )
    header = ["run", "change", "val score", "Δ val", "near", "shifted", "far", "acc %", "train FLOPs x dense"]
    lines += [markdown_table(header, rows), "", f"![OOD max-probability histograms]({PLOT.name})", ""]
    return "\n".join(lines)


def goal(method: dict[str, Any], single_dense: dict[str, Any], differences: dict[str, Any]) -> dict[str, Any]:
    """Issue 24's target for one method's seed summary: FLOPs, the verdict per kind, calibrated NLL and ECE.

    Met at most ``FLOPS_GOAL`` x the single dense model's training FLOPs, with no kind worse or below
    by entropy and the seed-mean NLL and ECE at most the single dense model's.
    """
    flops = method["training_flops_vs_single_dense"]
    kinds = {k: verdict(differences[k]["entropy"]) for k in KINDS}
    calibration = {k: (float(np.mean(method[k])), float(np.mean(single_dense[k]))) for k in ("nll", "ece")}
    met = flops <= FLOPS_GOAL and none_worse_or_below(kinds)
    met = met and all(value <= dense for value, dense in calibration.values())
    return {"flops": flops, "kinds": kinds, "calibration": calibration, "met": met}


def none_worse_or_below(kinds: dict[str, str]) -> bool:
    """Whether no OOD kind's :func:`verdict` is *worse* or *below*: the claim rule's pass."""
    return not any(v.startswith(("worse", "below")) for v in kinds.values())


def verdict(difference: dict[str, Any]) -> str:
    """better / worse (separated), below / above (the interval excludes 0, a seed disagrees), or tie."""
    low, high = difference["interval"]
    if difference["separated"]:
        return "better" if difference["difference"] > 0 else "worse"
    if high < 0:
        return "below (seeds disagree)"
    return "above (seeds disagree)" if low > 0 else "tie"


def _test_to_kinds(diagnostics: dict[str, Any], block: str, key: str, fmt: str) -> str:
    """``test value → near / shifted / far`` of one diagnostic, or ``-`` when the method has none."""
    if block not in diagnostics["test"]:
        return "-"
    kinds = " / ".join(fmt.format(diagnostics["kinds"][k][block][key]) for k in KINDS)
    return f"{fmt.format(diagnostics['test'][block][key])} → {kinds}"


def write_plot(logits: dict[str, dict[str, torch.Tensor]], runs: dict[str, Any], path: Path) -> None:
    """Max-probability histograms (T = 1) of one dense member and one EDST member, test vs near / shifted / far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for axis, (name, title) in zip(
        axes,
        [
            ("single_dense_s0", "single dense"),
            ("dst_ensemble_s0", "DST member 0"),
            ("edst_ensemble_s0", "EDST member 0"),
        ],
        strict=True,
    ):
        run_logits, sets = logits[name], runs[name]["sets"]
        groups = {"test (in-dist.)": [run_logits["test"][0]]}
        for kind in KINDS:
            groups[kind] = [run_logits[f"test/{n}"][0] for n, e in sets.items() if e["kind"] == kind]
        bins = np.linspace(0, 1, 41)
        for group, parts in groups.items():
            msp = torch.cat(parts).double().softmax(-1).max(-1).values.numpy()
            axis.hist(msp, bins=bins, histtype="step", density=True, label=group, linewidth=1.4)
        axis.set_title(title)
        axis.set_xlabel("max probability (T = 1)")
        axis.set_yscale("log")
    axes[0].set_ylabel("density (log)")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
