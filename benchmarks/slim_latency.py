"""ORT CPU latency of an M=3 (``--members``) ensemble of slim (physically narrow) members against ONE dense model.

Each member is its architecture with a random share (``--sparsity``, default half) of every channel group removed by
``training/channel_sparsity.py`` (``allocation="uniform"``, kept counts multiples of 16; random
scores, so the structure is random: timing only). The M members are the separate branches of ONE
ONNX graph written by the package's exporter (``export/graph.py``: probabilities averaged, every
DESIGN.md output); ONE dense model is the same exporter's graph of a single full-width member, so
both graphs carry the same output tail. int8 is static QDQ (``export/quantize.write_int8_graph``,
calibrated on a few random batches, no quality gate).

All graphs run in one process, interleaved in blocks of repeats over several passes
(``benchmarks/inference.time_engines``), with ``OMP_WAIT_POLICY=PASSIVE`` and ORT
``session.intra_op.allow_spinning=0``; ratios are to ONE dense fp32 model at the same batch size
(median and 25th percentile of the repeats). Cases: WRN-16-4 on 1x28x28 and ResNet-50 on 3x224x224.
With ``--packed``, the same members also run as one network of grouped convolutions
(``export/packed.py``, Packed-Ensembles' layout). Results are appended to ``--output`` (JSON lines, each
row with its settings); a case already there at the same settings is skipped (resumable).

    .venv/bin/python benchmarks/slim_latency.py [--cases wrn16_4 resnet50] [--sparsity 0.5] [--packed] [--threads 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and onnxruntime start their thread pools

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from inference import session_options, time_engines
from torch import nn

import freetickets_hub.model.architectures  # noqa: F401  (registers cifar_wrn*)
from freetickets_hub import EnsembleConfig, EnsembleModel
from freetickets_hub.export.graph import export_graph
from freetickets_hub.export.quantize import write_int8_graph
from freetickets_hub.model.widths import module_widths
from freetickets_hub.training.channel_sparsity import ChannelGraph, choose_channels, kept_counts


@dataclass(frozen=True)
class Case:
    architecture: str
    input_size: tuple[int, int, int]
    num_classes: int
    passes: int  # ResNet-50 at batch 64 takes seconds a call: few passes keep the run short
    seconds: float


CASES = {
    "wrn16_4": Case("cifar_wrn16_4", (1, 28, 28), 10, passes=5, seconds=4.0),
    "resnet50": Case("resnet50", (3, 224, 224), 1000, passes=2, seconds=2.0),
}


def _realistic_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm scales (timm zero-inits some), so no conv folds to all zeros."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5, generator=generator)


def random_slim_member(case: Case, sparsity: float, multiple: int, seed: int) -> nn.Module:
    """A freshly initialised member with a random ``sparsity`` share of each channel group removed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    member = _member(case)
    _realistic_norms(member, generator)
    graph = ChannelGraph(member, case.input_size)
    scores = {g.root: torch.rand(g.width, generator=generator) for g in graph.groups}
    counts = kept_counts(
        graph.groups, scores, sparsity, full=module_widths(member), multiple=multiple, allocation="uniform"
    )
    graph.remove(choose_channels(scores, counts))
    return member.eval()


def _member(case: Case) -> nn.Module:
    return timm.create_model(
        case.architecture, pretrained=False, num_classes=case.num_classes, in_chans=case.input_size[0]
    )


def ensemble_of(case: Case, members: list[nn.Module]) -> EnsembleModel:
    """An ``EnsembleModel`` whose members are ``members`` (any widths): what the exporter writes."""
    config = EnsembleConfig(
        case.architecture,
        case.num_classes,
        model_args={"in_chans": case.input_size[0]},
        pretrained_cfg={"input_size": list(case.input_size), "mean": [0.5], "std": [0.5]},
        ensemble={"num_members": len(members), "sparsity": 0.0, "distribution": "erk"},
    )
    model = EnsembleModel(config)
    model.members = nn.ModuleList(members)
    return model.eval()


def build_graphs(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Path]:
    torch.manual_seed(100)
    dense = _member(case)
    _realistic_norms(dense, torch.Generator().manual_seed(100))
    slim = [random_slim_member(case, args.sparsity, args.multiple, seed) for seed in range(args.members)]
    widths = [module_widths(m) for m in slim]
    print(f"  slim member 0 widths (first 6 layers): {dict(list(widths[0].items())[:6])}")
    params = {
        "dense": sum(p.numel() for p in dense.parameters()),
        "slim": [sum(p.numel() for p in m.parameters()) for m in slim],
    }
    print(f"  parameters: one dense {params['dense']:,}; slim members {params['slim']}")
    ensemble = f"M={args.members} fp32"
    graphs = {"dense fp32": work / "dense.onnx", f"slim {ensemble}": work / "slim.onnx"}
    export_graph(ensemble_of(case, [dense.eval()]), graphs["dense fp32"])
    export_graph(ensemble_of(case, slim), graphs[f"slim {ensemble}"])
    if args.packed:  # uniform allocation: every member has the same widths, so they pack
        graphs[f"packed {ensemble}"] = work / "packed.onnx"
        export_graph(ensemble_of(case, slim), graphs[f"packed {ensemble}"], packed=True)
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((args.calibration_images, *case.input_size)).astype(np.float32)
    for name in [label.removesuffix(" fp32") for label in graphs]:
        graphs[f"{name} int8"] = work / f"{name.split()[0]}.int8.onnx"
        write_int8_graph(graphs[f"{name} fp32"], graphs[f"{name} int8"], calibration)
    return graphs


def run_case(name: str, case: Case, args: argparse.Namespace, work: Path) -> list[dict]:
    print(f"\n=== {name}: {case.architecture} on {case.input_size}, M={args.members} slim members "
          f"(channel sparsity {args.sparsity}, multiple {args.multiple}) vs ONE dense model")  # fmt: skip
    graphs = build_graphs(case, args, work)
    options = session_options(args.threads)
    sessions = {
        label: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for label, p in graphs.items()
    }
    rows = []
    for batch in args.batch_sizes:
        x = np.random.default_rng(1).standard_normal((batch, *case.input_size)).astype(np.float32)
        engines = {label: (lambda s=s, x=x: s.run(["probs"], {"pixel_values": x})) for label, s in sessions.items()}
        timed = time_engines(engines, case.seconds, case.passes, lambda: None)
        base_median = statistics.median(timed["dense fp32"])
        base_p25 = float(np.percentile(timed["dense fp32"], 25))
        for label, values in timed.items():
            median, p25 = statistics.median(values), float(np.percentile(values, 25))
            rows.append({
                "case": name, "architecture": case.architecture, "batch": batch, "graph": label,
                "ms_median": median * 1e3, "ms_p25": p25 * 1e3, "ratio_median": median / base_median,
                "ratio_p25": p25 / base_p25, "repeats": len(values), **settings(args),
            })  # fmt: skip
    return rows


def settings(args: argparse.Namespace) -> dict:
    """What a row was measured at, besides its case: a rerun skips a case only at the same settings."""
    keys = ("members", "sparsity", "multiple", "threads", "packed", "batch_sizes", "calibration_images")
    return {key: getattr(args, key) for key in keys}


def _same_settings(row: dict, args: argparse.Namespace) -> bool:
    return all(row.get(key) == value for key, value in settings(args).items())


def print_table(rows: list[dict]) -> None:
    """Markdown table; int8 ensemble rows also show their ratio to the dense int8 model (median)."""
    median = {(r["case"], r["batch"], r["graph"]): r["ms_median"] for r in rows}
    print("\n| case | graph | batch | ms (median) | vs ONE dense fp32 (median) | (p25) | vs dense int8 | repeats |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        int8 = median.get((r["case"], r["batch"], "dense int8"))
        ensemble = r["graph"].endswith(" int8") and r["graph"] != "dense int8"
        versus = f"{r['ms_median'] / int8:.2f}x" if ensemble and int8 else ""
        print(f"| {r['case']} | {r['graph']} | {r['batch']} | {r['ms_median']:.2f} | {r['ratio_median']:.2f}x | "
              f"{r['ratio_p25']:.2f}x | {versus} | {r['repeats']} |")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["wrn16_4", "resnet50"])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.5, help="channel sparsity of each member (0.5: half width)")
    parser.add_argument("--multiple", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--packed", action="store_true", help="also the members packed as grouped convolutions")
    parser.add_argument("--output", type=Path, default=Path("runs/bench/slim_latency.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, ORT session.intra_op.allow_spinning=0, "
          f"ORT threads {args.threads}, cpu cores {os.cpu_count()}")  # fmt: skip
    print("load average before (shared cores): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    done = []
    if args.output.is_file():
        done = [json.loads(line) for line in args.output.read_text().splitlines() if line.strip()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        if any(r["case"] == name and _same_settings(r, args) for r in done):
            print(f"{name} at these settings: already in {args.output}, skipped")
            continue
        with tempfile.TemporaryDirectory(prefix="freetickets-slim-") as work:
            rows = run_case(name, CASES[name], args, Path(work))
        with args.output.open("a") as out:  # one case at a time: an interrupted run keeps what it finished
            out.writelines(json.dumps(r) + "\n" for r in rows)
        done += rows
        print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print_table([r for r in done if r["case"] in args.cases and _same_settings(r, args)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
