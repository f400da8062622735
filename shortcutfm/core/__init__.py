"""Pure-torch SCFM core: grids, jump sampling, targets, EMA and samplers (no diffusers/peft/accelerate)."""

from .calibration import CalibratedVelocity, StepCalibration, WeightInterpolation, calibrate, for_steps
from .ema import EMA, EMASchedule, StudentEMAs
from .grids import dynamic_shift_mu, dynamic_shift_sigma, shift_sigma, sigma_grid, uniform_grid
from .guidance import ClassifierFreeGuidance, null_label_uncond
from .jumps import FLOW, SELF, TEACHER, JumpBatch, JumpSampling, sample_jumps
from .samplers import SampleResult, euler_sample, heun_sample, sample
from .targets import LossResult, TargetBatch, TargetVelocities, scfm_loss, scfm_targets
from .velocity import VelocityModel, interpolate

__all__ = [
    "CalibratedVelocity", "StepCalibration", "WeightInterpolation", "calibrate", "for_steps",
    "EMA", "EMASchedule", "StudentEMAs",
    "dynamic_shift_mu", "dynamic_shift_sigma", "shift_sigma", "sigma_grid", "uniform_grid",
    "ClassifierFreeGuidance", "null_label_uncond",
    "FLOW", "SELF", "TEACHER", "JumpBatch", "JumpSampling", "sample_jumps",
    "SampleResult", "euler_sample", "heun_sample", "sample",
    "LossResult", "TargetBatch", "TargetVelocities", "scfm_loss", "scfm_targets",
    "VelocityModel", "interpolate",
]
