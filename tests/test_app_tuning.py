"""The app's tuning call crosses a process boundary with pickled arguments, as in ZeroGPU's
worker: its progress and cancel travel through files (app/tuning.py)."""
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

from app.tuning import CANCEL_FILE, read_progress, tune_on_device
from core.world import write_part


def test_progress_and_cancel_reach_a_tuning_in_another_process(tmp_path):
    data = write_part(tmp_path / "data", "novel-colours", 16)
    live = tmp_path / "live"
    live.mkdir()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(tune_on_device, str(live), model="offline", data=data, method="adapter", epochs=50,
                          batch_size=2, out=tmp_path / "run")
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
