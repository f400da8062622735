"""The t2i world: determinism, captions that agree with the scene, a held-out split training never sees."""

import numpy as np
import pytest

from shortcutfm.t2i import world


def test_same_seed_same_world_other_seed_other_world():
    a = world.render_many(world.random_scenes(16, 3), seed=5)
    b = world.render_many(world.random_scenes(16, 3), seed=5)
    c = world.render_many(world.random_scenes(16, 4), seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert world.captions_for(world.random_scenes(16, 3), 1) == world.captions_for(world.random_scenes(16, 3), 1)


def test_images_are_rgb_32_in_unit_range_with_one_or_two_objects():
    scenes = world.random_scenes(200, 0, split="all")
    images = world.render_many(scenes, 0)
    assert images.shape == (200, 3, 32, 32) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}


@pytest.mark.parametrize("template", range(len(world.TEMPLATES)))
def test_every_caption_template_parses_back_to_its_scene(template):
    for scene in world.random_scenes(300, 11, split="all"):
        text = world.caption(scene, template)
        assert world.parse_caption(text) == scene
        for obj in scene.objects:  # every attribute is in the words
            assert obj.shape in text and obj.colour in text and obj.size in text and obj.position in text
        assert f"{scene.background} background" in text


def test_pixels_agree_with_the_caption():
    """The background colour is in the corners; each object's colour fills pixels of its quadrant only."""
    scenes = world.random_scenes(100, 2, split="all")
    images = world.render_many(scenes, 3)

    def pixels_of(image, position, colour):
        row, col = divmod(world.POSITIONS.index(position), 2)
        quadrant = image[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
        return (np.abs(quadrant - np.array(colour)[:, None, None]).max(axis=0) < 0.02).sum()

    for scene, image in zip(scenes, images):
        assert np.allclose(image[:, 0, 0], world.BACKGROUNDS[scene.background], atol=1e-5)
        for obj in scene.objects:
            assert pixels_of(image, obj.position, world.COLOURS[obj.colour]) >= 9, scene
        for position in set(world.POSITIONS) - {o.position for o in scene.objects}:
            assert pixels_of(image, position, world.BACKGROUNDS[scene.background]) == 256, scene


def test_small_objects_cover_less_than_large_ones():
    def covered(size):
        scene = world.Scene("black", (world.WorldObject("top left", "square", "red", size),))
        return (world.render(scene, np.random.default_rng(0))[0] > 0.3).sum()

    assert covered("small") * 2 < covered("large")


def test_held_out_scenes_are_a_tenth_and_never_drawn_for_training():
    everything = world.random_scenes(5000, 0, split="all")
    share = np.mean([world.is_held_out(s) for s in everything])
    assert 0.07 < share < 0.13
    train = {s.key() for s in world.random_scenes(3000, 1, split="train")}
    held = {s.key() for s in world.random_scenes(300, 2, split="heldout")}
    assert not train & held
    assert all(world.is_held_out(world.parse_caption(t)) for t in world.captions_for(world.random_scenes(50, 3, "heldout"), 0))


def test_bad_captions_and_scenes_are_refused():
    with pytest.raises(ValueError, match="does not describe"):
        world.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="share a quadrant"):
        world.Scene("black", (world.WorldObject("top left", "circle", "red", "small"),
                              world.WorldObject("top left", "square", "blue", "large")))
    with pytest.raises(ValueError, match="colour"):
        world.WorldObject("top left", "circle", "purple", "small")


def test_image_folder_is_what_prepare_reads(tmp_path):
    from shortcutfm.preparation.inputs import list_image_captions

    texts = world.write_image_folder(tmp_path, world.random_scenes(5, 0), seed=0)
    items = list_image_captions(tmp_path)
    assert [item.caption for item in items] == texts
