"""The app's tuning call crosses a process boundary with pickled arguments, as in ZeroGPU's
worker: its progress and cancel travel through files, and its GPU grant's end stops training
in time to score and save (app/tuning.py)."""
import json
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from app.device import MARGIN, Call, scoring_seconds
from app.tuning import CANCEL_FILE, PROGRESS_FILE, read_progress, training_steps, tune_on_device
from core import checkpoint
from core.world import write_part

CPU = torch.device("cpu")


def test_progress_and_cancel_reach_a_tuning_in_another_process(tmp_path):
    data = write_part(tmp_path / "data", "novel-colours", 16)
    live = tmp_path / "live"
    live.mkdir()
    arguments = dict(model="offline", data=data, method="adapter", epochs=50, batch_size=2, out=tmp_path / "run")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(tune_on_device, Call(CPU), str(live), 4, arguments)
        deadline = time.monotonic() + 300
        while len(read_progress(live)) < 3 and not job.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        (live / CANCEL_FILE).touch()
        result = job.result()
    steps = read_progress(live)
    assert result.train.cancelled and 3 <= len(steps) < steps[0]["total_steps"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert [s["loss"] for s in steps] == result.train.step_losses
    assert (tmp_path / "run" / "pet.safetensors").is_file()


def test_a_tuning_out_of_gpu_time_is_scored_and_saved(tmp_path):
    """Training stops at the grant's end less two scorings of the test split (with the margin);
    the run is scored, saved and says so."""
    data = write_part(tmp_path / "data", "novel-colours", 16)
    live = tmp_path / "live"
    live.mkdir()
    test_items = 4
    grant_end = time.monotonic() + MARGIN * 2 * scoring_seconds("offline", test_items) + 15.0
    result = tune_on_device(Call(CPU, grant_end), str(live), test_items,
                            dict(model="offline", data=data, method="adapter", epochs=200, batch_size=2, lr=1e-2,
                                 out=tmp_path / "run"))
    assert result.train.out_of_time and not result.train.cancelled
    taken = len(result.train.step_losses)
    # Every step of the run was reported; a restart (this rate can diverge in batches of 2) reports
    # again the steps after the epoch it went back to, and the live curve keeps the later reports.
    reported = training_steps(live)
    assert 0 < taken and [step["step"] for step in reported] == list(range(1, taken + 1))
    assert [step["loss"] for step in reported] == result.train.step_losses
    planned = int(re.search(rf"after {taken} of (\d+) steps", result.note).group(1))
    assert taken < planned and "GPU time limit" in result.note
    saved, _ = checkpoint.read(tmp_path / "run")
    assert saved.train.out_of_time and saved.tuned == result.tuned
    assert time.monotonic() < grant_end   # done, scored and saved within the grant


def test_the_live_curve_keeps_a_restarts_reports_of_the_steps_it_trains_again(tmp_path):
    """Steps 1-6, a restart back to the end of step 4 (epoch 2), steps 5-6 again; then a
    comparison's second run, announced by a line without a loss, from its step 1."""
    lines = [{"step": s, "loss": float(s)} for s in range(1, 7)] + [{"step": s, "loss": s / 10} for s in (5, 6)]
    lines += [{"step": 0, "loss": None, "run": 2}, {"step": 1, "loss": 9.0, "run": 2}]
    lines = [{"run": 1, **line} for line in lines[:8]] + lines[8:]
    (tmp_path / PROGRESS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(s["run"], s["step"], s["loss"]) for s in training_steps(tmp_path)] == [
        (1, 1, 1.0), (1, 2, 2.0), (1, 3, 3.0), (1, 4, 4.0), (1, 5, 0.5), (1, 6, 0.6), (2, 1, 9.0)]
