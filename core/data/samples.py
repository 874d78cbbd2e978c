"""The sample datasets that ship in assets/samples (see PROVENANCE.md there)."""
from __future__ import annotations

from pathlib import Path

SAMPLES_ROOT = Path(__file__).resolve().parents[2] / "assets" / "samples"

SAMPLES = {
    "photos": "8 public-domain and CC0 photographs with captions and questions (image-text, VQA)",
    "clips": "6 short clips panning and zooming over those photos, with captions and questions (video-text)",
}


def sample_path(name: str) -> Path:
    if name not in SAMPLES:
        raise ValueError(f"unknown sample dataset '{name}': choose one of {', '.join(SAMPLES)}")
    return SAMPLES_ROOT / name
