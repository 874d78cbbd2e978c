"""Loading a model family behind one interface.

Specs: `openclip:NAME` (random init from the seed), `openclip:NAME:TAG` (pretrained tag through
open_clip's hub mechanism), `openclip:NAME:PATH` (a local checkpoint file); `blip:base`,
`blip:HUB_ID`, `blip:PATH` (transformers BLIP retrieval) and `blip-vqa:...` (BLIP question
answering), see core.backbones.blip; `offline`, the small CLIP shipped in assets/offline.

Each family describes itself once in a `Family` registered with `register_family`: how its
specs are written and read, how it loads, the tasks it serves and what the user is told about
each kind of weights. `parse_spec` reads a spec without touching the filesystem, so a spec from
a client can be refused for naming a server path before anything looks at that path.
"""
from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from core.backbones.base import CAPABILITIES, Backbone, BackboneError, WeightsBudget
from core.backbones.layout import BlockLayout, Projection, ResidualSite, TowerLayout

__all__ = ["CAPABILITIES", "FAMILIES", "OFFLINE", "Backbone", "BackboneError", "BlockLayout", "Family", "Projection",
           "ResidualSite", "Spec", "TowerLayout", "WeightsBudget", "describe_spec", "estimate_weights_bytes",
           "load_backbone", "parse_spec", "register_family"]


OFFLINE = "offline"
OFFLINE_ARCHITECTURE = "PETStudio-World"
OFFLINE_CHECKPOINT = Path(__file__).resolve().parents[2] / "assets" / "offline" / f"{OFFLINE_ARCHITECTURE}.safetensors"


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class Spec:
    """A backbone spec, read: `weights` is where its weights come from — "bundled", "random",
    "tag" (an open_clip pretrained tag), "hub" (a Hugging Face hub id) or "path" (a local file or folder)."""

    text: str
    family: str                # the registered family's name: offline, openclip, blip, blip-vqa
    name: str                  # the open_clip model name ("" for other families)
    source: Optional[str]      # the tag, hub id or path
    weights: str


@dataclass(frozen=True)
class Family:
    """A backbone family as everything else sees it before loading. Its specs are `NAME` alone
    or `NAME:REST`; `read(REST)` gives (model name, source, weights kind), or None when REST is
    malformed, and never touches the filesystem. `load(spec, seed, local_paths, budget)` imports the
    family's library only when called, so reading and describing specs stays light, and refuses
    weights over the budget (a WeightsBudget, or None for none) before building them. `notices`
    says, for each kind of weights it reads, what the user is told before anything is tuned
    (`{spec}` stands for the spec). `size(spec)` is the bytes its weights would take in memory,
    known before loading them (without allocating them), or None where it cannot be; it raises
    BackboneError for an architecture that cannot be tuned here."""

    name: str
    forms: str                      # how its specs are written, for messages
    read: Callable[[str], Optional[tuple[str, Optional[str], str]]]
    load: Callable[[Spec, int, bool, Optional[WeightsBudget]], Backbone]
    tasks: tuple[str, ...]          # the tasks its backbones serve
    notices: dict[str, str]
    size: Callable[[Spec], Optional[int]]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` known to `parse_spec`, `load_backbone` and `describe_spec`; names are unique."""
    if family.name in FAMILIES:
        raise ValueError(f"a backbone family named {family.name} is already registered")
    try:
        inspect.signature(family.load).bind("spec", 0, True, None)
    except TypeError:   # said now, not as a bare TypeError at a user's first load
        raise ValueError(f"backbone family {family.name}: load must take (spec, seed, local_paths, budget), the budget "
                         f"a WeightsBudget or None (README \"A new backbone family\")") from None
    except ValueError:   # a callable whose signature Python cannot read: its first load tells
        pass
    FAMILIES[family.name] = family
    return family


def _forms() -> str:
    forms = [family.forms for family in FAMILIES.values()]
    return f"{', '.join(forms[:-1])} or {forms[-1]}"


def parse_spec(spec: str) -> Spec:
    """Read a spec by its form alone (no filesystem access). A BLIP source of the form
    owner/name is a hub id; a local folder is written as an absolute path or starting with ./"""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 4096 or "\0" in spec:
        raise BackboneError(f"a backbone spec must be a non-empty text: {_forms()}")
    spec = spec.strip()
    name, colon, rest = spec.partition(":")
    family = FAMILIES.get(name)
    # A colon always introduces something: `offline:` and `openclip:` are not specs.
    read = family.read(rest) if family is not None and (rest or not colon) else None
    if read is None:
        raise BackboneError(f"unknown backbone spec '{spec[:200]}': expected {_forms()}")
    return Spec(spec, family.name, *read)


def describe_spec(spec: str, local_paths: bool) -> str:
    """Where the weights of `spec` come from, said before anything is tuned: from the spec's form
    alone, so nothing on the server is looked at. A spec that cannot be read gets the reason instead."""
    try:
        parsed = parse_spec(spec)
    except BackboneError as error:
        return str(error)
    if parsed.weights == "path" and not local_paths:
        return (f"`{parsed.text}` names a file or folder on the server, which this app does not open "
                f"(its operator can allow it with PETSTUDIO_LOCAL_PATHS=1).")
    return FAMILIES[parsed.family].notices[parsed.weights].format(spec=parsed.text)


def estimate_weights_bytes(spec: str) -> Optional[int]:
    """The bytes the weights of `spec` would take in memory, found before loading them (from its
    architecture on the meta device; a BLIP hub model's config.json is fetched for it): None where
    that cannot be known beforehand (a local file or folder, a hub that cannot be reached). An
    architecture that cannot be tuned here is refused (BackboneError) before it is built."""
    parsed = parse_spec(spec)
    return FAMILIES[parsed.family].size(parsed)


def load_backbone(spec: str, seed: int = 0, fallback_offline: bool = False, local_paths: bool = True,
                  budget: Optional[WeightsBudget] = None) -> Backbone:
    """The backbone for `spec`. With `fallback_offline`, weights that cannot be fetched (no
    network) are replaced by the bundled offline model, whose `fallback_note` says so. Without
    `local_paths` (a spec from a remote client) a spec naming a file or folder is refused before
    anything looks at it, and a hub id is only ever fetched from the hub. Weights over `budget` are
    refused before they are built (a local file or folder is not sized)."""
    parsed = parse_spec(spec)
    if parsed.weights == "path" and not local_paths:
        raise BackboneError(f"'{parsed.text[:200]}' names a file or folder on the server, which is not allowed here: "
                            f"use the bundled model (offline), an open_clip name with or without a pretrained tag, "
                            f"or a Hugging Face hub id")
    try:
        return _load(parsed, seed, local_paths, budget)
    except BackboneError as error:
        if not (fallback_offline and error.unreachable):
            raise
        backbone = _load(parse_spec(OFFLINE), seed, local_paths, budget)
        backbone.fallback_note = (f"{spec} could not be fetched (no network, or the hub is unreachable): "
                                  f"using the bundled offline model instead")
        return backbone


def _load(spec: Spec, seed: int, local_paths: bool, budget: Optional[WeightsBudget]) -> Backbone:
    family = FAMILIES[spec.family]
    backbone = family.load(spec, seed, local_paths, budget)
    backbone.tasks = family.tasks
    return backbone


# --- The families -------------------------------------------------------------------------------

_RANDOM_NOTICE = ("`{spec}` has no pretrained weights: random init from the seed "
                  "(for trying the mechanics, not quality).")
_DOWNLOAD_NOTICE = ("`{spec}` downloads its weights on first use. Without a network the run falls back to the "
                    "bundled offline model and says so here.")
_PATH_NOTICE = "`{spec}`: weights from a local path."


def _is_path(source: str) -> bool:
    return ("/" in source or "\\" in source or source.startswith(("~", "."))
            or Path(source).suffix in _PATH_SUFFIXES)


def _read_openclip(rest: str) -> Optional[tuple[str, Optional[str], str]]:
    if not rest:
        return None
    name, _, source = rest.partition(":")
    if not source:
        return name, None, "random"
    return name, source, "path" if _is_path(source) else "tag"


def _load_openclip(spec: Spec, seed: int, local_paths: bool, budget: Optional[WeightsBudget]) -> Backbone:
    from core.backbones.openclip import load_openclip

    if budget is not None:   # an architecture's size is its name's: sizing it again costs nothing
        budget.refuse(spec.text, _openclip_size(spec))

    return load_openclip(spec.text, spec.name, spec.source, seed, as_path=spec.weights == "path")


def _openclip_size(spec: Spec) -> Optional[int]:
    from core.backbones.openclip import openclip_bytes

    return None if spec.weights == "path" else openclip_bytes(spec.name)


def _load_offline(spec: Spec, seed: int, local_paths: bool, budget: Optional[WeightsBudget]) -> Backbone:
    from core.backbones.openclip import load_openclip

    if budget is not None:
        budget.refuse(spec.text, _openclip_size(spec))

    if not OFFLINE_CHECKPOINT.is_file():
        raise BackboneError(f"the offline model is missing ({OFFLINE_CHECKPOINT}): "
                            f"make it with python -m core.offline pretrain")
    backbone = load_openclip(OFFLINE, OFFLINE_ARCHITECTURE, str(OFFLINE_CHECKPOINT), seed, as_path=True)
    backbone.weights = "the bundled offline model (PETStudio-World, pretrained on the procedural world)"
    return backbone


def _read_blip(rest: str) -> Optional[tuple[str, Optional[str], str]]:
    if not rest:
        return None
    if rest == "base":
        return "", rest, "random"
    return "", rest, "hub" if HUB_ID.match(rest) and ".." not in rest else "path"


def _blip_size(spec: Spec, answering: bool) -> Optional[int]:
    from core.backbones.blip import blip_bytes

    return blip_bytes(spec.source, spec.weights, answering)


def _load_blip(spec: Spec, seed: int, local_paths: bool, budget: Optional[WeightsBudget], answering: bool) -> Backbone:
    from core.backbones.blip import load_blip

    # A relative folder written like a hub id (owner/name) that exists here: for local use only.
    local_folder = local_paths and spec.weights == "hub" and Path(spec.source).is_dir()
    return load_blip(spec.text, spec.source, seed, answering=answering,
                     kind="folder" if spec.weights == "path" or local_folder else spec.weights, budget=budget)


register_family(Family(
    "openclip", "openclip:NAME[:TAG|:PATH]", _read_openclip, _load_openclip, ("retrieval", "vqa"),
    {"random": _RANDOM_NOTICE, "tag": _DOWNLOAD_NOTICE, "path": _PATH_NOTICE}, _openclip_size))
register_family(Family(
    "blip", "blip:base|HUB_ID|PATH", _read_blip, functools.partial(_load_blip, answering=False), ("retrieval", "vqa"),
    {"random": _RANDOM_NOTICE, "hub": _DOWNLOAD_NOTICE, "path": _PATH_NOTICE},
    functools.partial(_blip_size, answering=False)))
register_family(Family(
    "blip-vqa", "blip-vqa:base|HUB_ID|PATH", _read_blip, functools.partial(_load_blip, answering=True), ("vqa",),
    {"random": _RANDOM_NOTICE, "hub": _DOWNLOAD_NOTICE, "path": _PATH_NOTICE},
    functools.partial(_blip_size, answering=True)))
register_family(Family(
    OFFLINE, OFFLINE, lambda rest: None if rest else (OFFLINE_ARCHITECTURE, None, "bundled"), _load_offline,
    ("retrieval", "vqa"),
    {"bundled": "The bundled offline model: small, pretrained on PET Studio's procedural world, no network needed."},
    _openclip_size))
