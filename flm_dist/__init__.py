"""flm_dist: distributed Pretraining-FLM for recommendation on Ray."""

__version__ = "0.1.0"
