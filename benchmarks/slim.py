"""Slim tickets (issue 23) on the OOD benchmark: ensembles of physically narrow members against ONE dense model.

Every run is ``benchmarks/ood.py``'s (Fashion-MNIST without Shirt and Sneaker, its preset, OOD suite,
validation carve, bootstrap draws and claim rule) on WRN-16-4 (2.7 M parameters, over-parameterized for
Fashion-MNIST), each method at the same epochs (E for dense-like runs, 1.8·E for EDST):

- single dense; dense ensemble (M=3); unstructured EDST (M=3, S=0.8);
- slim DST and slim EDST: ``structure: channel`` at ``channel_sparsity`` 0.6, ``channel_allocation``
  uniform with ``channel_floor`` 0.4 (every layer keeps 40 % of its channels, rounded up to a multiple of
  16: the widths of the narrow members, 32/64/112 a stage), unstructured S=0.5 inside them;
- the same two at Chase's global allocation (one UMM threshold, floor 0.25), seed 0 only: on WRN-16-4 it
  keeps the 28x28 stage whole and costs more than one dense model (RESULTS.md), so it is not the
  ranked candidate;
- ``narrow_dense_ensemble`` at the same channel sparsity (Packed-Ensembles with gamma=1).

Seeds (issue 23's CPU budget): seed 0 of every method; seeds 1 and 2 of the single dense model, of
``narrow_dense_ensemble`` (the slim-vs-narrow verdict needs three seeds of both; it is the cheapest run)
and of the slim method with the better validation OOD score (``ood_report.validation_score``, never the
test-time sets); ``--all-seeds`` adds seeds 1 and 2 of the rest. A claim against the single dense model
needs all three seeds; a seed-0-only row is shown without one. Runs checkpoint every
``CHECKPOINT_STEPS`` steps, so an interrupted one resumes where it stopped.

Latency: every method's seed-0 artifact, exported by the package (``export/graph.py``; int8 is static
QDQ calibrated on validation images, ``export/quantize.write_int8_graph``), ORT CPU, one process,
interleaved (``inference.time_engines``), ``OMP_WAIT_POLICY=PASSIVE``, no spinning, as ratios to ONE
dense fp32 model (the single dense run) at batch 1 and 64.

    OMP_NUM_THREADS=1 python benchmarks/slim.py                 # train what is missing, evaluate, report
    for w in 1 2; do OMP_NUM_THREADS=1 python benchmarks/slim.py --stage train & done; wait   # two cores
    OMP_NUM_THREADS=1 python benchmarks/slim.py                 # then the latency and the report
    OMP_NUM_THREADS=1 python benchmarks/slim.py --stage report  # meanwhile: what is evaluated so far
    kill -STOP <workers>; python benchmarks/slim.py --stage report --time; kill -CONT <workers>  # + latency

A worker trains and evaluates each run it claims (``quality_runs.claimed``), in the order of
:func:`work_order`, and waits while the rest is held by other workers or by seed 0's ranking. Runs go to
``runs/slim-cpu/<name>``; member logits are cached per run (``ood.run_logits``), timings in
``latency.json``; ``results.json``, ``results.md`` and the ``slim-cpu`` section of RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and onnxruntime start their thread pools

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from inference import session_options, time_engines
from ood import DST_RECIPE, EDST_RECIPE, LOGITS_NAME, PRESET, SEEDS, build_specs_methods, run_logits, seed_groups
from ood import METHODS as OOD_METHODS
from ood_report import (
    KINDS,
    analyse,
    kind_draws,
    kind_point,
    none_worse_or_below,
    paired_differences,
    shared_draws,
    training_flops,
    validation_score,
    validation_sets,
    verdict,
)
from ood_sets import SeedGroup
from ood_stats import interval
from quality_report import markdown_table, provenance, write_results
from quality_runs import REPO, RunSpec, claimed, train_run

from freetickets_hub.artifact.config import EnsembleConfig
from freetickets_hub.artifact.files import write_text_atomic
from freetickets_hub.artifact.names import CONFIG_NAME
from freetickets_hub.evaluation import create_accelerator
from freetickets_hub.export.graph import export_graph
from freetickets_hub.export.quantize import write_int8_graph
from freetickets_hub.model.ensemble import EnsembleModel
from freetickets_hub.uncertainty.calibration import fit_temperature

ARCHITECTURE = "cifar_wrn16_4"
# 0.6 meets the latency targets, 0.5 does not (RESULTS.md, slim_latency.py); inside the 16 % of a conv's
# weights that 40 % of its channels keep, S=0.8 would leave 3 %: the slim tickets train at S=0.5
CHANNELS = ["channel_sparsity=0.6", "channel_multiple=16"]
SLIM_SPARSITY = "sparsity=0.5"
# every layer at 1 - channel_sparsity, rounded up as narrow_widths rounds: the narrow members' widths
UNIFORM = ["channel_allocation=uniform", "channel_floor=0.4"]
SLIM_DST = ["method=dst", "structure=channel", *CHANNELS, SLIM_SPARSITY]
SLIM_EDST = ["method=edst", "structure=channel", *CHANNELS, SLIM_SPARSITY]
METHODS = {  # name -> (label, recipe, overrides), as ood.METHODS
    "single_dense": OOD_METHODS["single_dense"],
    "dense_ensemble": OOD_METHODS["dense_ensemble"],
    "edst_ensemble": ("unstructured EDST", EDST_RECIPE, ["method=edst"]),
    "slim_dst": ("slim DST", DST_RECIPE, [*SLIM_DST, *UNIFORM]),
    "slim_edst": ("slim EDST", EDST_RECIPE, [*SLIM_EDST, *UNIFORM]),
    "slim_dst_global": ("slim DST, global allocation", DST_RECIPE, SLIM_DST),
    "slim_edst_global": ("slim EDST, global allocation", EDST_RECIPE, SLIM_EDST),
    "narrow_dense_ensemble": ("narrow dense ensemble", DST_RECIPE, ["method=narrow_dense_ensemble", *CHANNELS]),
}
SLIM = ("slim_dst", "slim_edst")  # the candidates: seed 0 of both ranks them, the first trains at every seed
GLOBAL = ("slim_dst_global", "slim_edst_global")
CHANNEL = (*SLIM, *GLOBAL)  # every method with slim members: paired with narrow, held to the latency targets
BASELINE = "single_dense"
NARROW = "narrow_dense_ensemble"
CHECKPOINT_STEPS = 100  # about 1.6 epochs of 8,000 images at batch 128
POLL_S = 60.0  # how long a worker waits before it looks again for a run it can claim
BATCH_SIZES = (1, 64)
LATENCY_NAME = "latency.json"
CALIBRATION_IMAGES = 64
TIMING = {"seconds": 4.0, "passes": 5}  # per graph and batch size: as slim_latency.py's WRN-16-4 case
NO_CLAIM = f"fewer than {len(SEEDS)} seeds: no claim"
NOT_RUN = "not run yet"
TARGETS = {"fp32": 0.8, "int8": 0.5}  # M=3 slim ensemble vs ONE dense fp32 model, at every batch size


def build_specs(dataset: str) -> list[RunSpec]:
    """Every method at every seed on WRN-16-4 (which of them train, in what order: :func:`work_order`)."""
    extra = [f"architecture={ARCHITECTURE}", f"checkpoint_every={CHECKPOINT_STEPS}"]
    return build_specs_methods(PRESET, dataset, METHODS, extra)


def work_order(best_slim: str | None, all_seeds: bool) -> list[str]:
    """The runs to train, most needed first (the CPU-budget rule above).

    ``best_slim`` is None until both slim methods' seed-0 runs are evaluated: the ranked runs are then
    left out, and the rest of the order does not depend on them.
    """
    three = (BASELINE, NARROW)
    order = [f"{m}_s0" for m in (*SLIM, *three)] + [f"{m}_s{s}" for m in three for s in SEEDS[1:]]
    if best_slim is not None:
        order += [f"{best_slim}_s{s}" for s in SEEDS[1:]]
    order += [f"{m}_s0" for m in METHODS if m not in (*SLIM, *three)]
    if all_seeds:
        order += [f"{m}_s{s}" for m in METHODS if m not in (*SLIM, *three) for s in SEEDS[1:]]
        if best_slim is not None:
            order += [f"{m}_s{s}" for m in SLIM if m != best_slim for s in SEEDS[1:]]
    return order


def rank_slim(logits: dict[str, dict[str, torch.Tensor]], group: SeedGroup) -> list[str]:
    """The slim methods at seed 0, best validation OOD score first (T fitted on each run's carve)."""

    def score(method: str) -> float:
        run = logits[f"{method}_s0"]
        temperature = fit_temperature(run["val"], group.data.val.labels).temperature
        return validation_score(validation_sets(run, group, temperature))

    return sorted(SLIM, key=score, reverse=True)


def measure_latency(
    out: Path, names: list[str], group: SeedGroup, threads: int = 1, *, cached_only: bool = False
) -> dict[str, Any] | None:
    """Median ms per call of each run's fp32 and int8 graph, and ratios to the single dense fp32 graph (cached).

    ``names`` starts with the single dense run. The cache is keyed by the runs, their weights'
    modification times and the thread count. With ``cached_only`` (a report while workers load the
    cores) nothing is timed: the cache, if it timed a subset of ``names`` on the same weights, or None.
    """
    cache = out / LATENCY_NAME
    settings = {
        "runs": {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in names},
        "threads": threads,
        "batch_sizes": list(BATCH_SIZES),
        "calibration_images": CALIBRATION_IMAGES,
        "timing": TIMING,
    }
    if cache.exists():
        stored = json.loads(cache.read_text())
        timed = stored.get("settings", {})
        if timed == settings or (cached_only and _times_subset(timed, settings)):
            return stored
    if cached_only:
        return None
    config = EnsembleConfig.from_json_file(str(out / names[0] / CONFIG_NAME)).pretrained_cfg
    mean = np.asarray(config["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(config["std"], np.float32).reshape(1, -1, 1, 1)
    pixels = ((group.data.val.images.numpy().astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    options = session_options(threads)
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="freetickets-slim-") as work:
        for name in names:
            fp32, int8 = Path(work) / f"{name}.onnx", Path(work) / f"{name}.int8.onnx"
            export_graph(EnsembleModel.from_pretrained(out / name).eval(), fp32)
            write_int8_graph(fp32, int8, pixels[:CALIBRATION_IMAGES])
            for precision, path in (("fp32", fp32), ("int8", int8)):
                sessions[(name, precision)] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
    rows: dict[str, Any] = {}
    for batch in BATCH_SIZES:
        x = pixels[:batch]
        engines = {
            f"{n}/{p}": (lambda s=s, x=x: s.run(["probs"], {"pixel_values": x})) for (n, p), s in sessions.items()
        }
        timed = time_engines(engines, **TIMING, sync=lambda: None)
        base = statistics.median(timed[f"{BASELINE}_s0/fp32"])
        for key, values in timed.items():
            name, precision = key.split("/")
            rows.setdefault(name, {}).setdefault(precision, {})[str(batch)] = {
                "ms_median": statistics.median(values) * 1e3,
                "ratio": statistics.median(values) / base,
                "repeats": len(values),
            }
    result = {"settings": settings, "runs": rows, "load_average": os.getloadavg()}
    write_text_atomic(cache, json.dumps(result, indent=2) + "\n")
    return result


def _times_subset(stored: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a cache's settings equal ``settings`` except that they time fewer of its runs."""
    runs = stored.get("runs", {})
    same = {k: v for k, v in stored.items() if k != "runs"} == {k: v for k, v in settings.items() if k != "runs"}
    return same and bool(runs) and all(settings["runs"].get(n) == t for n, t in runs.items())


def nonzero_params(folder: Path) -> float:
    """The ensemble's nonzero parameters over one dense model's, from the run's ``train_summary.json``."""
    costs = json.loads((folder / "train_summary.json").read_text())["costs"]
    return float(costs["params_nonzero_ensemble_vs_dense_member"])


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means (and per-seed values) of one method's runs, entropy AUROC by kind with its interval."""
    test = {k: [r["test"][k] for r in rows] for k in ("accuracy", "nll", "ece")}
    out: dict[str, Any] = {
        "seeds": len(rows),
        **{k: float(np.mean(v)) for k, v in test.items()},
        "per_seed": test,
        "training_flops_vs_single_dense": float(np.mean([r["training_flops_vs_single_dense"] for r in rows])),
        "nonzero_params_vs_dense": float(np.mean([r["nonzero_params_vs_dense"] for r in rows])),
        "kinds": {},
    }
    for kind in KINDS:
        draws = np.mean([kind_draws(r, kind, "entropy") for r in rows], axis=0)
        out["kinds"][kind] = {
            "auroc": float(np.mean([kind_point(r, kind, "entropy") for r in rows])),
            "auroc_interval": interval(draws),
        }
    if rows[0]["test_diversity"]:
        far = [e["diversity"]["disagreement"] for r in rows for e in r["sets"].values() if e["kind"] == "far"]
        out["disagreement"] = {
            "test": float(np.mean([r["test_diversity"]["disagreement"] for r in rows])),
            "far": float(np.mean(far)),
        }
    return out


def claims(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 23's quality targets against the single dense model (None without all three seeds).

    Accuracy, NLL and ECE compare the seed means as the targets state them (>=, <=); each OOD kind
    takes the claim rule's verdict (``ood_report.verdict``), and none may be worse or below.
    """
    if len(rows) < len(SEEDS) or len(base) < len(SEEDS):
        return None
    differences = paired_differences(rows, base)
    kinds = {k: verdict(differences[k]["entropy"]) for k in KINDS}
    mean = {
        k: (float(np.mean([r["test"][k] for r in rows])), float(np.mean([b["test"][k] for b in base])))
        for k in ("accuracy", "nll", "ece")
    }
    checks = {
        "accuracy >=": mean["accuracy"][0] >= mean["accuracy"][1],
        "calibrated NLL <=": mean["nll"][0] <= mean["nll"][1],
        "calibrated ECE <=": mean["ece"][0] <= mean["ece"][1],
        "no OOD kind worse or below": none_worse_or_below(kinds),
    }
    return {"kinds": kinds, "differences": differences, "checks": checks, "pass": all(checks.values())}


def latency_checks(latency: dict[str, Any], name: str) -> dict[str, bool]:
    """Whether run ``name`` meets the fp32 and int8 latency targets at every batch size."""
    return {
        f"{precision} <= {limit}x at batch {batch}": latency["runs"][name][precision][str(batch)]["ratio"] <= limit
        for precision, limit in TARGETS.items()
        for batch in BATCH_SIZES
    }


def versus_narrow(rows: list[dict[str, Any]], narrow: list[dict[str, Any]]) -> dict[str, Any]:
    """A slim method against ``narrow_dense_ensemble``, runs paired by seed (the issue's last target).

    The differences are always given; the verdicts (``kinds``, ``at_least_as_good``: accuracy >=, NLL
    and ECE <=, no OOD kind worse or below) only at all three seeds, else None.
    """
    count = min(len(rows), len(narrow))
    rows, narrow = rows[:count], narrow[:count]
    delta = {
        k: float(np.mean([r["test"][k] - n["test"][k] for r, n in zip(rows, narrow, strict=True)]))
        for k in ("accuracy", "nll", "ece")
    }
    differences = paired_differences(rows, narrow)
    auroc = {k: differences[k]["entropy"]["difference"] for k in KINDS}
    block: dict[str, Any] = {"seeds": count, "delta": delta, "auroc_delta": auroc, "kinds": None}
    block["at_least_as_good"] = None
    if count == len(SEEDS):
        kinds = {k: verdict(differences[k]["entropy"]) for k in KINDS}
        block["kinds"] = kinds
        block["at_least_as_good"] = (
            delta["accuracy"] >= 0 and delta["nll"] <= 0 and delta["ece"] <= 0 and none_worse_or_below(kinds)
        )
    return block


def report(
    specs: list[RunSpec],
    groups: dict[int, SeedGroup],
    logits: dict[str, dict[str, torch.Tensor]],
    latency: dict[str, Any] | None,
    out: Path,
    best_slim: str | None,
    results_md: str,
    pending: list[str],
) -> None:
    """Analyse every run, aggregate per method, check the targets, write the tables.

    ``pending`` names the runs of the plan not evaluated yet (``--stage report`` while workers run): their
    methods show what is there, and latency (None, or fewer runs) what was timed.
    """
    started = time.time()
    draws = shared_draws(next(iter(groups.values())))
    runs = {}
    for spec in specs:
        runs[spec.name] = analyse(logits[spec.name], groups[spec.load().seed], draws)
        runs[spec.name]["training_flops"] = training_flops(out / spec.name)
        runs[spec.name]["nonzero_params_vs_dense"] = nonzero_params(out / spec.name)
    base_flops = np.mean([runs[f"{BASELINE}_s{s}"]["training_flops"] for s in SEEDS if f"{BASELINE}_s{s}" in runs])
    for run in runs.values():
        run["training_flops_vs_single_dense"] = run["training_flops"] / base_flops
    methods = {m: rows for m in METHODS if (rows := [runs[f"{m}_s{s}"] for s in SEEDS if f"{m}_s{s}" in runs])}
    results = {
        "provenance": provenance(started),
        "conventions": __doc__,
        "pending": pending,
        "best_slim_on_validation": best_slim,
        "methods": {m: summarise(rows) for m, rows in methods.items()},
        "claims_vs_single_dense": {m: claims(rows, methods[BASELINE]) for m, rows in methods.items() if m != BASELINE},
        "versus_narrow": {
            m: versus_narrow(*paired(runs, m, NARROW)) for m in CHANNEL if m in methods and NARROW in methods
        },
        "latency": latency,
        "latency_targets": {
            m: latency_checks(latency, f"{m}_s0") for m in CHANNEL if latency and f"{m}_s0" in latency["runs"]
        },
    }
    for line in write_results(out, results, render(results), results_md, "slim-cpu"):
        print("wrote", line)


def paired(runs: dict[str, dict[str, Any]], method: str, other: str) -> tuple[list[dict], list[dict]]:
    """The runs of ``method`` and of ``other`` at the seeds both have, seed by seed."""
    both = [s for s in SEEDS if f"{method}_s{s}" in runs and f"{other}_s{s}" in runs]
    return [runs[f"{method}_s{s}"] for s in both], [runs[f"{other}_s{s}"] for s in both]


def _ratio(latency: dict[str, Any] | None, name: str, precision: str, batch: int) -> str:
    if latency is None or name not in latency["runs"]:
        return "-"
    return f"{latency['runs'][name][precision][str(batch)]['ratio']:.2f}x"


def _auroc_cell(block: dict[str, Any]) -> str:
    low, high = block["auroc_interval"]
    return f"{block['auroc']:.3f} [{low:.3f}, {high:.3f}]"


def render(results: dict[str, Any]) -> str:
    """The Markdown of the ``slim-cpu`` section."""
    summary, latency = results["methods"], results["latency"]
    header = [
        "method",
        "seeds",
        "acc",
        "NLL (cal)",
        "ECE (cal)",
        *KINDS,
        "disagreement test → far",
        "train FLOPs x",
        "nonzero params x",
    ]
    header += [f"{p} b{b}" for p in TARGETS for b in BATCH_SIZES]
    rows = []
    for method, (label, _, _) in METHODS.items():
        if method not in summary:
            rows.append([label, 0, *[NOT_RUN] * (len(header) - 2)])
            continue
        s = summary[method]
        auroc = [_auroc_cell(s["kinds"][k]) for k in KINDS]
        diversity = f"{s['disagreement']['test']:.3f} → {s['disagreement']['far']:.3f}" if "disagreement" in s else "-"
        timing = [_ratio(latency, f"{method}_s0", p, b) for p in TARGETS for b in BATCH_SIZES]
        rows.append(
            [
                METHODS[method][0],
                s["seeds"],
                f"{s['accuracy']:.4f}",
                f"{s['nll']:.4f}",
                f"{s['ece']:.4f}",
                *auroc,
                diversity,
                f"{s['training_flops_vs_single_dense']:.2f}",
                f"{s['nonzero_params_vs_dense']:.2f}",
                *timing,
            ]
        )
    pending = results["pending"]
    lines = [f"**In progress**: {len(pending)} runs of the plan not evaluated yet: {', '.join(pending)}.", ""]
    lines = lines if pending else []
    lines += [
        f"WRN-16-4 ({ARCHITECTURE}); OOD cells: entropy AUROC of the calibrated ensemble, mean over the seeds "
        "[95 % bootstrap interval over test images]; latency: seed 0's ONNX graph, ORT CPU, median ratio to ONE "
        "dense fp32 model at batch b.",
        "",
        markdown_table(header, rows),
        "",
        f"**Against the single dense model** (claim rule of `benchmarks/ood.py`; methods with all {len(SEEDS)} seeds)",
        "",
    ]
    rows = []
    for method, (label, _, _) in METHODS.items():
        if method == BASELINE:
            continue
        claim = results["claims_vs_single_dense"].get(method)
        if claim is None:
            rows.append([label, "-", "-", "-", NO_CLAIM if method in summary else NOT_RUN, "-"])
            continue
        checks = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in claim["checks"].items())
        rows.append(
            [METHODS[method][0], *(claim["kinds"][k] for k in KINDS), checks, "PASS" if claim["pass"] else "MISS"]
        )
    lines += [markdown_table(["method", *KINDS, "checks", "verdict"], rows), ""]
    lines += ["**Slim against `narrow_dense_ensemble`** (same widths; at the seeds both trained)", ""]
    rows = []
    for method, block in results["versus_narrow"].items():
        delta, auroc, kinds = block["delta"], block["auroc_delta"], block["kinds"]
        cells = [f"{auroc[k]:+.3f}" + (f" {kinds[k]}" if kinds else "") for k in KINDS]
        good = block["at_least_as_good"]
        rows.append([
            METHODS[method][0], block["seeds"], f"{delta['accuracy']:+.4f}", f"{delta['nll']:+.4f}",
            f"{delta['ece']:+.4f}", *cells, NO_CLAIM if good is None else ("yes" if good else "NO"),
        ])  # fmt: skip
    header = ["method", "seeds", "Δ acc", "Δ NLL", "Δ ECE", *(f"Δ {k}" for k in KINDS), "at least as good"]
    lines += [markdown_table(header, rows), ""]
    for method, checks in results["latency_targets"].items():
        met = ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items())
        lines.append(f"- latency targets, {METHODS[method][0]}: {met}")
    if not results["latency_targets"]:
        lines.append("- latency: not measured yet (`slim.py` times it at the end; `--stage report --time` before)")
    best = results["best_slim_on_validation"]
    best = METHODS[best][0] if best else "not ranked yet (both slim seed-0 runs needed)"
    lines.append(f"- slim method ranked first on the validation OOD suite (trained at every seed): {best}")
    return "\n".join(lines) + "\n"


class Worker:
    """Trains and evaluates the runs of :func:`work_order` it can claim; other workers may share the folder."""

    def __init__(self, specs: dict[str, RunSpec], out: Path, all_seeds: bool) -> None:
        self.specs, self.out, self.all_seeds = specs, out, all_seeds
        self.accelerator = create_accelerator()
        self.groups: dict[int, SeedGroup] = {}
        self.ranked: str | None = None  # the seed-0 ranking, once both slim runs are evaluated (it cannot change)

    def evaluated(self, name: str) -> bool:
        """Whether run ``name``'s logits are cached (written last, atomically, by whichever worker trained it)."""
        return (self.out / name / LOGITS_NAME).is_file()

    def group(self, name: str) -> SeedGroup:
        """The data and OOD suite of run ``name``'s seed (built once per worker, after the run trained)."""
        seed = self.specs[name].load().seed
        if seed not in self.groups:
            self.groups[seed] = seed_groups([self.specs[name]], self.out)[seed]
        return self.groups[seed]

    def logits(self, name: str) -> dict[str, torch.Tensor]:
        """Run ``name``'s member logits on every set (evaluated once, then read from its cache)."""
        return run_logits(self.out / name, self.group(name), self.accelerator, bn=False)

    def best_slim(self) -> str | None:
        """The slim method ranked first at seed 0, or None while either seed-0 run is not evaluated."""
        first = [f"{m}_s0" for m in SLIM]
        if self.ranked is None and all(self.evaluated(name) for name in first):
            self.ranked = rank_slim({name: self.logits(name) for name in first}, self.group(first[0]))[0]
        return self.ranked

    def run(self, poll_s: float = POLL_S) -> tuple[str, list[str]]:
        """Work until every run of the order is evaluated; return the best slim method and the order."""
        while True:
            best = self.best_slim()
            order = work_order(best, self.all_seeds)
            pending = [name for name in order if not self.evaluated(name)]
            if best is not None and not pending:
                return best, order
            if not any(self.take(name) for name in pending):
                time.sleep(poll_s)  # the rest is held by other workers, or waits for seed 0's ranking

    def take(self, name: str) -> bool:
        """Train and evaluate run ``name`` unless another worker holds it; True if this worker did."""
        with claimed(self.out / name) as hold:
            if hold is not None:
                train_run(self.specs[name], self.out / name, hold=hold)
                self.logits(name)
            return hold is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "slim-cpu"))
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "datasets" / "fashion_mnist"))
    parser.add_argument(
        "--stage",
        choices=("train", "report", "all"),
        default="all",
        help="train: a worker, no report; report: what is evaluated so far, training nothing",
    )
    parser.add_argument(
        "--time",
        action="store_true",
        help="with --stage report: time the seed-0 runs evaluated so far (on idle cores: pause the workers)",
    )
    parser.add_argument("--all-seeds", action="store_true", help="seeds 1 and 2 of every method, not only three")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads of the latency runs")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to leave it alone")
    args = parser.parse_args()
    out = Path(args.output_dir)
    specs = {spec.name: spec for spec in build_specs(args.dataset)}
    worker = Worker(specs, out, args.all_seeds)
    if args.stage == "report":
        best_slim = worker.best_slim()
        order = work_order(best_slim, args.all_seeds)
    else:
        best_slim, order = worker.run()
        print(f"slim method ranked first on the validation OOD suite: {best_slim}", flush=True)
        if args.stage == "train":
            return
    evaluated = [name for name in specs if worker.evaluated(name)]  # the plan's, and any other seeds
    pending = [name for name in order if name not in evaluated]
    if f"{BASELINE}_s0" in pending:
        raise SystemExit(f"nothing to report yet: {BASELINE}_s0 (the baseline of every ratio) is not evaluated")
    chosen = [specs[name] for name in evaluated]
    groups = {spec.load().seed: worker.group(spec.name) for spec in chosen}
    logits = {spec.name: worker.logits(spec.name) for spec in chosen}
    first = [f"{m}_s0" for m in METHODS if f"{m}_s0" in evaluated]  # the single dense run is one of them
    busy = args.stage == "report" and not args.time  # workers may be training: time nothing, use the cache
    latency = measure_latency(out, first, groups[0], args.threads, cached_only=busy)
    report(chosen, groups, logits, latency, out, best_slim, args.results_md, pending)


if __name__ == "__main__":
    main()
