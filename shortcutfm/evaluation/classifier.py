"""A small image classifier whose penultimate features give a Frechet distance for labelled image data.

No wheel ships pretrained Inception weights, so offline FID-style scores use a small
network trained on the training split itself: an MLP for tiny images (up to 256 values, e.g. the 8x8 digits),
a convnet for larger ones. It works on model-space images ``(B, C, H, W)`` in [-1, 1] (what the samplers
return), for any number of channels and sizes from 8x8 to about 32x32.

:func:`load_or_train_classifier` caches the trained weights as safetensors plus a JSON sidecar (never pickle),
keyed by a hash of the training data, the architecture, the training recipe and the seed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_json_atomic
from ..data import ArrayDataset
from .metrics import frechet_distance

#: Bump when the architecture or training code changes, so old cache entries are not reused.
CACHE_VERSION = 1

#: ``kind="auto"`` uses the MLP for images of at most this many values (C * H * W), the convnet above.
AUTO_MLP_MAX_VALUES = 256
CLASSIFIER_KINDS = ("auto", "mlp", "convnet")


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training recipe of the feature classifier (defaults: ~99% on the 8x8 digits in a few seconds on one CPU thread)."""

    kind: str = "auto"
    """"mlp", "convnet", or "auto": the MLP up to AUTO_MLP_MAX_VALUES values per image, else the convnet."""
    hidden: int = 256
    """MLP: width of the hidden layer before the feature layer."""
    channels: tuple[int, int] = (16, 32)
    """Convnet widths: one conv at full resolution, then a stride-2 conv and a conv at half resolution."""
    feature_dim: int = 64
    """Width of the penultimate layer, i.e. of :meth:`FeatureClassifier.features`."""
    steps: int = 400
    """AdamW steps; minibatches walk through fresh random permutations of the training split."""
    batch_size: int = 128
    lr: float = 3e-3
    """Peak learning rate, decayed to 0 by a cosine."""
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.kind not in CLASSIFIER_KINDS:
            raise ValueError(f"classifier.kind must be one of {CLASSIFIER_KINDS}, got {self.kind!r}")
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ValueError(f"classifier.channels must be two positive widths, got {self.channels}")
        for name in ("hidden", "feature_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"classifier.lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class FeatureClassifier(nn.Module):
    """Image classifier; ``forward`` gives logits (B, num_classes), ``features`` (B, feature_dim).

    Input: model-space images (B, C, H, W) of ``sample_shape = (C, H, W)``. The convnet ends with an adaptive
    average pool to 4x4, so its head does not depend on the image size.
    """

    def __init__(self, sample_shape: tuple[int, int, int], num_classes: int, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        channels, height, width = sample_shape
        self.kind = config.kind
        if self.kind == "auto":
            self.kind = "mlp" if channels * height * width <= AUTO_MLP_MAX_VALUES else "convnet"
        if self.kind == "mlp":
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, config.hidden), nn.SiLU())
            body_width = config.hidden
        else:
            wide, wider = config.channels
            self.body = nn.Sequential(
                nn.Conv2d(channels, wide, 3, padding=1), nn.SiLU(),
                nn.Conv2d(wide, wider, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(wider, wider, 3, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            )
            body_width = wider * 16
        feature_dim = config.feature_dim
        self.to_features = nn.Sequential(nn.Linear(body_width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim  # the attribute torchmetrics' FID looks for on a feature extractor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, C, H, W)."""
        return self.to_features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check_data(train: ArrayDataset, holdout: ArrayDataset) -> None:
    if train.kind != "image" or train.y is None:
        raise ValueError(f"the feature classifier needs labelled images; data set {train.name!r} is "
                         f"{'unlabelled ' if train.y is None else ''}{train.kind} data")
    if holdout.sample_shape != train.sample_shape or holdout.y is None:
        raise ValueError(f"holdout must be labelled images of shape {train.sample_shape}, got {holdout.sample_shape}")


def _cache_key(train: ArrayDataset, config: ClassifierConfig, seed: int) -> str:
    digest = hashlib.sha256()
    spec = {"version": CACHE_VERSION, "config": asdict(config), "seed": seed, "num_classes": train.num_classes,
            "shape": list(train.x.shape)}
    digest.update(json.dumps(spec, sort_keys=True).encode())
    digest.update(train.x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(train.y.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_classifier(train: ArrayDataset, config: ClassifierConfig = ClassifierConfig(), seed: int = 0) -> FeatureClassifier:
    """Train on ``train`` (model-space images and labels); deterministic given ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(train.sample_shape, train.num_classes, config)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    order, position = torch.randperm(len(train), generator=generator), 0
    model.train()
    for _ in range(config.steps):
        if position + config.batch_size > len(order):
            order, position = torch.randperm(len(train), generator=generator), 0
        rows = order[position:position + config.batch_size]
        position += config.batch_size
        loss = nn.functional.cross_entropy(model(train.x[rows]), train.y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_features(classifier: FeatureClassifier, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Features (N, feature_dim) of model-space images (N, C, H, W), in batches, on the classifier's device."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(part.to(device)) for part in x.split(batch_size)])


@torch.no_grad()
def classifier_accuracy(classifier: FeatureClassifier, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 2048) -> float:
    """Fraction of images (N, C, H, W) whose argmax logit equals ``labels`` (N,)."""
    device = next(classifier.parameters()).device
    predicted = torch.cat([classifier(part.to(device)).argmax(dim=-1).cpu() for part in x.split(batch_size)])
    return float((predicted == labels.cpu()).double().mean())


def _load_cached(weights: Path, sidecar: Path, key: str, train: ArrayDataset, config: ClassifierConfig):
    if not (weights.is_file() and sidecar.is_file()):
        return None
    try:
        if json.loads(sidecar.read_text()).get("key") != key:
            return None
        model = FeatureClassifier(train.sample_shape, train.num_classes, config)
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:  # corrupt or stale: train again
        warnings.warn(f"ignoring unreadable classifier cache {weights} ({err}); training a new one", stacklevel=3)
        return None
    return model.eval().requires_grad_(False)


def load_or_train_classifier(
    train: ArrayDataset,
    holdout: ArrayDataset,
    cache_dir: str | Path,
    seed: int = 0,
    config: ClassifierConfig = ClassifierConfig(),
) -> tuple[FeatureClassifier, float]:
    """The feature classifier of ``train``, from ``cache_dir`` or freshly trained (and then cached).

    Returns ``(classifier, accuracy)`` where ``accuracy`` is measured on ``holdout`` on every call. Files:
    ``classifier-<hash>.safetensors`` (weights) and ``classifier-<hash>.json`` (key, recipe, accuracy), each
    written to a temporary file and moved into place, so readers never see a partial file.
    """
    _check_data(train, holdout)
    key = _cache_key(train, config, seed)
    cache_dir = Path(cache_dir)
    weights = cache_dir / f"classifier-{key[:16]}.safetensors"
    sidecar = weights.with_suffix(".json")
    model = _load_cached(weights, sidecar, key, train, config)
    if model is None:
        model = train_classifier(train, config, seed)
        cache_dir.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        with atomic_path(weights, what="classifier cache") as temporary:
            save_file(state, str(temporary), metadata={"key": key})
        accuracy = classifier_accuracy(model, holdout.x, holdout.y)
        record = {"key": key, "data": train.name, "num_train": len(train), "sample_shape": list(train.sample_shape),
                  "num_classes": train.num_classes, "seed": seed, "config": asdict(config),
                  "holdout_accuracy": accuracy, "cache_version": CACHE_VERSION}
        write_json_atomic(sidecar, record, what="classifier cache")
        return model, accuracy
    return model, classifier_accuracy(model, holdout.x, holdout.y)


@dataclass
class ImageMetrics:
    """Scores of model-space image samples; lower Frechet distance is better, higher accuracy is better."""

    frechet_distance: float
    """Frechet distance between classifier features of the samples and of the reference images."""
    accuracy: float | None
    """Share of class-conditional samples classified as their label (None for unconditional samples)."""


def image_metrics(
    classifier: FeatureClassifier,
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    reference: torch.Tensor | ArrayDataset,
    *,
    batch_size: int = 2048,
) -> ImageMetrics:
    """Frechet distance (classifier features) of ``samples`` (N, C, H, W) against ``reference`` images, and the
    classifier's accuracy on the samples given their conditioning ``labels`` (N,). All in model space."""
    reference_x = reference.x if isinstance(reference, ArrayDataset) else reference
    distance = frechet_distance(
        classifier_features(classifier, samples, batch_size), classifier_features(classifier, reference_x, batch_size)
    )
    accuracy = None if labels is None else classifier_accuracy(classifier, samples, labels, batch_size)
    return ImageMetrics(frechet_distance=distance, accuracy=accuracy)
