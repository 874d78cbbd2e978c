"""Decoding media: images through PIL, videos through decord with uniform frame sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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


def load_media(path: str | Path, kind: str, transform: Callable, frames: int = DEFAULT_FRAMES) -> torch.Tensor:
    """(3, H, W) for an image, (frames, 3, H, W) for a video, through the backbone's transform."""
    if kind == "video":
        return torch.stack([transform(frame) for frame in read_video_frames(path, frames)])
    with Image.open(path) as image:
        return transform(image.convert("RGB"))
