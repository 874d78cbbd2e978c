"""Upper bounds on what a dataset may contain, so an upload can't exhaust disk or memory."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_files: int = 10_000                 # files in an archive, rows in a manifest
    max_file_bytes: int = 64 * 2**20        # one media file
    max_manifest_bytes: int = 16 * 2**20    # captions.csv or data.jsonl, read whole into memory
    max_total_bytes: int = 2 * 2**30        # an archive, uncompressed
    max_compression_ratio: float = 100.0    # uncompressed / compressed, per archive member
    max_name_bytes: int = 255               # one file or folder name, UTF-8 (what most file systems take)
    max_path_bytes: int = 1024              # a media path or archive member, relative to the dataset folder
    max_image_pixels: int = 40_000_000      # width × height
    max_video_seconds: float = 300.0        # one video's duration
    max_video_frames: int = 20_000          # one video's frame count


DEFAULT_LIMITS = Limits()
