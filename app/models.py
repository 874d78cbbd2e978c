"""The models the app computes with, one cache for the whole process: each frozen backbone is
loaded once per spec and seed, kept on the CPU and shared by every session, the least recently
used let go once their weights exceed PETSTUDIO_CACHE_MB (default: a quarter of the machine's
memory, at most 8 GiB). A session's runs are only their folders: a run's PET weights (small) are
attached to the shared backbone for the length of one call and taken off after it.

`MODELS.on(call, key)` is how a function running on the device (app.device) gets a model: the
backbone moves to the call's device under its own lock, the run's weights are attached and
merged where the method is linear, inference runs in bf16 or fp16 where the device computes it
natively, and afterwards the backbone is put back exactly as it was, on the CPU.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import gradio as gr
import torch

from app import views
from app.sessions import Run, Session
from core import query
from core.backbones import Backbone, BackboneError, WeightsBudget, estimate_weights_bytes, load_backbone, parse_spec
from core.backbones.base import weights_bytes
from core.data.media import DEFAULT_FRAMES
from core.heap import return_freed_memory
from core.pet import PetHandle
from core.runs import attach_run
from core.trainer import autocast, autocast_for

# Typed backbone specs may name files and folders on the server only where its operator allows it
# (a local app); runs uploaded by a visitor never may.
LOCAL_PATHS = os.environ.get("PETSTUDIO_LOCAL_PATHS", "") == "1"
NO_RUN = "frozen model only"
GALLERIES_KEPT = 4   # per session: the frozen and the tuned model's gallery, and two more
STAND_IN_RETRY_S = 60.0   # a backbone the hub could not give is asked for again after this long


def _default_budget_mb() -> float:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not a POSIX system: assume 8 GiB
        memory = 8 * 2**30
    return min(8 * 1024, memory / 4 / 2**20)


CACHE_MB = float(os.environ.get("PETSTUDIO_CACHE_MB", "0") or 0) or _default_budget_mb()


@dataclass(frozen=True)
class ModelKey:
    """A model state a query runs on: a frozen backbone, or one with a run's PET weights."""

    spec: str
    seed: int
    local_paths: bool
    run: Optional[str] = None   # the run's folder


@dataclass
class Loaded:
    """What a `ModelCache.load` did: the notes of frozen models standing in for unreachable ones, and
    the backbones it built (cache key, backbone)."""

    notes: set[str] = field(default_factory=set)
    built: list[tuple[tuple, Backbone]] = field(default_factory=list)


class ModelCache:
    def __init__(self, budget_mb: float):
        self.budget = budget_mb * 2**20
        self._backbones: OrderedDict[tuple, tuple[Backbone, threading.Lock]] = OrderedDict()
        self._unshared: set[tuple] = set()   # built by a load that no other load has taken them from since
        self._stand_ins: dict[tuple, float] = {}   # key -> when the offline model began to stand in for it
        self._lock = threading.Lock()

    @property
    def weights_budget(self) -> WeightsBudget:
        """What one model's weights may take: a visitor's openclip:ViT-bigG-14 would take 10 GiB of a
        shared Space's memory, and the newest model is kept even above the budget."""
        return WeightsBudget(int(self.budget), "this app",
                             "choose a smaller backbone, or raise PETSTUDIO_CACHE_MB where you run the app")

    def refuse_oversized(self, spec: str) -> None:
        """Refuse `spec` when its weights alone would exceed the budget, before a handler takes a folder
        or the device (a load checks again, against what it builds)."""
        self.weights_budget.refuse(spec, estimate_weights_bytes(spec))

    def backbone(self, spec: str, seed: int, local_paths: bool) -> tuple[Backbone, threading.Lock]:
        """The frozen backbone (on the CPU between calls) and the lock a call holds while using it."""
        return self._entry(spec, seed, local_paths)[1]

    def _entry(self, spec: str, seed: int, local_paths: bool,
               taken: bool = False) -> tuple[tuple, tuple[Backbone, threading.Lock], bool]:
        """(its key, its entry, whether this call built it). With `taken`, a `load` takes an entry it did
        not build, which no other load's `forget` may then let go (every handler loads its models
        before its device call uses them, so a load is where another session takes one)."""
        # the seed draws a random init only: every seed of pretrained weights is one model
        key = (spec, seed if parse_spec(spec).weights == "random" else 0, local_paths)
        with self._lock:
            # a load (a handler, before its device call) asks the hub again for a backbone the offline
            # model has stood in for a while: the network may be back
            stale = taken and key in self._stand_ins and time.monotonic() - self._stand_ins[key] > STAND_IN_RETRY_S
            if key in self._backbones and not stale:
                self._backbones.move_to_end(key)
                if taken:
                    self._unshared.discard(key)
                return key, self._backbones[key], False
        try:
            backbone = load_backbone(spec, key[1], fallback_offline=not stale, local_paths=local_paths,
                                     budget=self.weights_budget).eval()
        except BackboneError:
            if not stale:
                raise
            with self._lock:   # still not to be had: the stand-in stays, and the hub is asked again later
                self._stand_ins[key] = time.monotonic()
            return self._entry(spec, seed, local_paths, taken)
        with self._lock:
            if stale and key in self._stand_ins:   # the hub answered: its backbone replaces the stand-in
                self._drop(key)
            entry = self._backbones.setdefault(key, (backbone, threading.Lock()))
            built = entry[0] is backbone
            if built:
                self._unshared.add(key)
                if backbone.fallback_note:
                    self._stand_ins[key] = time.monotonic()
            while len(self._backbones) > 1 and sum(weights_bytes(b) for b, _ in self._backbones.values()) > self.budget:
                self._drop(next(iter(self._backbones)))   # a call using it keeps it alive
            return key, entry, built

    def _drop(self, key: tuple) -> None:
        """Let go of a cache entry (the caller holds the cache's lock)."""
        self._backbones.pop(key)
        self._unshared.discard(key)
        self._stand_ins.pop(key, None)

    def load(self, keys: list[ModelKey]) -> Loaded:
        """Load these models here, before a device call: a ZeroGPU worker is forked from this process
        and inherits what it holds, where a model the worker loads itself is lost with the worker. A
        spec that cannot be loaded is said as the page says core's errors (outside a device call,
        nothing else would), and what this call built for it is let go. A run's weights are refused on
        a model standing in for an unreachable one (they were tuned on the model it replaces)."""
        loaded, refusal = Loaded(), None
        try:
            for key in keys:
                cache_key, (backbone, _), built = self._entry(key.spec, key.seed, key.local_paths, taken=True)
                if built:
                    loaded.built.append((cache_key, backbone))
                if key.run is not None:
                    refuse_stand_in(backbone, key.spec)
                if backbone.fallback_note:
                    loaded.notes.add(backbone.fallback_note)
        except BackboneError as error:
            refusal = str(error)
        if refusal is not None:
            backbone = None   # out here, where no traceback holds what was built
            self.forget(loaded)
            raise views.user_error(BackboneError(refusal))
        return loaded

    def forget(self, loaded: Loaded) -> None:
        """Let go of the backbones a `load` built that no other load has taken from the cache since,
        and hand their memory back to the system (a call still using one keeps it alive until it ends)."""
        with self._lock:
            mine = [key for key, backbone in loaded.built
                    if key in self._unshared and self._backbones[key][0] is backbone]
            for key in mine:
                self._drop(key)
        if loaded.built:
            loaded.built.clear()   # no reference may outlive the hand-back, or its memory stays with the heap
            return_freed_memory()

    def fresh_locks(self) -> None:
        """In a forked child: a lock some thread of the parent held at the fork would never open."""
        self._lock = threading.Lock()
        for key, (backbone, _) in self._backbones.items():
            self._backbones[key] = (backbone, threading.Lock())

    def clear(self) -> None:
        with self._lock:
            self._backbones.clear()
            self._unshared.clear()
            self._stand_ins.clear()

    def __len__(self) -> int:
        return len(self._backbones)

    @contextmanager
    def on(self, call, key: ModelKey) -> Iterator[tuple[Backbone, Optional[PetHandle]]]:
        backbone, lock = self.backbone(key.spec, key.seed, key.local_paths)
        with lock, torch.no_grad():
            handle = None
            try:
                backbone.to(call.device)
                if key.run is not None:
                    handle, _ = attach_run(backbone, key.run, restorable=True)
                    if handle.mergeable:
                        handle.merge()
                with autocast(call.device, autocast_for("auto", call.device)):
                    yield backbone, handle
            finally:
                try:
                    if handle is not None:
                        handle.detach()
                finally:
                    backbone.requires_grad_(False)
                    backbone.to("cpu")


MODELS = ModelCache(CACHE_MB)
os.register_at_fork(after_in_child=MODELS.fresh_locks)


def spec_of(model) -> str:
    """A backbone spec as the page or an API client sent it (the dropdown takes typed values)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        return "offline"
    if not isinstance(model, str):
        raise gr.Error(f"the backbone must be a spec like offline or openclip:NAME:TAG, not {model!r:.60}")
    return model.strip()


def run_model(run: Run) -> ModelKey:
    return ModelKey(run.result.backbone, run.result.seed, run.local_paths, str(run.folder))


def models_for(session: Session, run_name: str, model) -> list[tuple[str, ModelKey]]:
    """(label, model) of the frozen model and, when a run is chosen, the tuned one."""
    run = session.runs.get(run_name) if isinstance(run_name, str) else None
    if run is None:
        return [("frozen", ModelKey(spec_of(model), 0, LOCAL_PATHS))]
    return [("frozen", ModelKey(run.result.backbone, run.result.seed, run.local_paths)),
            (f"tuned ({run.name})", run_model(run))]


def frames_for(session: Session, run_name: str) -> int:
    """Frames per video: as the chosen run was tuned with."""
    run = session.runs.get(run_name) if isinstance(run_name, str) else None
    return run.result.frames if run else DEFAULT_FRAMES


def gallery(session: Session, key: ModelKey,
            frames: int) -> tuple[query.Gallery, Optional[query.GalleryEmbeddings], str]:
    """The dataset's gallery for the model's transform (decoded here, on the CPU), its embeddings
    under that model state when a call has computed them (else None), and the spec of the backbone
    now serving `key`: the offline model standing in for an unreachable one, until the hub answers
    and its own backbone replaces it (then neither the pictures nor the embeddings are the same)."""
    if session.dataset is None:
        raise gr.Error("load a dataset first (Data tab)")
    backbone, _ = MODELS.backbone(key.spec, key.seed, key.local_paths)
    served = backbone.spec
    cached = session.galleries.get((key, served, session.dataset.root, frames))
    if cached is not None:
        return *cached, served
    pictures = (served, key.local_paths, session.dataset.root, frames)   # one transform per backbone
    shared = next((g for (k, s, root, f), (g, _) in session.galleries.items()
                   if (s, k.local_paths, root, f) == pictures), None)
    return shared or query.load_gallery(backbone, session.dataset, frames), None, served


def keep_gallery(session: Session, key: ModelKey, served: str, frames: int, items: query.Gallery,
                 embeddings: query.GalleryEmbeddings) -> None:
    """Keep a gallery's embeddings under one model state (as served by the backbone of spec `served`);
    the GALLERIES_KEPT most recent stay."""
    kept = (key, served, session.dataset.root, frames)
    session.galleries.pop(kept, None)   # the most recent goes last
    session.galleries[kept] = (items, embeddings)
    while len(session.galleries) > GALLERIES_KEPT:
        session.galleries.pop(next(iter(session.galleries)))


def refuse_stand_in(backbone: Backbone, spec: str) -> None:
    """A run's weights on the offline model standing in for the unreachable backbone it was tuned on
    would compute something else: refused."""
    if backbone.fallback_note:
        raise BackboneError(f"this run was tuned on {spec[:200]}, which this app cannot load now: "
                            f"{backbone.fallback_note}")


def served_as(backbone: Backbone, key: ModelKey, served: str) -> None:
    """In a device call: refuse to use a gallery made for the backbone of spec `served` on another (the
    hub answered between the handler and the call, and its backbone replaced the stand-in)."""
    if backbone.spec != served:
        raise BackboneError(f"{key.spec[:200]} can be fetched again and replaced the bundled offline model that stood "
                            f"in for it while you asked: ask again")


def media_path(session: Session, upload: Optional[str], pick: Optional[str]) -> Path:
    """The query's picture or clip: an uploaded file, or one the dataset holds."""
    if upload:
        return Path(upload)
    if session.dataset is not None and pick:
        for item in session.dataset.items:
            if item.media == pick:
                return session.dataset.path(item)
    raise gr.Error("upload a picture or clip, or pick one of the dataset's")


def run_choices(session: Session, selected: Optional[str]) -> tuple:
    """The run pickers of the Ask and Inspect tabs: this session's runs, `selected` chosen."""
    choices = [NO_RUN, *session.runs]
    value = selected if selected in session.runs else (choices[-1] if session.runs else NO_RUN)
    return gr.update(choices=choices, value=value), gr.update(choices=choices, value=value)
