"""Loading a model family behind one interface.

Specs: `openclip:NAME` (random init from the seed), `openclip:NAME:TAG` (pretrained tag through
open_clip's hub mechanism), `openclip:NAME:PATH` (a local checkpoint file); `blip:base`,
`blip:HUB_ID`, `blip:PATH` (transformers BLIP retrieval) and `blip-vqa:...` (BLIP question
answering), see core.backbones.blip; `offline`, the small CLIP shipped in assets/offline.
"""
from __future__ import annotations

from pathlib import Path

from core.backbones.base import Backbone, BackboneError
from core.backbones.layout import BlockLayout, Projection, ResidualSite, TowerLayout

__all__ = ["OFFLINE", "Backbone", "BackboneError", "BlockLayout", "Projection", "ResidualSite", "TowerLayout",
           "load_backbone"]


OFFLINE = "offline"
OFFLINE_ARCHITECTURE = "PETStudio-World"
OFFLINE_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "offline" / f"{OFFLINE_ARCHITECTURE}.safetensors"


def load_backbone(spec: str, seed: int = 0, fallback_offline: bool = False) -> Backbone:
    """The backbone for `spec`. With `fallback_offline`, weights that cannot be fetched (no
    network) are replaced by the bundled offline model, whose `fallback_note` says so."""
    try:
        return _load(spec, seed)
    except BackboneError as error:
        if not (fallback_offline and error.unreachable):
            raise
        backbone = _load(OFFLINE, seed)
        backbone.fallback_note = (f"{spec} could not be fetched (no network, or the hub is unreachable): "
                                  f"using the bundled offline model instead")
        return backbone


def _load(spec: str, seed: int) -> Backbone:
    if spec == OFFLINE:
        from core.backbones.openclip import load_openclip

        if not OFFLINE_CHECKPOINT.is_file():
            raise BackboneError(f"the offline model is missing ({OFFLINE_CHECKPOINT}): "
                                f"make it with python -m core.offline pretrain")
        backbone = load_openclip(OFFLINE, OFFLINE_ARCHITECTURE, str(OFFLINE_CHECKPOINT), seed)
        backbone.weights = "the bundled offline model (PETStudio-World, pretrained on the procedural world)"
        return backbone
    family, _, rest = spec.partition(":")
    if family == "openclip" and rest:
        from core.backbones.openclip import load_openclip

        name, _, source = rest.partition(":")
        return load_openclip(spec, name, source or None, seed)
    if family in ("blip", "blip-vqa") and rest:
        from core.backbones.blip import load_blip

        return load_blip(spec, rest, seed, answering=family == "blip-vqa")
    raise BackboneError(f"unknown backbone spec '{spec}': expected openclip:NAME[:TAG|:PATH], "
                        f"blip:base|HUB_ID|PATH, blip-vqa:base|HUB_ID|PATH or offline")
