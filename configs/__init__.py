"""Experiment configs (ml_collections), loaded by path with `--config configs/<name>.py`."""
