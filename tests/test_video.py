"""Video: clips written here with PyAV, read back through decord, frames sampled uniformly."""
import json

import numpy as np
import pytest
from PIL import Image

import core.data.media as media
from core import world
from core.data import DatasetError, Limits, read_dataset
from core.runs import tune
from tests.conftest import TINY

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}
MOTIONS = ("sideways", "up and down")
SIZE, SQUARE, FRAMES = 64, 28, 12


def square_position(motion: str, frame: int, offset: int) -> tuple[int, int]:
    """Top-left corner of the square: sweeping across the picture, on a line set by `offset`."""
    travel = frame * (SIZE - SQUARE) // (FRAMES - 1)
    return (travel, offset) if motion == "sideways" else (offset, travel)


def write_clip(path, colour, motion, offset, frames=FRAMES, fps=8):
    pictures = []
    for i in range(frames):
        picture = np.full((SIZE, SIZE, 3), 240, np.uint8)
        x, y = square_position(motion, i, offset)
        picture[y:y + SQUARE, x:x + SQUARE] = COLOURS[colour]
        pictures.append(Image.fromarray(picture))
    world.write_clip(path, pictures, fps)
    return path


@pytest.fixture(scope="module")
def motion_data(tmp_path_factory):
    """12 kinds of clip (colour × motion), 3 to train on and 1 to test, with captions and a question."""
    folder = tmp_path_factory.mktemp("motion")
    rows = []
    for colour in COLOURS:
        for motion in MOTIONS:
            for k, offset in enumerate((18, 4, 32, 10)):
                name = f"{colour}_{motion.replace(' ', '_')}_{k}.mp4"
                write_clip(folder / name, colour, motion, offset)
                split = "test" if k == 0 else "train"
                rows += [{"video": name, "caption": f"a {colour} square moving {motion}", "split": split},
                         {"video": name, "caption": f"a {colour} block that moves {motion}", "split": split},
                         {"video": name, "question": "what colour is the square?", "answer": colour, "split": split}]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_uniform_frame_indices():
    assert media.sample_indices(20, 4) == [2, 7, 12, 17]
    assert media.sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert media.sample_indices(100, 1) == [50]


def test_decord_reads_back_the_sampled_frames(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", "blue", "sideways", offset=24)
    frames = media.read_video_frames(path, frames=4)
    assert len(frames) == 4 and frames[0].size == (SIZE, SIZE)
    for frame, index in zip(frames, media.sample_indices(FRAMES, 4)):
        x, y = square_position("sideways", index, 24)
        centre = np.asarray(frame)[y + SQUARE // 2, x + SQUARE // 2].astype(int)
        assert np.abs(centre - COLOURS["blue"]).max() < 40, (index, centre)
        assert np.asarray(frame)[4, 4].min() > 200            # background stays light


def test_bad_videos_are_named(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_clip(folder / "long.mp4", "red", "sideways", 8, frames=24, fps=8)       # 3 seconds
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    (folder / "empty.webm").write_bytes(b"")
    rows = [{"video": "long.mp4", "caption": "x"}, {"video": "broken.mp4", "caption": "y"},
            {"video": "empty.webm", "caption": "z"}]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError) as caught:
        read_dataset(folder, tmp_path / "w", Limits(max_video_seconds=2))
    found = [str(p) for p in caught.value.problems]
    assert found[0] == "data.jsonl → long.mp4, row 1: video is 3 s long, more than the limit of 2 s"
    assert found[1].startswith("data.jsonl → broken.mp4, row 2: unreadable video")
    assert found[2].startswith("data.jsonl → empty.webm, row 3: unreadable video")


def test_images_and_videos_do_not_mix(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_clip(folder / "a.mp4", "red", "sideways", 8)
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    (folder / "data.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"image": "b.png", "caption": "y"}\n'
                                       '{"image": "a.mp4", "caption": "z"}\n')
    with pytest.raises(DatasetError) as caught:
        read_dataset(folder, tmp_path / "w")
    assert [str(p) for p in caught.value.problems] == [
        "data.jsonl, row 3: 'a.mp4' is listed as an image but is a video file"]
    (folder / "data.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{"image": "b.png", "caption": "y"}\n')
    with pytest.raises(DatasetError, match="mixes images and videos"):
        read_dataset(folder, tmp_path / "w")


def test_video_retrieval_learns_and_decodes_each_clip_once(motion_data, tmp_path, monkeypatch):
    calls = []
    original = media.read_video_frames
    monkeypatch.setattr(media, "read_video_frames", lambda path, frames: calls.append(path) or original(path, frames))
    result = tune(TINY, motion_data, "full", epochs=10, lr=1e-3, frames=4, seed=0, out=tmp_path / "run")
    assert len(calls) == 48                           # 48 clips, each decoded once for the run
    assert result.frames == 4 and result.dataset.items == 48
    losses = result.train.epoch_losses
    assert losses[-1] < 0.8 * losses[0]
    chance = 100 / 12
    assert result.tuned["t2i_r1"] >= 3 * chance and result.tuned["i2t_r1"] >= 2 * chance


def test_video_qa_learns(motion_data, tmp_path):
    result = tune(TINY, motion_data, "full", epochs=10, lr=1e-3, frames=4, seed=0, task="vqa",
                  batch_size=8, out=tmp_path / "run")
    chance = 100 / 6
    assert result.tuned["vqa_acc"] >= 3 * chance and result.tuned["vqa_acc"] > result.zero_shot["vqa_acc"]


def test_blip_video_concatenates_the_frames_tokens_and_mean_pools_the_embedding(tiny_blip):
    """The authors' video on BLIP: matching and answering cross-attend to every frame's tokens
    (concatenated in frame order); the ITC embedding is the mean of the frames' embeddings."""
    import torch

    from core.tasks.encoding import encode_media, media_tokens

    side = tiny_blip.model.config.vision_config.image_size
    torch.manual_seed(0)
    clips = torch.randn(2, 3, 3, side, side)
    tiny_blip.eval()
    with torch.no_grad():
        per_frame = tiny_blip.image_tokens(clips.flatten(0, 1))           # (6, N, d)
        tokens = media_tokens(tiny_blip, clips)
        n = per_frame.shape[1]
        assert tokens.shape == (2, 3 * n, per_frame.shape[2])
        assert torch.equal(tokens[1, n:2 * n], per_frame[4]) and torch.equal(tokens[0, 2 * n:], per_frame[2])
        frames_differ = (per_frame[0] - per_frame[1]).abs().max()
        assert frames_differ > 1e-2   # concatenation is not averaging: the frames' tokens stay apart
        embedding = encode_media(tiny_blip, clips)
        expected = tiny_blip.encode_image(clips.flatten(0, 1)).view(2, 3, -1).mean(dim=1)
        assert torch.allclose(embedding, expected, atol=1e-6)
