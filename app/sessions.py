"""Per-session state, shared by every tab. Every browser tab (and every gradio_client) has its own working folder,
dataset, runs and gallery embeddings, keyed by Gradio's session hash, so no user sees another's
(the frozen backbones are shared, app.models). Galleries are heavy, so they live here rather than in gr.State;
a session is released when its page unloads, or after it has been idle for `idle_limit` seconds
(API clients never unload).

The session hash is chosen by the client, so it never names anything on disk: each session's
folder is a random name the server draws, and every removal goes through `remove_inside`,
which refuses any path that is not strictly inside the sessions root."""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.heap import return_freed_memory

SESSIONS_ROOT = Path(tempfile.gettempdir()) / "petstudio-sessions"
IDLE_LIMIT_SECONDS = 6 * 3600


@dataclass
class Run:
    """A run of this session: tuned here, or loaded from uploaded weights."""

    name: str
    folder: Path
    result: Any                # core.result.RunResult
    local_paths: bool   # whether its backbone may name a server path (never for an uploaded run)


@dataclass
class Session:
    folder: Path
    dataset: Any = None              # core.data.Dataset
    dataset_label: str = ""
    runs: dict[str, Run] = field(default_factory=dict)
    # (model key, the spec of the backbone serving it, dataset, frames) -> (gallery, embeddings)
    galleries: dict[tuple, Any] = field(default_factory=dict)
    live: Optional[Path] = None      # the live folder of the latest tuning (see app/tuning.py)
    live_status: str = ""
    counter: int = 0
    tuning: bool = False             # a tuning is reading this session's data
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def new_folder(self, kind: str, label: str, replacing: bool = False) -> Path:
        """A fresh folder inside this session's own folder: kind/NN-label. `replacing` first removes
        the earlier folders of that kind, for files that are sent and then only wait: Gradio keeps
        its own copy of a file it sent, and an export or a report per click would pile up."""
        if replacing and (self.folder / kind).is_dir():
            for earlier in (self.folder / kind).iterdir():
                remove_inside(self.folder, earlier)
        self.counter += 1
        safe = re.sub(r"[^A-Za-z0-9_]+", "-", label).strip("-") or kind
        folder = self.folder / kind / f"{self.counter:02d}-{safe}"
        folder.mkdir(parents=True)
        return folder


def remove_inside(root: Path, path: Path) -> None:
    """Delete `path` (a folder this app made), but only when it lies strictly inside `root`."""
    root, target = root.resolve(), Path(path)
    if target.is_symlink() or not target.resolve().is_relative_to(root) or target.resolve() == root:
        raise ValueError(f"refusing to remove {path}: not strictly inside {root}")
    shutil.rmtree(target, ignore_errors=True)


class SessionStore:
    def __init__(self, root: Path = SESSIONS_ROOT, idle_limit: float = IDLE_LIMIT_SECONDS):
        self.root, self.idle_limit = root, idle_limit
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_hash: Optional[str]) -> Session:
        if not session_hash:
            raise RuntimeError("no session: the app must be used through Gradio's queue")
        self.sweep()
        with self._lock:
            session = self._sessions.get(session_hash)
            if session is None:
                folder = self.root / secrets.token_hex(16)
                folder.mkdir(parents=True)
                session = self._sessions[session_hash] = Session(folder)
            session.last_used = time.monotonic()
            return session

    def release(self, session_hash: Optional[str]) -> None:
        with self._lock:
            session = self._sessions.pop(session_hash or "", None)
        if session is not None:   # a tuning still running sees its folder gone and stops at its next step
            self.remove(session.folder)
            del session
            return_freed_memory()

    def remove(self, path: Path) -> None:
        remove_inside(self.root, path)

    def sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_limit]
        for key in idle:
            self.release(key)

    def __contains__(self, session_hash: str) -> bool:
        return session_hash in self._sessions


STORE = SessionStore()


def session_of(request) -> Session:
    """The session of a Gradio request (every event handler takes the request)."""
    return STORE.get(request.session_hash)


def release(request) -> None:
    STORE.release(request.session_hash)
