"""The proving ground's judge: an attribute classifier of the t2i world and the three metrics it gives.

:class:`AttributeClassifier` reads, from a ``(B, 3, 32, 32)`` image in [-1, 1], the background colour and, for
each quadrant, whether an object is there and its shape, colour and size. It is trained on freshly rendered
*training* scenes only and its accuracy is measured per attribute on held-out scenes. Its penultimate features
give Frechet distances (FID analogues; no Inception weights exist offline):

* ``fd_data``: samples against real renders of the same prompts (the floor: two independent renders);
* ``fd_teacher``: samples against the teacher's 32-step samples of the same prompts and noise;
* ``adherence``: the fraction of the prompt's attributes (background; each object's quadrant, shape, colour
  and size) that the classifier reads in the image (a CLIP-score analogue).

Weights are cached as safetensors with a JSON sidecar (never pickle), keyed by the recipe and the world version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic
from ..evaluation.metrics import frechet_distance
from . import world

#: bump when the world's rendering or the classifier's code changes, so stale caches are not reused
JUDGE_VERSION = 1
HEADS = {"background": len(world.BACKGROUNDS), "occupied": 2, "shape": len(world.SHAPES),
         "colour": len(world.COLOURS), "size": len(world.SIZES)}
ATTRIBUTES = ("background", "position", "shape", "colour", "size")


@dataclass(frozen=True)
class JudgeConfig:
    """Recipe of the attribute classifier (about 7 minutes on one CPU thread)."""

    channels: tuple[int, int, int] = (16, 32, 32)
    feature_dim: int = 64
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def scene_labels(scenes: list[world.Scene]) -> torch.Tensor:
    """``(N, 1 + 4 * 4)`` integer targets: background, then per quadrant occupied/shape/colour/size (-1 = none)."""
    rows = []
    for scene in scenes:
        row = [tuple(world.BACKGROUNDS).index(scene.background)]
        for position in world.POSITIONS:
            obj = scene.object_at(position)
            if obj is None:
                row += [0, -1, -1, -1]
            else:
                row += [1, world.SHAPES.index(obj.shape), tuple(world.COLOURS).index(obj.colour),
                        tuple(world.SIZES).index(obj.size)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def to_model_space(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] float tensors (what the classifier and the pipelines' VAEs take)."""
    return torch.as_tensor(np.asarray(images), dtype=torch.float32) * 2 - 1


class AttributeClassifier(nn.Module):
    """A small convnet with one head per attribute; ``features`` (B, feature_dim) feed the Frechet distances."""

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        a, b, c = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, a, 3, padding=1), nn.SiLU(),
            nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU(),
            nn.Conv2d(b, c, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),  # 8x8: keeps where things are
        )
        self.to_features = nn.Sequential(nn.Linear(c * 64, config.feature_dim), nn.SiLU())
        self.background = nn.Linear(config.feature_dim, HEADS["background"])
        self.quadrants = nn.Linear(config.feature_dim, 4 * (HEADS["occupied"] + HEADS["shape"] + HEADS["colour"] + HEADS["size"]))
        self.num_features = config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_features(self.body(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: ``background`` (B, 3) and ``occupied``/``shape``/``colour``/``size`` (B, 4, classes)."""
        features = self.features(x)
        out = {"background": self.background(features)}
        quadrants = self.quadrants(features).view(x.shape[0], 4, -1)
        start = 0
        for name in ("occupied", "shape", "colour", "size"):
            out[name] = quadrants[..., start:start + HEADS[name]]
            start += HEADS[name]
        return out


def _loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(logits["background"], labels[:, 0])
    per_quadrant = labels[:, 1:].view(-1, 4, 4)
    for index, name in enumerate(("occupied", "shape", "colour", "size")):
        target = per_quadrant[..., index].reshape(-1)
        loss = loss + nn.functional.cross_entropy(logits[name].reshape(-1, HEADS[name]), target, ignore_index=-1)
    return loss


def train_judge(config: JudgeConfig = JudgeConfig(), progress: bool = True) -> AttributeClassifier:
    """Train on fresh renders of training scenes (a new batch every step); the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = AttributeClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.05)
    for step in tqdm(range(config.steps), desc="training the t2i judge", disable=not progress):
        scenes = world.random_scenes(config.batch_size, seed=config.seed * 1_000_003 + step, split="train")
        images = to_model_space(world.render_many(scenes, seed=config.seed * 7_919 + step))
        loss = _loss(model(images), scene_labels(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@dataclass
class Reading:
    """What the classifier reads in images: ``background`` (N,), and per quadrant (N, 4) the rest."""

    background: torch.Tensor
    occupied: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor


@torch.no_grad()
def read(model: AttributeClassifier, images: torch.Tensor, batch_size: int = 1024) -> Reading:
    parts = [model(chunk) for chunk in images.split(batch_size)]
    joined = {name: torch.cat([p[name] for p in parts]).argmax(-1) for name in parts[0]}
    return Reading(**joined)


def attribute_hits(reading: Reading, scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Per attribute, a boolean tensor of prompt attributes read correctly (background: one per image; the
    object attributes: one per object of the prompt; position: the object's quadrant is read as occupied)."""
    labels = scene_labels(scenes)
    per_quadrant = labels[:, 1:].view(-1, 4, 4)
    occupied = per_quadrant[..., 0] == 1
    hits = {"background": reading.background == labels[:, 0], "position": reading.occupied[occupied] == 1}
    for index, name in enumerate(("shape", "colour", "size"), start=1):
        hits[name] = getattr(reading, name)[occupied] == per_quadrant[..., index][occupied]
    return hits


def adherence(model: AttributeClassifier, images: torch.Tensor, scenes: list[world.Scene]) -> float:
    """Fraction of all the prompts' attributes read correctly in ``images`` (N, 3, 32, 32) in [-1, 1]."""
    hits = attribute_hits(read(model, images), scenes)
    return float(torch.cat(list(hits.values())).double().mean())


def held_out_accuracy(model: AttributeClassifier, count: int = 2000, seed: int = 99) -> dict[str, float]:
    """Accuracy per attribute on fresh renders of held-out scenes, plus ``empty`` (empty quadrants read empty)."""
    scenes = world.random_scenes(count, seed, split="heldout")
    images = to_model_space(world.render_many(scenes, seed + 1))
    reading = read(model, images)
    accuracy = {name: float(hit.double().mean()) for name, hit in attribute_hits(reading, scenes).items()}
    empty = scene_labels(scenes)[:, 1:].view(-1, 4, 4)[..., 0] == 0
    accuracy["empty"] = float((reading.occupied[empty] == 0).double().mean())
    return accuracy


@torch.no_grad()
def features(model: AttributeClassifier, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model.features(chunk) for chunk in images.split(batch_size)])


def fd(model: AttributeClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between the classifier features of two image sets (N, 3, 32, 32) in [-1, 1]."""
    return frechet_distance(features(model, images), features(model, reference))


def _key(config: JudgeConfig) -> str:
    spec = {"version": JUDGE_VERSION, "config": asdict(config), "world": world.vocabulary(), "size": world.IMAGE_SIZE}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_judge(cache_dir: str | Path, config: JudgeConfig = JudgeConfig(),
                        progress: bool = True) -> tuple[AttributeClassifier, dict[str, float]]:
    """The judge from ``cache_dir`` (``t2i-judge-<key>.safetensors`` + ``.json``) or trained and cached there.
    Returns the model and its held-out accuracy per attribute (measured when trained, stored in the sidecar)."""
    cache_dir = Path(cache_dir)
    weights = cache_dir / f"t2i-judge-{_key(config)}.safetensors"
    sidecar = weights.with_suffix(".json")
    if weights.is_file() and sidecar.is_file():
        try:
            model = AttributeClassifier(config)
            model.load_state_dict(load_file(weights))
            return model.eval().requires_grad_(False), json.loads(sidecar.read_text())["held_out_accuracy"]
        except (OSError, RuntimeError, ValueError, KeyError):
            pass  # unreadable or stale: train again
    model = train_judge(config, progress=progress)
    accuracy = held_out_accuracy(model)
    with atomic_path(weights, what="judge cache") as temporary:  # a reader never sees half a file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temporary))
    write_json_atomic(sidecar, {"config": asdict(config), "held_out_accuracy": accuracy}, what="judge cache")
    return model, accuracy
