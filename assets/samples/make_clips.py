"""Makes the sample clips in clips/ from the photos in photos/: short camera moves (pans and a
zoom) over each photo, written by the engine's clip writer (PyAV). Run from the repository root:
    .venv/bin/python assets/samples/make_clips.py
"""
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))   # the repository root, for core

from core.world import write_clip  # noqa: E402

SIZE, FRAMES, FPS = 96, 16, 8

# photo, move, captions, (question, answer)
CLIPS = [
    ("chelsea.png", "pan_right", ["the camera pans right across the face of a tabby cat",
                                  "a slow sideways look at a cat with green eyes"], ("what animal is this?", "cat")),
    ("coffee.png", "zoom_in", ["the camera zooms in on a cup of espresso on a red saucer",
                               "a close-up growing closer to a coffee cup"], ("what drink is shown?", "coffee")),
    ("rocket.jpg", "pan_up", ["the camera tilts up along a rocket on its launch pad at night",
                              "an upward look at a lit rocket between towers"], ("what vehicle is shown?", "rocket")),
    ("coins.png", "pan_left", ["the camera pans left over rows of ancient coins",
                               "a sideways sweep across old silver coins"], ("what objects are shown?", "coins")),
    ("astronaut.png", "zoom_in", ["the camera zooms in on a smiling astronaut in an orange suit",
                                  "a push in towards a woman astronaut next to a flag"],
     ("what colour is the spacesuit?", "orange")),
    ("horse.png", "pan_right", ["the camera pans right along the silhouette of a horse",
                                "a sideways look at a black horse outline"], ("what animal is this?", "horse")),
]


def crops(image: Image.Image, move: str):
    width, height = image.size
    side = min(width, height) * 2 // 3
    for i in range(FRAMES):
        t = i / (FRAMES - 1)
        if move == "zoom_in":
            s = int(min(width, height) * (1 - 0.5 * t))
            left, top = (width - s) // 2, (height - s) // 2
            box = (left, top, left + s, top + s)
        elif move in ("pan_right", "pan_left"):
            x = int((width - side) * (t if move == "pan_right" else 1 - t))
            box = (x, (height - side) // 2, x + side, (height - side) // 2 + side)
        else:  # pan_up
            y = int((height - side) * (1 - t))
            box = ((width - side) // 2, y, (width - side) // 2 + side, y + side)
        yield image.crop(box).resize((SIZE, SIZE), Image.BICUBIC)


def main() -> None:
    out = HERE / "clips"
    out.mkdir(exist_ok=True)
    rows = []
    for photo, move, captions, (question, answer) in CLIPS:
        name = f"{Path(photo).stem}_{move}.mp4"
        with Image.open(HERE / "photos" / photo) as image:
            write_clip(out / name, list(crops(image.convert("RGB"), move)), FPS)
        rows += [f'{{"video": "{name}", "caption": "{c}"}}' for c in captions]
        rows.append(f'{{"video": "{name}", "question": "{question}", "answer": "{answer}"}}')
    (out / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
