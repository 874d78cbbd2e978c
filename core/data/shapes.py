"""A small generated image-caption set: one coloured shape per picture.

Deterministic by seed. The test split holds one picture of every (colour, shape) pair, so
each test caption has exactly one right image and chance Recall@1 is 1 / (colours × shapes).
The same pictures also come with questions ("what colour is the shape?"). Used by the CLI's
demo and by the tests.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
PHRASES = ("a {c} {s}", "a picture of a {c} {s}", "one {c} {s} on a plain background")


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    shade = rng.randint(225, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.36) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        bar = radius / 3
        draw.rectangle([cx - radius, cy - bar, cx + radius, cy + bar], fill=fill)
        draw.rectangle([cx - bar, cy - radius, cx + bar, cy + radius], fill=fill)
    return image


def _draw_all(folder: Path, train_per_pair: int, seed: int, colours, shapes):
    """Draw every picture; yields (file name, colour, shape, split, rng)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for colour in colours:
        for shape in shapes:
            for k in range(train_per_pair + 1):
                name = f"{colour}_{shape}_{k}.png"
                draw_shape(colour, shape, rng).save(folder / name)
                yield name, colour, shape, "test" if k == 0 else "train", rng


def write_shapes_dataset(folder: str | Path, train_per_pair: int = 3, seed: int = 0,
                         colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES) -> Path:
    """Write pictures and captions.csv (file, caption, split) into `folder`; returns it."""
    folder = Path(folder)
    rows = []
    for name, colour, shape, split, rng in _draw_all(folder, train_per_pair, seed, colours, shapes):
        for phrase in rng.sample(PHRASES, 2):
            rows.append((name, phrase.format(c=colour, s=shape), split))
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption", "split"])
        writer.writerows(rows)
    return folder


def write_shapes_vqa_dataset(folder: str | Path, train_per_pair: int = 3, seed: int = 0,
                             colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES) -> Path:
    """Write pictures and data.jsonl with two questions per picture (its colour, its shape)."""
    folder = Path(folder)
    rows = []
    for name, colour, shape, split, _ in _draw_all(folder, train_per_pair, seed, colours, shapes):
        rows.append({"image": name, "question": "what colour is the shape?", "answer": colour, "split": split})
        rows.append({"image": name, "question": "what shape is it?", "answer": shape, "split": split})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder
