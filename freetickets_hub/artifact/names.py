"""Every name of the artifact format, in one place: file names, graph variants, metadata keys.

The writers (``save_pretrained``, ``export onnx``, ``evaluate``) and every reader (the engines,
the card, the Hub resolver, serving) import these, so a name is spelt once.
"""

from __future__ import annotations

__all__ = [
    "ASSETS_DIR",
    "CONFIG_NAME",
    "EVAL_RESULTS_NAME",
    "EXPORT_REPORT_NAME",
    "HANDLER_NAME",
    "INPUT_NAME",
    "LIBRARY_NAME",
    "METADATA_NUM_MEMBERS",
    "METADATA_TEMPERATURE",
    "ONNX_DATA_NAME",
    "ONNX_DIR",
    "ONNX_INT8_NAME",
    "ONNX_NAME",
    "ONNX_VARIANTS",
    "OUTPUT_NAMES",
    "PICKLE_SUFFIXES",
    "README_NAME",
    "REQUIREMENTS_NAME",
    "SUMMARY_NAME",
    "WEIGHTS_NAME",
]

LIBRARY_NAME = "freetickets-hub"  # library_name on Hub downloads and in the card
# the files of a saved ensemble (DESIGN.md, "The Hub artifact")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
HANDLER_NAME = "handler.py"
REQUIREMENTS_NAME = "requirements.txt"
SUMMARY_NAME = "train_summary.json"  # written by `freetickets train`
EVAL_RESULTS_NAME = "eval_results.json"  # beside config.json, written by `freetickets evaluate`; the card reads it
ASSETS_DIR = "assets"
# the exported graphs
ONNX_DIR = "onnx"
ONNX_NAME = f"{ONNX_DIR}/model.onnx"
ONNX_DATA_NAME = ONNX_NAME + ".data"  # the external weights of a graph over 1.5 GiB (torch's threshold)
ONNX_INT8_NAME = f"{ONNX_DIR}/model.int8.onnx"  # the statically quantized graph (`export onnx --quantize int8`)
ONNX_VARIANTS = {"fp32": ONNX_NAME, "int8": ONNX_INT8_NAME}  # `variant=` of from_pretrained -> graph file
EXPORT_REPORT_NAME = f"{ONNX_DIR}/export_report.json"  # the export's check against PyTorch
INPUT_NAME = "pixel_values"  # the graph's one input
# the graph's outputs, in order (DESIGN.md, "Runtime outputs"); member_probs is (M, B, K), the others batch-first
OUTPUT_NAMES = (
    "logits",
    "probs",
    "member_probs",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "disagreement",
)
# model metadata written by the exporter, checked against config.json so a stale graph is caught
METADATA_TEMPERATURE = "freetickets.temperature"
METADATA_NUM_MEMBERS = "freetickets.num_members"
# never published, whatever folder they turn up in: they can execute code when loaded
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pkl", ".pickle", ".pt", ".pth", ".npy", ".npz")
