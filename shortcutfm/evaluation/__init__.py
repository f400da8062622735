"""Evaluation: sample-quality metrics (:mod:`.metrics`), the feature classifier used for image metrics
(:mod:`.classifier`), the judge that scores samples (:mod:`.judge`), the step sweep (:mod:`.sweep`), the
report writer (:mod:`.report`), and a LoRA's evaluation: FID / CLIP score (:mod:`.lora_eval`), and the whole
``shortcutfm eval`` of a LoRA run (:mod:`.lora_run`)."""

__all__ = ["classifier", "judge", "lora_eval", "lora_run", "metrics", "report", "sweep"]
