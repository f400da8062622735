"""Feature classifier: accuracy on the digits, safetensors cache round trip, image metrics."""

import json

import pytest
import torch

import shortcutfm.evaluation.classifier as classifier_module
from shortcutfm.data import ArrayDataset, Normalization, load_dataset
from shortcutfm.evaluation.classifier import (
    ClassifierConfig,
    FeatureClassifier,
    classifier_features,
    image_metrics,
    load_or_train_classifier,
)

QUICK = ClassifierConfig(steps=20)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifier_cache")
    model, accuracy = load_or_train_classifier(digits.train, digits.holdout, cache, seed=0)
    return model, accuracy, cache


def test_digits_accuracy_and_cache_files(trained):
    model, accuracy, cache = trained
    assert model.kind == "mlp" and accuracy > 0.95
    names = sorted(path.name for path in cache.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".safetensors")  # no temp files
    record = json.loads((cache / names[0]).read_text())
    assert record["holdout_accuracy"] == pytest.approx(accuracy) and record["num_classes"] == 10


def test_cache_round_trip_gives_identical_features(trained, digits, monkeypatch):
    model, accuracy, cache = trained

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(classifier_module, "train_classifier", no_training)
    loaded, loaded_accuracy = load_or_train_classifier(digits.train, digits.holdout, cache, seed=0)
    assert loaded is not model and loaded_accuracy == accuracy
    x = digits.holdout.x[:100]
    assert torch.equal(classifier_features(loaded, x), classifier_features(model, x))
    assert torch.equal(loaded(x), model(x))
    assert model.features(x).shape == (100, 64) and model(x).shape == (100, 10)


def test_cache_key_depends_on_seed_data_and_recipe(digits):
    key = classifier_module._cache_key
    base = key(digits.train, QUICK, 0)
    assert base == key(digits.train, QUICK, 0)
    assert base != key(digits.train, QUICK, 1)
    assert base != key(digits.train, ClassifierConfig(steps=21), 0)
    changed = ArrayDataset(digits.train.x.clone(), digits.train.y.clone(), 10, "image", "digits",
                           digits.train.normalization)
    changed.x[0, 0, 0, 0] += 0.5
    assert base != key(changed, QUICK, 0)


def test_training_is_deterministic_and_corrupt_cache_is_replaced(digits, tmp_path):
    first, _ = load_or_train_classifier(digits.train, digits.holdout, tmp_path, seed=3, config=QUICK)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable classifier cache"):
        second, _ = load_or_train_classifier(digits.train, digits.holdout, tmp_path, seed=3, config=QUICK)
    x = digits.holdout.x[:50]
    assert torch.equal(first.features(x), second.features(x))  # retrained from the same seed: same weights
    third, _ = load_or_train_classifier(digits.train, digits.holdout, tmp_path, seed=3, config=QUICK)
    assert torch.equal(third.features(x), first.features(x))


def test_image_metrics(trained, digits):
    model, accuracy, _ = trained
    holdout = digits.holdout
    same = image_metrics(model, holdout.x, holdout.y, holdout)
    assert same.frechet_distance == pytest.approx(0.0, abs=1e-6) and same.accuracy == pytest.approx(accuracy)
    real = image_metrics(model, digits.train.x, None, holdout.x)
    noise = image_metrics(model, torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                          torch.arange(1000) % 10, holdout)
    assert real.accuracy is None
    assert 0 < real.frechet_distance < noise.frechet_distance / 10
    assert noise.accuracy < 0.5


def test_convnet_on_larger_colour_images(tmp_path):
    # Two classes of 3x16x16 images: bright left half vs bright right half, plus noise.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    x = 0.3 * torch.randn(200, 3, 16, 16, generator=generator)
    x[labels == 0, :, :, :8] += 0.7
    x[labels == 1, :, :, 8:] += 0.7
    train = ArrayDataset(x[:160].clamp(-1, 1), labels[:160], 2, "image", "halves", Normalization.identity())
    holdout = ArrayDataset(x[160:].clamp(-1, 1), labels[160:], 2, "image", "halves", Normalization.identity())
    model, accuracy = load_or_train_classifier(train, holdout, tmp_path, config=ClassifierConfig(steps=30, batch_size=32))
    assert isinstance(model, FeatureClassifier) and model.kind == "convnet"
    assert model.features(holdout.x).shape == (40, 64) and accuracy > 0.9


def test_rejects_unlabelled_or_vector_data(tmp_path):
    toys = load_dataset("moons", num_toy_samples=100, num_toy_holdout=50)
    with pytest.raises(ValueError, match="labelled images"):
        load_or_train_classifier(toys.train, toys.holdout, tmp_path)
    with pytest.raises(ValueError, match="classifier.kind"):
        ClassifierConfig(kind="resnet")
