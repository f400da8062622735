"""The recipe defaults that depend on the diffusers model family, in one place.

Config resolution layers them (``load_config``): dataclass defaults < these < the YAML file < command-line
overrides, so a hand-written Flux config gets Flux's dynamic shift and clipping without copying the preset. The
family objects (:mod:`shortcutfm.models.diffusers.families`) read their shifts and guidance scales from here too.
Pure Python: :mod:`shortcutfm.config` imports it without diffusers.

Sources (docs/method.md): the authors' Flux and SD3 scripts (per-sample shift in [2.5, 4.5], 10% of samples at the
family's own sampling shift; gradient clipping 10 for Flux, 2 for SD3); Lumina-Image 2.0's scheduler shift 6 and
its pipeline's guidance 4 (w = 3); FLUX.2 [klein] base's guidance 4 (w = 3) and its own step- and size-dependent
shift ("dynamic"); Qwen-Image's pipeline true_cfg_scale 4 (w = 3) and the fixed shift 3 of its
widely used few-step LoRAs (Qwen-Image-Lightning); Wan 2.1's guidance 5 (w = 4) and its 480p flow shift 3.
"""

from __future__ import annotations

import copy

FAMILY_DEFAULTS: dict[str, dict[str, dict]] = {
    "flux": {
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": "dynamic"},
        "optim": {"grad_clip": 10.0},
        "eval": {"select_shift": "dynamic"},
    },
    "sd3": {
        "model": {"guidance_scale": 3.5},
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": 3.0},
        "optim": {"grad_clip": 2.0},
        "eval": {"select_shift": 3.0},
    },
    "lumina2": {
        "model": {"guidance_scale": 3.0},
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": 6.0},
        "optim": {"grad_clip": 2.0},
        "eval": {"select_shift": 6.0},
    },
    "flux2": {
        "model": {"guidance_scale": 3.0},
        # alt_shift: FLUX.2's own shift of a 4-step sampler at 1024^2, exp(compute_empirical_mu(4096, 4))
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": 9.89},
        "optim": {"grad_clip": 2.0},
        "eval": {"select_shift": "dynamic"},
    },
    "qwen_image": {
        "model": {"guidance_scale": 3.0},
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": 3.0},
        "optim": {"grad_clip": 2.0},
        "eval": {"select_shift": 3.0},
    },
    "wan": {
        "model": {"guidance_scale": 4.0},
        "jumps": {"shift_range": [2.5, 4.5], "alt_shift_prob": 0.1, "alt_shift": 3.0},
        "optim": {"grad_clip": 2.0},
        "eval": {"select_shift": 3.0},
    },
}

DIFFUSERS_KINDS = tuple(FAMILY_DEFAULTS)


def family_defaults(kind: str) -> dict[str, dict]:
    """A copy of the family's config defaults ({} for the built-in networks)."""
    return copy.deepcopy(FAMILY_DEFAULTS.get(kind, {}))


def sampling_shift(kind: str) -> float | str:
    """The family's sampling shift (a number or "dynamic"): what ``eval.select_shift`` defaults to."""
    return FAMILY_DEFAULTS[kind]["eval"]["select_shift"]


def guidance_scale(kind: str) -> float | None:
    """The family's classifier-free guidance weight w (None: the family has no real CFG)."""
    return FAMILY_DEFAULTS[kind].get("model", {}).get("guidance_scale")


def jump_shifts(kind: str) -> tuple[tuple[float, float], float | str]:
    """The family's per-sample shift range and alternative shift."""
    jumps = FAMILY_DEFAULTS[kind]["jumps"]
    return tuple(jumps["shift_range"]), jumps["alt_shift"]
