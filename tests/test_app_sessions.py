"""Per-session state of the app (app/sessions.py): own folders, released on unload or when idle."""
import time

import pytest

from app.sessions import SessionStore
from app.tuning import cancelled


def test_each_session_has_its_own_folder_and_runs(tmp_path):
    store = SessionStore(tmp_path)
    alice, bob = store.get("alice-hash"), store.get("bob-hash")
    assert alice is store.get("alice-hash") and alice is not bob
    assert alice.folder != bob.folder and alice.folder.parent == bob.folder.parent == tmp_path
    first = alice.new_folder("runs", "aurora")
    second = alice.new_folder("runs", "../../escape me")
    assert first.name == "01-aurora" and second.name == "02-escape-me"
    assert second.parent == alice.folder / "runs"
    assert not (bob.folder / "runs").exists()


def test_release_removes_the_folder_and_stops_a_running_tuning(tmp_path):
    store = SessionStore(tmp_path)
    session = store.get("abc")
    (session.new_folder("runs", "lora") / "pet.safetensors").write_bytes(b"x")
    live = session.new_folder("live", "lora")
    assert not cancelled(live)
    store.release("abc")
    assert not session.folder.exists() and "abc" not in store
    assert cancelled(live)   # what a tuning of the session checks after every step
    store.release("never-seen")   # an unknown session is nothing to release


def test_idle_sessions_are_swept(tmp_path):
    store = SessionStore(tmp_path, idle_limit=0.05)
    idle = store.get("idle")
    time.sleep(0.1)
    active = store.get("active")   # every access sweeps
    assert not idle.folder.exists() and "idle" not in store and active.folder.exists()


def test_a_request_without_session_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="no session"):
        SessionStore(tmp_path).get(None)


@pytest.mark.parametrize("hostile", ["-", "..", "/", ".", "", "%2e%2e", "../../etc", "a" * 3000, "\0", "☃"])
def test_a_hostile_session_hash_names_nothing_on_disk(tmp_path, hostile):
    store = SessionStore(tmp_path / "sessions")
    victim = store.get("victim")
    (victim.new_folder("runs", "lora") / "pet.safetensors").write_bytes(b"weights")
    (tmp_path / "outside.txt").write_text("not the app's")
    if not hostile:
        with pytest.raises(RuntimeError, match="no session"):
            store.get(hostile)
        return
    attacker = store.get(hostile)
    assert attacker.folder.parent == store.root and len(attacker.folder.name) == 32   # drawn by the server
    store.release(hostile)
    store.sweep()
    assert not attacker.folder.exists() and store.root.is_dir()
    assert (victim.folder / "runs" / "01-lora" / "pet.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "outside.txt").read_text() == "not the app's"


def test_nothing_outside_the_sessions_root_is_ever_removed(tmp_path):
    from app.sessions import remove_inside

    root = tmp_path / "sessions"
    (root / "a").mkdir(parents=True)
    (tmp_path / "keep").mkdir()
    (root / "link").symlink_to(tmp_path / "keep")
    for path in (root, tmp_path / "keep", root / "..", root / "a" / ".." / "..", root / "link"):
        with pytest.raises(ValueError, match="refusing to remove"):
            remove_inside(root, path)
    assert root.is_dir() and (tmp_path / "keep").is_dir()
    remove_inside(root, root / "a")
    assert not (root / "a").exists()
