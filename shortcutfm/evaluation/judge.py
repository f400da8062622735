"""How sample quality is measured for a data set: the metrics, the reference data and the fixed noise.

* vectors: unbiased energy distance (primary) and sliced Wasserstein-2 against held-out data;
* labelled images: Frechet distance in the penultimate features of a small classifier trained on the training
  split (primary), and that classifier's accuracy on class-conditional samples;
* unlabelled images: energy distance and sliced Wasserstein-2 on pixels.
Every model and step count is sampled from the *same* noise and labels (drawn from ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.samplers import sample
from ..core.velocity import VelocityModel
from ..data import ArrayDataset
from . import classifier as feature_classifier
from .metrics import EnergyReference, frechet_distance, sliced_wasserstein2


@dataclass
class SampleSet:
    """Fixed noise and labels for evaluation: the same for every model, sampler and step count."""

    noise: torch.Tensor  # (N, *sample_shape)
    labels: torch.Tensor | None  # (N,) or None

    @classmethod
    def draw(cls, reference: ArrayDataset, num_samples: int, seed: int) -> "SampleSet":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_samples, *reference.sample_shape), generator=generator)
        labels = None
        if reference.num_classes:
            labels = torch.arange(num_samples) % reference.num_classes  # balanced classes
        return cls(noise=noise, labels=labels)

    def cond(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        if self.labels is None:
            return {}
        return {"y": self.labels if rows is None else self.labels[rows]}


@torch.no_grad()
def generate(
    velocity: VelocityModel, samples: SampleSet, grid: torch.Tensor, method: str = "euler", chunk: int = 4096
) -> tuple[torch.Tensor, int]:
    """Sample every noise row of ``samples`` along ``grid``; returns (samples, nfe per sample)."""
    outputs, nfe = [], 0
    for start in range(0, samples.noise.shape[0], chunk):
        rows = slice(start, start + chunk)
        result = sample(velocity, samples.noise[rows], grid, method, **samples.cond(rows))
        outputs.append(result.x)
        nfe = result.nfe
    return torch.cat(outputs), nfe


@dataclass
class Judge:
    """Scores model-space samples against held-out data. ``primary`` is the metric that selects checkpoints."""

    reference: ArrayDataset
    primary: str
    classifier: torch.nn.Module | None = None
    classifier_accuracy: float | None = None
    seed: int = 0
    _reference_features: torch.Tensor | None = field(default=None, repr=False)
    _energy_reference: EnergyReference | None = field(default=None, repr=False)

    @classmethod
    def for_data(cls, train: ArrayDataset, holdout: ArrayDataset, cache_dir: Path, seed: int = 0) -> "Judge":
        if holdout.kind == "image" and holdout.num_classes:
            classifier, accuracy = feature_classifier.load_or_train_classifier(train, holdout, cache_dir, seed=seed)
            return cls(holdout, "frechet_distance", classifier, accuracy, seed)
        return cls(holdout, "energy_distance", seed=seed)

    def score(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, primary_only: bool = False) -> dict[str, float]:
        """Metrics of samples ``x`` (model space) against the held-out reference; lower is better except accuracy."""
        if self.classifier is not None:
            if self._reference_features is None:
                self._reference_features = feature_classifier.classifier_features(self.classifier, self.reference.x)
            features = feature_classifier.classifier_features(self.classifier, x)
            scores = {"frechet_distance": frechet_distance(features, self._reference_features)}
            if not primary_only and labels is not None:
                scores["classifier_accuracy"] = feature_classifier.classifier_accuracy(self.classifier, x, labels)
            return scores
        flat, ref = x.flatten(1), self.reference.x.flatten(1)
        if self._energy_reference is None:
            self._energy_reference = EnergyReference(ref)
        scores = {"energy_distance": self._energy_reference(flat)}
        if not primary_only:
            generator = torch.Generator().manual_seed(self.seed)
            scores["sliced_wasserstein2"] = sliced_wasserstein2(flat, ref, generator=generator)
        return scores

    def floor(self, train: ArrayDataset) -> dict[str, float]:
        """Data-against-data value of the metrics: training samples scored against the held-out ones."""
        count = min(len(train), max(len(self.reference), 2000))
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))[:count]
        labels = train.y[rows] if train.y is not None else None
        return self.score(train.x[rows], labels)
