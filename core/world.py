"""A procedural world of coloured objects, for offline pretraining and few-shot demonstrations.

Every scene is drawn from attributes — shape, colour, size, position, count, background texture —
and described by captions in varied phrasings and by questions with answers; clips move an
object across the picture. Everything is deterministic in the seed.

The world has a **base** part, for pretraining, and **novel** parts the pretrained model never
sees: unseen colour words (`novel-colours`), unseen colour-shape pairs (`novel-compositions`),
an unseen background texture (`novel-textures`) and motion in video (`novel-motion`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 60), "blue": (40, 70, 215), "yellow": (230, 200, 25),
    "purple": (135, 50, 170), "orange": (240, 125, 25),
    "pink": (240, 120, 190), "brown": (125, 80, 40),            # novel colours
}
BASE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NOVEL_COLOURS = ("pink", "brown")
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
SIZES = {"small": 0.13, "large": 0.22}                          # radius as a fraction of the picture
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "centre": (0.5, 0.5)}
BASE_TEXTURES = ("plain", "stripes", "dots")
NOVEL_TEXTURES = ("checks",)
HELD_OUT_PAIRS = (("blue", "triangle"), ("red", "ring"), ("green", "cross"), ("yellow", "diamond"),
                  ("purple", "square"), ("orange", "circle"))
MOTIONS = ("sideways", "up and down")
SPEEDS = {"slowly": 0.25, "quickly": 0.5}                       # distance travelled, as a fraction of the picture
CLIP_FRAMES, CLIP_FPS = 16, 8
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PARTS = ("base", "novel-colours", "novel-compositions", "novel-textures", "novel-motion")
BACKGROUND = (236, 236, 236)
TEXTURE_INK = (205, 205, 205)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    texture: str


def _allowed(part: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(colours, textures) a part draws from."""
    if part == "novel-colours":
        return NOVEL_COLOURS, BASE_TEXTURES
    if part == "novel-textures":
        return BASE_COLOURS, NOVEL_TEXTURES
    return BASE_COLOURS, BASE_TEXTURES


def sample_scene(part: str, rng: random.Random) -> Scene:
    if part not in PARTS:
        raise ValueError(f"unknown world part '{part}': choose one of {', '.join(PARTS)}")
    colours, textures = _allowed(part)
    pairs = [(c, s) for c in colours for s in SHAPES
             if ((c, s) in HELD_OUT_PAIRS) == (part == "novel-compositions")]
    colour, shape = rng.choice(pairs)
    count = rng.choice((1, 1, 2, 3)) if part != "novel-motion" else 1
    position = rng.choice(tuple(POSITIONS)) if count == 1 else "centre"
    return Scene(shape, colour, rng.choice(tuple(SIZES)), position, count, rng.choice(textures))


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, size: int) -> None:
    if texture == "stripes":
        for x in range(0, size, 8):
            draw.rectangle([x, 0, x + 3, size], fill=TEXTURE_INK)
    elif texture == "dots":
        for x in range(4, size, 10):
            for y in range(4, size, 10):
                draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=TEXTURE_INK)
    elif texture == "checks":
        for x in range(0, size, 8):
            for y in range((x // 8) % 2 * 8, size, 16):
                draw.rectangle([x, y, x + 7, y + 7], fill=TEXTURE_INK)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        bar = r / 3
        draw.rectangle([cx - r, cy - bar, cx + r, cy + bar], fill=fill)
        draw.rectangle([cx - bar, cy - r, cx + bar, cy + r], fill=fill)
    else:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=BACKGROUND)


def object_centres(scene: Scene, size: int = IMAGE_SIZE) -> list[tuple[float, float]]:
    if scene.count == 1:
        fx, fy = POSITIONS[scene.position]
        return [(fx * size, fy * size)]
    xs = {2: (0.3, 0.7), 3: (0.2, 0.5, 0.8)}[scene.count]
    return [(fx * size, 0.5 * size) for fx in xs]


def draw_scene(scene: Scene, size: int = IMAGE_SIZE, centre: Optional[tuple[float, float]] = None) -> Image.Image:
    """The picture of a scene; `centre` moves a single object (for clips)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene.texture, size)
    radius = SIZES[scene.size] * size * (0.8 if scene.count == 3 else 1.0)
    for cx, cy in ([centre] if centre is not None else object_centres(scene, size)):
        _draw_object(draw, scene.shape, cx, cy, radius, COLOURS[scene.colour])
    return image


_TEXTURE_PHRASES = {"plain": "a plain background", "stripes": "a striped background",
                    "dots": "a dotted background", "checks": "a checked background"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "centre": "in the middle"}


def captions(scene: Scene, rng: random.Random, n: int = 2) -> list[str]:
    """`n` different descriptions of the scene, in varied phrasings."""
    plural = "s" if scene.count > 1 else ""
    shape = f"{scene.shape}{'es' if scene.count > 1 and scene.shape == 'cross' else plural}"
    things = f"{COUNT_WORDS[scene.count]} {scene.size} {scene.colour} {shape}"
    where = _POSITION_PHRASES[scene.position] if scene.count == 1 else "side by side"
    background = _TEXTURE_PHRASES[scene.texture]
    templates = [
        f"{things} {where} on {background}",
        f"a picture of {things} {where}",
        f"there {'is' if scene.count == 1 else 'are'} {things} on {background}",
        f"{background} with {things} {where}",
        f"{scene.colour} {shape}, {scene.size}, {where}",
    ]
    return rng.sample(templates, n)


def questions(scene: Scene) -> list[tuple[str, str]]:
    qa = [("what colour is the shape?", scene.colour), ("what shape is it?", scene.shape),
          ("how many shapes are there?", str(scene.count)), ("is the shape big or small?",
                                                              "big" if scene.size == "large" else "small"),
          ("what is the background like?", scene.texture)]
    if scene.count == 1:
        qa.append(("where is the shape?", scene.position))
    return qa


def motion_centres(motion: str, speed: str, frames: int = CLIP_FRAMES,
                   size: int = IMAGE_SIZE) -> list[tuple[float, float]]:
    """The object's centre in each frame: a straight move through the middle of the picture."""
    half = SPEEDS[speed] * size / 2
    path = [size / 2 - half + 2 * half * i / max(1, frames - 1) for i in range(frames)]
    return [(p, size / 2) for p in path] if motion == "sideways" else [(size / 2, p) for p in path]


def write_clip(path: Path, pictures: list[Image.Image], fps: int = CLIP_FPS) -> None:
    import av   # PyAV: only needed to write clips

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = pictures[0].size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 600_000
        for picture in pictures:
            for packet in stream.encode(av.VideoFrame.from_image(picture)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_motion_part(folder: str | Path, items: int, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """Write `items` clips of one object moving (sideways or up and down, slowly or quickly),
    with captions that say how it moves and questions about the motion, as data.jsonl."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n_test = int(round(items * test_fraction))
    for index, (scene, rng) in enumerate(scenes("novel-motion", items, seed)):
        motion, speed = rng.choice(MOTIONS), rng.choice(tuple(SPEEDS))
        name = f"novel-motion-{index:05d}.mp4"
        write_clip(folder / name, [draw_scene(scene, centre=c) for c in motion_centres(motion, speed)])
        split = "test" if index >= items - n_test else "train"
        thing = f"{scene.size} {scene.colour} {scene.shape}"
        texts = [f"a {thing} moving {motion} {speed}", f"a {thing} that moves {speed} {motion}",
                 f"{motion} motion: a {scene.colour} {scene.shape} moving {speed}"]
        rows += [{"video": name, "caption": c, "split": split} for c in rng.sample(texts, 2)]
        rows += [{"video": name, "question": q, "answer": a, "split": split}
                 for q, a in (("how does the shape move?", motion), ("how fast does it move?", speed),
                              ("what colour is the shape?", scene.colour))]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def scenes(part: str, count: int, seed: int) -> Iterator[tuple[Scene, random.Random]]:
    rng = random.Random(f"{part}:{seed}")
    for _ in range(count):
        yield sample_scene(part, rng), rng


def write_part(folder: str | Path, part: str, items: int, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """Write `items` pictures of a part with data.jsonl (2 captions and every question per picture).

    The last `test_fraction` of the items are the test split. `novel-motion` is video: it is
    written by `write_motion_part`.
    """
    if part == "novel-motion":
        return write_motion_part(folder, items, seed, test_fraction)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n_test = int(round(items * test_fraction))
    for index, (scene, rng) in enumerate(scenes(part, items, seed)):
        name = f"{part}-{index:05d}.png"
        draw_scene(scene).save(folder / name)
        split = "test" if index >= items - n_test else "train"
        rows += [{"image": name, "caption": c, "split": split} for c in captions(scene, rng)]
        rows += [{"image": name, "question": q, "answer": a, "split": split} for q, a in questions(scene)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder
