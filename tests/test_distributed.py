"""Training across processes (what torchrun and accelerate set up): two CPU processes on gloo
with batch B train exactly as one process with batch 2B — contrastive negatives are gathered
from every process with their gradients (global negatives)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.backbones import load_backbone
from core.lr_range import choose_lr
from core.pet import attach
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from core.trainer import TrainSettings, train
from tests.conftest import TINY


def _lora_on_16_pairs():
    """LoRA (no dropout) on a tiny CLIP, and 16 random pairs to tune it on."""
    torch.set_num_threads(1)
    backbone = load_backbone(TINY, seed=0)
    torch.manual_seed(0)
    handle = attach(backbone, "lora", {"dropout": 0.0})
    generator = torch.Generator().manual_seed(0)
    data = RetrievalSet(torch.randn(16, 3, 32, 32, generator=generator),
                        backbone.tokenize([f"caption number {i}" for i in range(16)]), torch.arange(16))
    return handle, RetrievalObjective(backbone, data)


def _run(batch_size: int):
    """Two epochs: (PET state, step losses)."""
    handle, objective = _lora_on_16_pairs()
    log = train(objective, handle.trainable_parameters(), TrainSettings(epochs=2, lr=1e-2, batch_size=batch_size, seed=0))
    return handle.state_dict(), log.step_losses


def _range_test(batch_size: int):
    """--lr auto's range test: (its choice, the LoRA weights after it)."""
    handle, objective = _lora_on_16_pairs()
    choice = choose_lr(objective, handle.trainable_parameters(), TrainSettings(epochs=2, batch_size=batch_size, seed=0),
                       fallback=1e-3)
    return choice, handle.state_dict()


def _cancelled_on_one_process(batch_size: int):
    """Four epochs of two global batches, reported every third step, where only the second process
    is asked to stop, at its second check: (steps taken, cancelled)."""
    handle, objective = _lora_on_16_pairs()
    checks = {"count": 0}

    def cancel() -> bool:
        checks["count"] += 1
        return dist.get_rank() == 1 and checks["count"] >= 2

    log = train(objective, handle.trainable_parameters(),
                TrainSettings(epochs=4, lr=1e-2, batch_size=batch_size, log_every=3), cancel=cancel)
    return log.steps, log.cancelled


def _worker(rank: int, world: int, port: int, results, work=_run, batch_size: int = 4):
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = work(batch_size=batch_size)
    finally:
        dist.destroy_process_group()


def _spawn(work, batch_size: int = 4) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results, work, batch_size), nprocs=2, join=True)
    return results


def test_under_two_processes_the_range_test_measures_as_one_and_both_choose_one_rate():
    results = _spawn(_range_test, batch_size=8)
    (choice0, state0), (choice1, state1) = results[0], results[1]
    alone, alone_state = _range_test(batch_size=16)   # what two processes of batch 8 train as
    assert (choice0.lr, choice0.losses) == (choice1.lr, choice1.losses)   # every process chose the same
    # planned as the one process of batch 16 (a test batch of 8 for this short run), each process
    # taking half: not a test batch of 8 in each (16 in all), as planning per process gave
    assert choice0.batch_size == alone.batch_size == 8
    assert choice0.losses == pytest.approx(alone.losses, abs=1e-4) and choice0.lr == alone.lr
    assert choice0.why.startswith("range test")
    for name, tensor in alone_state.items():   # the weights are put back in every process
        assert torch.equal(state0[name], tensor) and torch.equal(state1[name], tensor), name


def test_a_cancel_in_one_process_stops_every_process_at_the_same_step():
    results = _spawn(_cancelled_on_one_process)
    # the processes agree once per logging interval (before steps 1 and 4): both stopped after step 3
    assert results[0] == results[1] == (3, True)


def test_two_processes_of_batch_b_train_as_one_of_batch_2b():
    results = _spawn(_run)
    (state0, losses0), (state1, losses1) = results[0], results[1]
    alone_state, alone_losses = _run(batch_size=8)
    assert len(losses0) == len(alone_losses) == 2 * (16 // 8)     # each process: its half of every global batch
    assert losses0 == pytest.approx(alone_losses, abs=1e-5) and losses1 == pytest.approx(alone_losses, abs=1e-5)
    for name, tensor in alone_state.items():
        assert torch.allclose(state0[name], tensor, atol=1e-5) and torch.equal(state0[name], state1[name]), name
    assert any(tensor.abs().sum() > 0 for name, tensor in alone_state.items() if name.endswith(".up"))   # it trained


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
    # accelerate starts several CPU processes through torchrun with --multi_gpu (its --cpu alone
    # goes through mpirun and an MPI hostfile); the processes then find no GPU and use gloo.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.fixture(scope="module")
def one_process_run(shapes, tmp_path_factory):
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = _cli([], shapes, out, batch_size=8)
    assert done.returncode == 0, done.stderr
    return out


def _cli(launcher: list[str], data, out, batch_size: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}   # the same arithmetic in every process
    # fp32: bf16 (auto's choice on a CPU with avx512_bf16) rounds a batch of 4 otherwise than one of 8,
    # by up to 0.004 in the loss, and the comparison below is of the arithmetic, not of the rounding
    return subprocess.run([sys.executable, *launcher, "-m", "core", "tune", "--model", TINY, "--data", str(data),
                           "--method", "lora", "--dropout", "0", "--shots", "8", "--epochs", "2", "--lr", "1e-2",
                           "--precision", "fp32", "--batch-size", str(batch_size), "--out", str(out), "--json"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_the_cli_under_a_launcher_trains_as_one_process(launcher, shapes, one_process_run, tmp_path):
    import json

    from safetensors.torch import load_file

    done = _cli(LAUNCHERS[launcher], shapes, tmp_path / "run", batch_size=4)
    assert done.returncode == 0, done.stderr
    assert "process 0 of 2 (torch.distributed, gloo)" in done.stderr
    assert "process 1 of 2 (torch.distributed, gloo)" in done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["out"] == str(tmp_path / "run")     # the first process answers
    assert [p.name for p in tmp_path.iterdir()] == ["run"]                      # and writes the one run folder
    two, one = (json.loads((folder / "run.json").read_text()) for folder in (tmp_path / "run", one_process_run))
    assert two["train"]["step_losses"] == pytest.approx(one["train"]["step_losses"], abs=1e-5)
    weights_two, weights_one = (load_file(str(folder / "pet.safetensors")) for folder in (tmp_path / "run",
                                                                                          one_process_run))
    assert all(torch.allclose(weights_two[name], weights_one[name], atol=1e-5) for name in weights_one)


def test_fewer_training_items_than_processes_is_refused_with_a_message(shapes, tmp_path, monkeypatch):
    from core.runs import RunError, tune

    monkeypatch.setattr("core.runs.rank_and_world", lambda: (0, 4))   # as under torchrun --nproc-per-node 4
    with pytest.raises(RunError, match=r"2 training item\(s\) cannot be shared among 4 processes; run fewer"):
        tune(TINY, shapes, "bitfit", shots=2, epochs=1, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
