"""Evaluation: sample-quality metrics (:mod:`.metrics`), the feature classifier used for image metrics
(:mod:`.classifier`), the judge that scores samples (:mod:`.judge`), the step sweep (:mod:`.sweep`) and the
report writer (:mod:`.report`)."""

__all__ = ["classifier", "judge", "metrics", "report", "sweep"]
