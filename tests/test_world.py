import random

import numpy as np
import pytest

from core import world
from core.backbones import load_backbone


def decode(image) -> dict:
    """Read a plain-background scene's attributes back from its pixels."""
    pixels = np.asarray(image).astype(int)
    colour = None
    for name, rgb in world.COLOURS.items():
        if (np.abs(pixels - rgb).sum(axis=2) == 0).sum() > 10:
            colour = name
    mask = np.abs(pixels - world.COLOURS[colour]).sum(axis=2) == 0
    columns = mask.any(axis=0).astype(int)
    runs = int(((columns[1:] - columns[:-1]) == 1).sum() + columns[0])
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / world.IMAGE_SIZE, ys.mean() / world.IMAGE_SIZE
    position = min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] - cx) ** 2 + (world.POSITIONS[p][1] - cy) ** 2)
    width = columns.sum() / world.IMAGE_SIZE / runs          # one object's width
    return {"colour": colour, "count": runs, "position": position, "size": "large" if width > 0.3 else "small"}


def test_generator_is_deterministic():
    a = [(s, world.captions(s, rng)) for s, rng in world.scenes("base", 20, seed=3)]
    b = [(s, world.captions(s, rng)) for s, rng in world.scenes("base", 20, seed=3)]
    c = [s for s, _ in world.scenes("base", 20, seed=4)]
    assert a == b and [s for s, _ in a] != c
    assert np.array_equal(np.asarray(world.draw_scene(a[0][0])), np.asarray(world.draw_scene(b[0][0])))


def test_captions_and_answers_match_the_pixels():
    rng = random.Random(0)
    checked = 0
    while checked < 40:
        scene = world.sample_scene("base", rng)
        if scene.texture != "plain" or scene.shape == "ring" or (scene.count > 1 and scene.size == "large"):
            continue   # textures and rings share pixels with the background; large groups may touch
        seen = decode(world.draw_scene(scene))
        expected = {"colour": scene.colour, "count": scene.count, "size": scene.size,
                    "position": scene.position if scene.count == 1 else "centre"}
        assert seen == expected, (scene, seen)
        for caption in world.captions(scene, rng, n=2):
            assert scene.colour in caption and scene.shape in caption and scene.size in caption
        answers = dict(world.questions(scene))
        assert answers["what colour is the shape?"] == scene.colour
        assert answers["how many shapes are there?"] == str(scene.count)
        checked += 1


def test_novel_parts_are_disjoint_from_the_base():
    base = [s for s, _ in world.scenes("base", 500, seed=0)]
    assert {s.colour for s in base} <= set(world.BASE_COLOURS)
    assert not {(s.colour, s.shape) for s in base} & set(world.HELD_OUT_PAIRS)
    assert {s.texture for s in base} == set(world.BASE_TEXTURES)
    assert {s.colour for s, _ in world.scenes("novel-colours", 200, 0)} == set(world.NOVEL_COLOURS)
    assert {(s.colour, s.shape) for s, _ in world.scenes("novel-compositions", 200, 0)} == set(world.HELD_OUT_PAIRS)
    assert {s.texture for s, _ in world.scenes("novel-textures", 50, 0)} == set(world.NOVEL_TEXTURES)
    with pytest.raises(ValueError, match="unknown world part 'novel-sounds'"):
        world.sample_scene("novel-sounds", random.Random(0))


def test_a_written_part_is_a_valid_dataset(tmp_path):
    from core.data import read_dataset
    dataset = read_dataset(world.write_part(tmp_path / "novel", "novel-colours", items=8), tmp_path / "w")
    assert dataset.stats()["items"] == 8 and dataset.stats()["test"] == 2
    assert all(len(i.captions) == 2 and len(i.qa) >= 5 for i in dataset.items)


def test_a_short_pretraining_run_writes_a_loadable_checkpoint(tmp_path):
    from core.offline import ARCHITECTURE, pretrain
    report = pretrain(tmp_path, steps=3, batch_size=8)
    assert report["steps"] == 3 and set(report["zero_shot_t2i_r1"]) == {
        "base", "novel-colours", "novel-compositions", "novel-textures"}
    checkpoint = tmp_path / f"{ARCHITECTURE}.safetensors"
    backbone = load_backbone(f"openclip:{ARCHITECTURE}:{checkpoint}")
    assert backbone.weights == f"local checkpoint {checkpoint}"
    assert checkpoint.stat().st_size < 25 * 2**20


def object_centre(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixels that are neither background nor texture."""
    pixels = frame.astype(int)
    away = [np.abs(pixels - np.array(c)).sum(axis=2) > 90 for c in (world.BACKGROUND, world.TEXTURE_INK)]
    ys, xs = np.nonzero(away[0] & away[1])
    return xs.mean(), ys.mean()


def test_motion_clips_move_as_their_captions_say(tmp_path):
    from core.data import read_dataset
    from core.data.media import read_video_frames
    dataset = read_dataset(world.write_part(tmp_path / "motion", "novel-motion", items=6), tmp_path / "w")
    assert {i.kind for i in dataset.items} == {"video"} and dataset.stats()["test"] == 2
    for item in dataset.items:
        answers = {qa.question: qa.answers[0] for qa in item.qa}
        motion, speed = answers["how does the shape move?"], answers["how fast does it move?"]
        assert all(motion in c and speed in c for c in item.captions)
        first, last = (object_centre(np.asarray(f)) for f in read_video_frames(dataset.path(item), frames=2))
        dx, dy = abs(last[0] - first[0]), abs(last[1] - first[1])
        assert (dx > dy) == (motion == "sideways"), (motion, dx, dy)
