"""Inference engines that run a saved ensemble: ONNX Runtime, OpenVINO and the torch ``EnsembleModel``."""
