"""The text-to-image proving ground (docs/proving_ground.md): a procedural captioned world (:mod:`.world`), its
attribute judge (:mod:`.judge`), a real SD3 pipeline trained on it (:mod:`.pipeline`), evaluation
(:mod:`.evaluate`) and the demo (:mod:`.demo`). Submodules are imported on use (they need the diffusers extra)."""

__all__ = ["demo", "evaluate", "judge", "pipeline", "world"]
