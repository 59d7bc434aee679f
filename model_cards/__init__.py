"""Model-card templates rendered when an ensemble is saved or pushed."""
