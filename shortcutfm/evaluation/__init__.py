"""Evaluation: sample-quality metrics and the feature classifier used for image metrics."""
