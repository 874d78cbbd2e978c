"""Loading a model family behind one interface.

Specs: `openclip:NAME` (random init from the seed), `openclip:NAME:TAG` (pretrained tag through
open_clip's hub mechanism), `openclip:NAME:PATH` (a local checkpoint file); `blip:base`,
`blip:HUB_ID`, `blip:PATH` (transformers BLIP retrieval) and `blip-vqa:...` (BLIP question
answering), see core.backbones.blip; `offline`, the small CLIP shipped in assets/offline.

`parse_spec` reads a spec without touching the filesystem, so a spec from a client can be
refused for naming a server path before anything looks at that path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.backbones.base import Backbone, BackboneError
from core.backbones.layout import BlockLayout, Projection, ResidualSite, TowerLayout

__all__ = ["OFFLINE", "Backbone", "BackboneError", "BlockLayout", "Projection", "ResidualSite", "Spec",
           "TowerLayout", "load_backbone", "parse_spec"]


OFFLINE = "offline"
OFFLINE_ARCHITECTURE = "PETStudio-World"
OFFLINE_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "offline" / f"{OFFLINE_ARCHITECTURE}.safetensors"


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_FORMS = "openclip:NAME[:TAG|:PATH], blip:base|HUB_ID|PATH, blip-vqa:base|HUB_ID|PATH or offline"


@dataclass(frozen=True)
class Spec:
    """A backbone spec, read: `weights` is where its weights come from — "bundled", "random",
    "tag" (an open_clip pretrained tag), "hub" (a Hugging Face hub id) or "path" (a local file or folder)."""

    text: str
    family: str                # offline, openclip, blip, blip-vqa
    name: str                  # the open_clip model name ("" for other families)
    source: Optional[str]      # the tag, hub id or path
    weights: str


def _is_path(source: str) -> bool:
    return ("/" in source or "\\" in source or source.startswith(("~", "."))
            or Path(source).suffix in _PATH_SUFFIXES)


def parse_spec(spec: str) -> Spec:
    """Read a spec by its form alone (no filesystem access). A BLIP source of the form
    owner/name is a hub id; a local folder is written as an absolute path or starting with ./"""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 4096 or "\0" in spec:
        raise BackboneError(f"a backbone spec must be a non-empty text: {_FORMS}")
    spec = spec.strip()
    if spec == OFFLINE:
        return Spec(spec, OFFLINE, OFFLINE_ARCHITECTURE, None, "bundled")
    family, _, rest = spec.partition(":")
    if family == "openclip" and rest:
        name, _, source = rest.partition(":")
        if not source:
            return Spec(spec, family, name, None, "random")
        return Spec(spec, family, name, source, "path" if _is_path(source) else "tag")
    if family in ("blip", "blip-vqa") and rest:
        if rest == "base":
            return Spec(spec, family, "", rest, "random")
        return Spec(spec, family, "", rest, "hub" if HUB_ID.match(rest) and ".." not in rest else "path")
    raise BackboneError(f"unknown backbone spec '{spec[:200]}': expected {_FORMS}")


def load_backbone(spec: str, seed: int = 0, fallback_offline: bool = False, local_paths: bool = True) -> Backbone:
    """The backbone for `spec`. With `fallback_offline`, weights that cannot be fetched (no
    network) are replaced by the bundled offline model, whose `fallback_note` says so. Without
    `local_paths` (a spec from a remote client) a spec naming a file or folder is refused before
    anything looks at it, and a hub id is only ever fetched from the hub."""
    parsed = parse_spec(spec)
    if parsed.weights == "path" and not local_paths:
        raise BackboneError(f"'{parsed.text[:200]}' names a file or folder on the server, which is not allowed here: "
                            f"use the bundled model (offline), an open_clip name with or without a pretrained tag, "
                            f"or a Hugging Face hub id")
    try:
        return _load(parsed, seed, local_paths)
    except BackboneError as error:
        if not (fallback_offline and error.unreachable):
            raise
        backbone = _load(parse_spec(OFFLINE), seed, local_paths)
        backbone.fallback_note = (f"{spec} could not be fetched (no network, or the hub is unreachable): "
                                  f"using the bundled offline model instead")
        return backbone


def _load(spec: Spec, seed: int, local_paths: bool) -> Backbone:
    if spec.family == OFFLINE:
        from core.backbones.openclip import load_openclip

        if not OFFLINE_CHECKPOINT.is_file():
            raise BackboneError(f"the offline model is missing ({OFFLINE_CHECKPOINT}): "
                                f"make it with python -m core.offline pretrain")
        backbone = load_openclip(OFFLINE, OFFLINE_ARCHITECTURE, str(OFFLINE_CHECKPOINT), seed, as_path=True)
        backbone.weights = "the bundled offline model (PETStudio-World, pretrained on the procedural world)"
        return backbone
    if spec.family == "openclip":
        from core.backbones.openclip import load_openclip

        return load_openclip(spec.text, spec.name, spec.source, seed, as_path=spec.weights == "path")
    from core.backbones.blip import load_blip

    return load_blip(spec.text, spec.source, seed, answering=spec.family == "blip-vqa",
                     kind="folder" if spec.weights == "path" or (local_paths and _local_folder(spec)) else spec.weights)


def _local_folder(spec: Spec) -> bool:
    """A relative folder written like a hub id (owner/name) that exists here: for local use only."""
    return spec.weights == "hub" and Path(spec.source).is_dir()
