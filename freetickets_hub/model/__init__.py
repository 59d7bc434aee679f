"""The torch ensemble: ``EnsembleModel``, the registered architectures, merging runs and the model card."""
