"""Training: the one Accelerate loop (:mod:`.trainer`), pickle-free checkpoints (:mod:`.checkpoint`), and the
set-ups that adapt it to built-in networks (:mod:`.builtin`) and diffusers pipelines (:mod:`.diffusers_setup`).

Submodules are imported on use: ``trainer`` pulls in Accelerate and ``diffusers_setup`` the diffusers extra.
"""

__all__ = ["builtin", "checkpoint", "diffusers_setup", "setup", "trainer"]
