"""What an ensemble's outputs mean: the uncertainty outputs, calibration, selective prediction and metrics."""
