"""The trainer under torch.distributed (what torchrun sets up): two CPU processes, gloo."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.backbones import load_backbone
from core.pet import attach
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from core.trainer import TrainSettings, train
from tests.conftest import TINY


def _worker(rank: int, world: int, port: int, results):
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        backbone = load_backbone(TINY, seed=0)
        torch.manual_seed(0)
        handle = attach(backbone, "lora", {"dropout": 0.0})
        generator = torch.Generator().manual_seed(0)
        data = RetrievalSet(torch.randn(16, 3, 32, 32, generator=generator),
                            backbone.tokenize([f"caption number {i}" for i in range(16)]), torch.arange(16))
        log = train(RetrievalObjective(backbone, data), handle.trainable_parameters(),
                    TrainSettings(epochs=2, lr=1e-2, batch_size=4, seed=0))
        results[rank] = (handle.state_dict(), log.step_losses)
    finally:
        dist.destroy_process_group()


def test_ddp_keeps_replicas_identical_and_splits_the_batches():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    (state0, losses0), (state1, losses1) = results[0], results[1]
    assert len(losses0) == len(losses1) == 2 * (16 // 4) // 2   # each rank: half the batches
    assert losses0 != losses1                                    # ... and a different half
    assert all(torch.equal(state0[n], state1[n]) for n in state0)
    assert any(state0[n].abs().sum() > 0 for n in state0 if n.endswith(".up"))  # and they trained
