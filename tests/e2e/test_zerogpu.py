"""The app as a ZeroGPU Space serves it: `python app.py` with a stand-in `spaces` module whose GPU
marks the calls it wraps and records the seconds each asks for and whether the visitor's Gradio
request reached it, pickling what crosses it and keeping only a gr.Error's message as ZeroGPU does; any nn.Module forward outside a marked call (torchvision's transforms aside)
is recorded and fails. A visitor then goes through every tab with gradio_client."""
import json
import re
import textwrap
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.e2e.conftest import WORLD, serve

STAND_IN = '''
"""Stand-in for ZeroGPU's `spaces` (tests/e2e/test_zerogpu.py)."""
import functools
import json
import os
import pickle
import threading

import gradio as gr
import torch

RECORD = os.environ["STAND_IN_SPACES_RECORD"]
_inside = threading.local()


def _record(**line):
    with open(RECORD, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\\n")


def GPU(function=None, duration=60):
    def wrap(work):
        @functools.wraps(work)
        def call(*args, **kwargs):
            from gradio.context import LocalContext

            asked = duration(*args, **kwargs) if callable(duration) else duration
            _record(call=getattr(args[0], "__name__", "?"), duration=asked,
                    request=LocalContext.request.get(None) is not None)
            # as in a ZeroGPU worker: arguments and result cross a process boundary pickled, and
            # an error keeps its message only when it is a gr.Error
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            _inside.depth = getattr(_inside, "depth", 0) + 1
            try:
                return pickle.loads(pickle.dumps(work(*args, **kwargs)))
            except gr.Error:
                raise
            except Exception as error:
                raise gr.Error(type(error).__name__) from None
            finally:
                _inside.depth -= 1
        return call
    return wrap(function) if function is not None else wrap


_forward = torch.nn.Module.__call__


def _guarded(module, *args, **kwargs):
    if getattr(_inside, "depth", 0) == 0 and not type(module).__module__.startswith("torchvision.transforms"):
        _record(outside=type(module).__name__)
        raise RuntimeError(f"{type(module).__name__} computed outside a GPU call")
    return _forward(module, *args, **kwargs)


torch.nn.Module.__call__ = _guarded
'''


@pytest.fixture(scope="module")
def zero_gpu(tmp_path_factory):
    """(client, the record of GPU calls) of an app served with the stand-in `spaces`."""
    temp = tmp_path_factory.mktemp("zerogpu")
    (temp / "stand-in" / "spaces").mkdir(parents=True)
    (temp / "stand-in" / "spaces" / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    record = temp / "gpu-calls.jsonl"
    for url in serve(temp, PYTHONPATH=str(temp / "stand-in"), SPACES_ZERO_GPU="true",
                     STAND_IN_SPACES_RECORD=str(record)):
        yield Client(url, verbose=False), record


def _calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_every_tab_computes_inside_one_gpu_entry_with_the_visitors_request(zero_gpu, tmp_path):
    client, record = zero_gpu
    _, _, _, ask_pick, _ = client.predict(WORLD, api_name="/load_sample")
    picture = ask_pick["value"]
    estimate = client.predict("offline", "retrieval", "aurora", 16, 2, 8, api_name="/estimate_for_epochs")
    asked = int(re.search(r"asks the GPU for ~(\d+) s", estimate).group(1))

    card, _, weights, ask_run, _, status = client.predict(
        model="offline", task="retrieval", method="aurora", options={}, shots=16, epochs=2, lr=None, batch_size=8,
        precision="auto", answers="", frames=8, recipe="studio", api_name="/tune")
    run = ask_run["value"]
    assert status.startswith("done in") and run == "1 · aurora · offline"
    tuning = [c for c in _calls(record) if c.get("call") == "tune_on_device"]
    assert [c["duration"] for c in tuning] == [asked] and 0 < asked <= 120   # what the Tune tab said before Start

    frozen, tuned = client.predict("a small pink circle", run, "offline", api_name="/search_text")
    assert len(frozen) == len(tuned) == 5
    with pytest.raises(AppError, match="type a text"):   # a user error raised inside the call keeps its words
        client.predict("  ", run, "offline", api_name="/search_text")
    frozen, tuned = client.predict(None, picture, run, "offline", api_name="/search_media")
    assert len(frozen["data"]) == len(tuned["data"]) == 5
    frozen, tuned, _ = client.predict(None, picture, "what colour is the shape?", "", run, "offline",
                                      api_name="/answer")
    assert len(frozen["confidences"]) == len(tuned["confidences"]) == 5
    budget, gates, _, _ = client.predict(run, picture, api_name="/inspect")
    assert "Aurora" in json.loads(gates["plot"])["layout"]["title"]["text"]
    report = client.predict(run, api_name="/run_report")
    assert "<h1>PET Studio: aurora on offline</h1>" in Path(report).read_text()
    card, loaded, _ = client.predict([handle_file(f) for f in weights], api_name="/load_weights")
    assert "(uploaded)" in loaded["value"]
    table, _, sweep_report, sweep_status, _, _ = client.predict(
        "offline", "retrieval", ["bitfit"], {}, "0", 8, 1, 8, 8, "auto", "studio", api_name="/compare_methods")
    assert sweep_status.startswith("1 runs in") and Path(sweep_report).is_file()

    calls = _calls(record)
    assert not [c for c in calls if "outside" in c]   # nothing computed outside a GPU call
    made = [c for c in calls if "call" in c]
    assert {c["call"] for c in made} >= {"tune_on_device", "_search_text_on", "_search_media_on", "_answer_on",
                                         "_read_gates_on", "report_on_device", "sweep_on_device", "_attach_on"}
    assert all(c["request"] for c in made)            # the visitor's quota and login reach every call
    queries = [c["duration"] for c in made if c["call"].startswith(("_search", "_answer", "_read"))]
    assert all(0 < seconds <= 60 for seconds in queries)
