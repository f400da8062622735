"""shortcutfm: few-step samplers from pretrained flow-matching models with SCFM (velocity self-distillation).

Time convention everywhere: ``sigma`` in [0, 1], 1 = noise, 0 = data; ``x_sigma = (1 - sigma) x0 + sigma noise``.
The velocity contract: ``v = model(x, sigma, **cond)``.
"""

from .config import Config, ConfigError, load_config, save_config
from .core import (
    EMA,
    ClassifierFreeGuidance,
    EMASchedule,
    JumpSampling,
    StudentEMAs,
    TargetVelocities,
    euler_sample,
    heun_sample,
    sample,
    sample_jumps,
    scfm_loss,
    scfm_targets,
    sigma_grid,
)
from .data import DataError, load_dataset
from .models import FullStudent, load_model

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "load_config", "save_config",
    "EMA", "ClassifierFreeGuidance", "EMASchedule", "JumpSampling", "StudentEMAs", "TargetVelocities",
    "euler_sample", "heun_sample", "sample", "sample_jumps", "scfm_loss", "scfm_targets", "sigma_grid",
    "DataError", "load_dataset", "FullStudent", "load_model",
]
