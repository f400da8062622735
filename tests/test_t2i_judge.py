"""The proving ground's judge: its accuracy floor, determinism, and metrics that move the right way."""

import numpy as np
import pytest
import torch

from shortcutfm.t2i import judge as judging
from shortcutfm.t2i import world
from shortcutfm.t2i.evaluate import BUNDLED_JUDGE, world_judge

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    model, _ = world_judge(tmp_path_factory.mktemp("cache"), progress=False)
    return model


def test_bundled_judge_is_todays_recipe():
    key = judging._key(judging.JudgeConfig())
    assert (BUNDLED_JUDGE / f"t2i-judge-{key}.safetensors").is_file(), "re-bundle the judge: its recipe changed"


def test_accuracy_floor_on_fresh_held_out_renders(bundled):
    accuracy = judging.held_out_accuracy(bundled, count=600, seed=2024)
    assert set(accuracy) == {"background", "position", "shape", "colour", "size", "empty"}
    for attribute, value in accuracy.items():
        assert value >= 0.98, (attribute, value)


def test_adherence_is_high_for_the_right_prompts_and_low_for_wrong_ones(bundled):
    scenes = world.random_scenes(300, 5, "heldout")
    images = judging.to_model_space(world.render_many(scenes, 6))
    assert judging.adherence(bundled, images, scenes) > 0.98
    shuffled = scenes[1:] + scenes[:1]
    assert judging.adherence(bundled, images, shuffled) < 0.6


def test_frechet_distance_separates_worlds(bundled):
    scenes = world.random_scenes(400, 7, "heldout")
    a = judging.to_model_space(world.render_many(scenes, 8))
    b = judging.to_model_space(world.render_many(scenes, 9))
    swapped = [world.Scene("white" if s.background == "black" else "black", s.objects) for s in scenes]
    c = judging.to_model_space(world.render_many(swapped, 8))
    floor = judging.fd(bundled, a, b)
    assert floor < 0.2 * judging.fd(bundled, a, c)
    assert judging.fd(bundled, a, a) == pytest.approx(0.0, abs=1e-3)


def test_attribute_hits_count_each_prompt_attribute_exactly():
    scene = world.Scene("gray", (world.WorldObject("top left", "circle", "red", "small"),
                                 world.WorldObject("bottom right", "square", "blue", "large")))
    truth = judging.scene_labels([scene])[0]
    per_quadrant = truth[1:].view(4, 4)
    reading = judging.Reading(
        background=torch.tensor([truth[0]]), occupied=per_quadrant[:, 0].clamp(min=0)[None].clone(),
        shape=per_quadrant[:, 1].clamp(min=0)[None].clone(), colour=per_quadrant[:, 2].clamp(min=0)[None].clone(),
        size=per_quadrant[:, 3].clamp(min=0)[None].clone(),
    )
    hits = judging.attribute_hits(reading, [scene])
    assert all(bool(h.all()) for h in hits.values()) and sum(h.numel() for h in hits.values()) == 1 + 4 * 2
    reading.colour[0, 0] = (reading.colour[0, 0] + 1) % len(world.COLOURS)  # the red circle read as another colour
    reading.occupied[0, 3] = 0  # the square's quadrant read empty
    hits = judging.attribute_hits(reading, [scene])
    assert hits["colour"].tolist() == [False, True] and hits["position"].tolist() == [True, False]
    assert float(torch.cat(list(hits.values())).double().mean()) == pytest.approx(7 / 9)


def test_training_is_seeded_and_caching_round_trips(tmp_path):
    config = judging.JudgeConfig(channels=(4, 4, 4), feature_dim=8, steps=3, batch_size=8)
    a = judging.train_judge(config, progress=False)
    b = judging.train_judge(config, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    cached, accuracy = judging.load_or_train_judge(tmp_path, config, progress=False)
    again, accuracy_again = judging.load_or_train_judge(tmp_path, config, progress=False)
    assert accuracy == accuracy_again
    for (name, x), (_, y) in zip(cached.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), name
    assert not list(tmp_path.glob("*.tmp"))


def test_scene_labels_mark_empty_quadrants():
    scene = world.Scene("white", (world.WorldObject("top right", "triangle", "yellow", "large"),))
    labels = judging.scene_labels([scene])[0].tolist()
    assert labels[0] == list(world.BACKGROUNDS).index("white")
    assert labels[1:5] == [0, -1, -1, -1]  # top left: empty
    assert labels[5:9] == [1, world.SHAPES.index("triangle"), list(world.COLOURS).index("yellow"), 1]
    assert np.all(np.array(labels[9:]).reshape(2, 4)[:, 0] == 0)
