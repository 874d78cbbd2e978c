"""The app as users get it: `python app.py` in its own process, on a free local port, offline.
Its temporary folder is the test's own, so the tests can see each session's working folder."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORLD = "Offline world: novel colours (image-text, VQA)"
PHOTOS = "Photos: 8 photographs with captions and questions (image-text, VQA)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROCESSES: dict[str, subprocess.Popen] = {}   # the running app of each url


def serve(temp: Path, **environment: str):
    """Start `python app.py` with its temporary folder in `temp`; yields its url, then stops it."""
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "TMPDIR": str(temp),
           "GRADIO_TEMP_DIR": str(temp / "gradio"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PETSTUDIO_MAX_UPLOAD": "5mb",
           "PETSTUDIO_LOCAL_PATHS": "1", "GRADIO_HEARTBEAT_INTERVAL": "0.5", **environment}
    log = open(temp / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the app did not start:\n{(temp / 'app.log').read_text()}")
            time.sleep(0.5)
    PROCESSES[url] = process
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """(url, sessions folder) of a running app."""
    temp = tmp_path_factory.mktemp("app-tmp")
    for url in serve(temp):
        yield url, temp / "petstudio-sessions"


@pytest.fixture
def client(app_server):
    from gradio_client import Client

    return Client(app_server[0], verbose=False)


@pytest.fixture
def app_pid(app_server) -> int:
    return PROCESSES[app_server[0]].pid


def resident_mib(pid: int) -> float:
    """The process's resident memory (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
