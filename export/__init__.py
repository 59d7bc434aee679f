"""ONNX export of a whole ensemble (installed as ``freetickets_hub.export``)."""
