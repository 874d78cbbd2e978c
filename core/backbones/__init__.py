"""Loading a model family behind one interface.

Specs: `openclip:NAME` (random init from the seed), `openclip:NAME:TAG` (pretrained tag through
open_clip's hub mechanism), `openclip:NAME:PATH` (a local checkpoint file); `blip:base`,
`blip:HUB_ID`, `blip:PATH` (transformers BLIP retrieval) and `blip-vqa:...` (BLIP question
answering), see core.backbones.blip.
"""
from __future__ import annotations

from core.backbones.base import Backbone, BackboneError
from core.backbones.layout import BlockLayout, Projection, ResidualSite, TowerLayout

__all__ = ["Backbone", "BackboneError", "BlockLayout", "Projection", "ResidualSite", "TowerLayout", "load_backbone"]


def load_backbone(spec: str, seed: int = 0) -> Backbone:
    family, _, rest = spec.partition(":")
    if family == "openclip" and rest:
        from core.backbones.openclip import load_openclip

        name, _, source = rest.partition(":")
        return load_openclip(spec, name, source or None, seed)
    if family in ("blip", "blip-vqa") and rest:
        from core.backbones.blip import load_blip

        return load_blip(spec, rest, seed, answering=family == "blip-vqa")
    raise BackboneError(f"unknown backbone spec '{spec}': expected openclip:NAME[:TAG|:PATH], "
                        f"blip:base|HUB_ID|PATH or blip-vqa:base|HUB_ID|PATH")
