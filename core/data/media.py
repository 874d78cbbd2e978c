"""Decoding media: images through PIL, videos through decord with uniform frame sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from core.data.errors import DatasetError, Problem, describe

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")   # the only decoders PIL may try on an uploaded file
VIDEO_TYPES = (".mp4", ".webm", ".avi", ".mov")
DEFAULT_FRAMES = 8


def sample_indices(frame_count: int, frames: int) -> list[int]:
    """`frames` indices spread uniformly: the middle frame of each of `frames` equal segments."""
    return [min(frame_count - 1, int((i + 0.5) * frame_count / frames)) for i in range(frames)]


def read_video_frames(path: str | Path, frames: int = DEFAULT_FRAMES) -> list[Image.Image]:
    import decord

    reader = decord.VideoReader(str(path))
    batch = reader.get_batch(sample_indices(len(reader), frames)).asnumpy()
    return [Image.fromarray(frame) for frame in batch]


def open_image(path: str | Path) -> Image.Image:
    return Image.open(path, formats=IMAGE_FORMATS)


def load_media(path: str | Path, kind: str, transform: Callable, frames: int = DEFAULT_FRAMES) -> torch.Tensor:
    """(3, H, W) for an image, (frames, 3, H, W) for a video, through the backbone's transform.

    Validation decodes every image and a video's default frames; a file that still fails here
    (a video read at other frames, a file changed since) is a DatasetError naming it."""
    try:
        if kind == "video":
            pictures = read_video_frames(path, frames)
        else:
            with open_image(path) as image:
                pictures = [image.convert("RGB")]
    except Exception as error:  # PIL and decord report broken files through many exception types
        raise DatasetError([Problem(Path(path).name, f"unreadable {kind} ({describe(error)})")]) from error
    if kind == "video":
        return torch.stack([transform(picture) for picture in pictures])
    return transform(pictures[0])
