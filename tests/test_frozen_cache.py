"""Nothing computed twice (core.tasks.frozen): within a run, what no trainable parameter can
influence is computed once per item and kept — a tower no method touches, the blocks below the
lowest adapted one, the features a linear probe reads — and training gives the same per-step
losses and the same tuned metrics as computing everything every time."""
import os
import socket
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from core.backbones import load_backbone
from core.data import read_dataset
from core.data.shapes import write_shapes_vqa_dataset
from core.pet import attach
from core.pet.lora import LoraHandle, LowRankDelta
from core.runs import tune
from core.tasks import get_task, retrieval, vqa
from core.tasks.frozen import FrozenCache, stochastic_modules
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from core.tasks.vqa import VqaObjective
from core.trainer import TrainSettings, pick_device, train
from tests.conftest import TINY, write_tiny_blip_vqa

REL = 1e-6   # fp32: the kept values are the ones the first pass computed, reused


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: small models train fastest so on a shared CPU, and the arithmetic stays the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sets(backbone, task_name, dataset):
    task = get_task(task_name, dataset)
    return tuple(task.prepare(backbone, [i for i in dataset.split(split) if task.usable(i)])
                 for split in ("train", "test"))


@pytest.fixture(scope="module")
def shapes_sets(shapes, tmp_path_factory):
    backbone = load_backbone(TINY, seed=0)
    return _sets(backbone, "retrieval", read_dataset(shapes, tmp_path_factory.mktemp("read")))


@pytest.fixture(scope="module")
def vqa_sets(tmp_path_factory):
    folder = write_shapes_vqa_dataset(tmp_path_factory.mktemp("vqa") / "data", train_per_pair=2)
    backbone = load_backbone(TINY, seed=0)
    return _sets(backbone, "vqa", read_dataset(folder, tmp_path_factory.mktemp("read")))


def _upper_lora(backbone, lowest: int = 1) -> LoraHandle:
    """A method whose lowest adapted block is above 0: LoRA (no dropout) on q, k, v of every block
    from `lowest` up, in both towers. No bundled method starts above block 0; a future one may."""
    handle = LoraHandle(backbone, "upper_lora", None, group=lambda n: "lora")
    modules, attached = nn.ModuleDict(), []
    for tower_name, tower in backbone.towers.items():
        modules[tower_name] = nn.ModuleDict()
        for block in tower.blocks[lowest:]:
            per_block = modules[tower_name][str(block.index)] = nn.ModuleDict()
            for name in ("q", "k", "v"):
                projection = block.projections[name]
                per_block[name] = LowRankDelta(projection.in_features, projection.out_features, 2, 1.0, 0.0)
                projection.add_delta("upper_lora", per_block[name])
                attached.append(projection)
    handle.on_detach(lambda: [p.remove_delta("upper_lora") for p in attached])
    handle.install(modules)
    return handle


def _run(load, method, options, data, make_objective, cache, epochs=3, batch_size=16, lr=1e-2, bf16=False):
    """Train on a fresh backbone: (step losses, what the cache kept, backbone)."""
    backbone = load()
    torch.manual_seed(0)
    handle = _upper_lora(backbone) if method == "upper_lora" else attach(backbone, method, options)
    objective = make_objective(backbone, data, handle, cache)
    torch.manual_seed(1)   # dropout in the method and BLIP's hard negatives draw from here
    log = train(objective, handle.trainable_parameters(),
                TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=0,
                                  autocast="bf16" if bf16 else None))
    return log.step_losses, objective.frozen.kept(), backbone


def _retrieval(backbone, data, handle, cache):
    return RetrievalObjective(backbone, data, handle, cache_frozen=cache)


def _vqa(backbone, data, handle, cache):
    return VqaObjective(backbone, data, cache_frozen=cache)


def _tiny():
    return load_backbone(TINY, seed=0)


CASES = [   # (method, options, what is kept)
    # (c) a linear probe: the pooled features of both towers, before the projections it trains
    ("linear_probe", {}, {"media.vision": "features", "captions.text": "features"}),
    # (a) a tower no method touches: its embeddings (the method's dropout draws as without the cache)
    ("lora", {"towers": ["text"], "dropout": 0.25}, {"media": "output"}),
    ("vlpet", {"towers": ["text"], "granularity": "small"}, {"media": "output"}),
    ("aurora", {"towers": ["vision"], "rank": 4}, {"captions": "output"}),
    # (b) the blocks below the lowest adapted one
    ("upper_lora", {}, {"media.vision": "block 1", "captions.text": "block 1"}),
    # everything touched: nothing kept
    ("lora", {"dropout": 0.0}, {}),
    ("prompt", {"depth": 1}, {}),
    ("bitfit", {}, {}),
]


@pytest.mark.parametrize("method,options,kept", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}"
                                                            for m, o, _ in CASES])
def test_kept_or_not_the_losses_and_metrics_are_those_computed_every_time(shapes_sets, method, options, kept):
    train_set, test_set = shapes_sets
    cached, what, tuned = _run(_tiny, method, options, train_set, _retrieval, cache=True)
    uncached, nothing, reference = _run(_tiny, method, options, train_set, _retrieval, cache=False)
    assert what == kept and nothing == {}
    assert len(cached) == len(uncached) == 3 * 9
    if kept:
        assert cached == pytest.approx(uncached, rel=REL)
    else:
        assert cached == uncached   # the same computation, step for step
    assert retrieval.evaluate(tuned, test_set) == retrieval.evaluate(reference, test_set)
    assert cached[-1] < cached[0]   # it trained


@pytest.mark.parametrize("method,options,kept", [
    ("linear_probe", {}, {"media.vision": "features", "answers.text": "features"}),
    ("lora", {"towers": ["text"]}, {"media": "output"}),
    ("prompt", {"towers": ["vision"]}, {"answers": "output"}),   # each question-answer text, once
    ("upper_lora", {}, {"media.vision": "block 1", "answers.text": "block 1"}),
])
def test_vqa_on_a_dual_encoder_keeps_frozen_images_and_answer_texts(vqa_sets, method, options, kept):
    train_set, test_set = vqa_sets
    cached, what, tuned = _run(_tiny, method, options, train_set, _vqa, cache=True, epochs=2)
    uncached, _, reference = _run(_tiny, method, options, train_set, _vqa, cache=False, epochs=2)
    assert what == {**kept, "prompt_tokens": "output"}   # every question-answer text is tokenized once
    assert cached == pytest.approx(uncached, rel=REL)
    assert vqa.evaluate(tuned, test_set) == vqa.evaluate(reference, test_set)


def test_bf16_autocast_keeps_what_it_computed_and_trains_the_same(shapes_sets):
    """The first pass runs under the trainer's autocast; what is kept is what it produced, in its dtype."""
    train_set, test_set = shapes_sets
    for method, options in (("linear_probe", {}), ("lora", {"towers": ["text"], "dropout": 0.0})):
        cached, what, _ = _run(_tiny, method, options, train_set, _retrieval, cache=True, epochs=2, bf16=True)
        uncached, _, _ = _run(_tiny, method, options, train_set, _retrieval, cache=False, epochs=2, bf16=True)
        assert what
        assert cached == pytest.approx(uncached, rel=1e-3)   # equal here; bf16 rounding may differ elsewhere


def test_videos_keep_every_frame(tiny):
    """A video's frames go through the tower as rows of their own: each is kept."""
    generator = torch.Generator().manual_seed(0)
    data = RetrievalSet(torch.randn(8, 3, 3, 32, 32, generator=generator),
                        tiny.tokenize([f"clip number {i}" for i in range(8)]), torch.arange(8))
    cached, what, _ = _run(_tiny, "linear_probe", {}, data, _retrieval, cache=True, batch_size=4)
    uncached, _, _ = _run(_tiny, "linear_probe", {}, data, _retrieval, cache=False, batch_size=4)
    assert what == {"media.vision": "features", "captions.text": "features"}
    assert cached == pytest.approx(uncached, rel=REL)


@pytest.fixture(scope="module")
def blip_sets(shapes, tiny_blip_folder, tmp_path_factory):
    backbone = load_backbone(f"blip:{tiny_blip_folder}")
    return _sets(backbone, "retrieval", read_dataset(shapes, tmp_path_factory.mktemp("read")))


@pytest.mark.parametrize("method,options,kept", [
    ("linear_probe", {}, {"media_tokens": "output", "text_cls": "output"}),
    ("lora", {"towers": ["text"]}, {"media_tokens": "output"}),            # vision tokens for ITC and ITM
    ("aurora", {"towers": ["vision"], "rank": 4}, {"text_cls": "output"}),
    ("aurora", {"towers": ["vision"], "rank": 4, "gqt": True}, {"text_cls": "output"}),  # gates act fused only
    ("lora", {}, {}),
])
def test_blip_retrieval_keeps_frozen_vision_tokens_and_text(blip_sets, tiny_blip_folder, method, options, kept):
    train_set, test_set = blip_sets
    assert stochastic_modules(load_backbone(f"blip:{tiny_blip_folder}")) == []   # BLIP has no active dropout
    load = lambda: load_backbone(f"blip:{tiny_blip_folder}")  # noqa: E731
    cached, what, tuned = _run(load, method, options, train_set, _retrieval, cache=True, epochs=2)
    uncached, _, reference = _run(load, method, options, train_set, _retrieval, cache=False, epochs=2)
    assert what == kept
    assert cached == pytest.approx(uncached, rel=REL)
    assert retrieval.evaluate(tuned, test_set) == retrieval.evaluate(reference, test_set)


def test_blip_vqa_keeps_the_frozen_vision_tokens(tmp_path):
    folder = write_tiny_blip_vqa(tmp_path / "blip-vqa")
    load = lambda: load_backbone(f"blip-vqa:{folder}")  # noqa: E731
    data = write_shapes_vqa_dataset(tmp_path / "data", train_per_pair=1, colours=("red", "blue"))
    train_set, _ = _sets(load(), "vqa", read_dataset(data, tmp_path / "read"))
    for method, options, kept in (("vlpet", {"towers": ["text", "decoder"]}, {"media_tokens": "output"}),
                                  ("vlpet", {}, {})):
        cached, what, _ = _run(load, method, options, train_set, _vqa, cache=True, epochs=2, batch_size=4)
        uncached, _, _ = _run(load, method, options, train_set, _vqa, cache=False, epochs=2, batch_size=4)
        assert what == kept
        assert cached == pytest.approx(uncached, rel=REL)


def test_runs_use_it_and_the_memory_cap_turns_it_off(shapes, tmp_path, monkeypatch):
    """Through `tune`: the same losses and scores with the cache, without it
    (PETSTUDIO_FROZEN_CACHE_MB=0) and with a cap too small for anything to be kept."""
    results = {}
    for cap in ("2048", "0", "0.001"):
        monkeypatch.setenv("PETSTUDIO_FROZEN_CACHE_MB", cap)
        results[cap] = tune(TINY, shapes, "lora", {"towers": ["text"]}, shots=16, epochs=2, lr=1e-2,
                            batch_size=8, precision="fp32", out=tmp_path / cap.replace(".", "_"))
    reference = results["0"]
    # tune trains on the GPU where there is one, and there the kept features and a step's own come from
    # different fast kernels (attention, TF32 convolution): on an H200 the losses parted by 9e-6 from the
    # third step, and agreed exactly with SDPA's math kernel and TF32 off; two uncached runs agree exactly
    rel = REL if pick_device().type == "cpu" else 1e-4
    for cap in ("2048", "0.001"):
        assert results[cap].train.step_losses == pytest.approx(reference.train.step_losses, rel=rel)
        assert results[cap].tuned == reference.tuned


def _objective_with_probe(tiny, shapes_sets):
    train_set, _ = shapes_sets
    handle = attach(tiny, "linear_probe")
    return RetrievalObjective(tiny, train_set, cache_frozen=True).train(), handle


def test_it_is_emptied_when_what_it_assumed_changes(tiny, shapes_sets):
    objective, handle = _objective_with_probe(tiny, shapes_sets)
    batch = torch.arange(8)
    objective(batch)
    assert objective.frozen.kept() == {"media.vision": "features", "captions.text": "features"}
    # A frozen weight changed in place (as merging does): what was kept is stale.
    q = tiny.towers["vision"].blocks[0].projections["q"]
    q.add_to_weight(0.5 * torch.randn_like(q.weight))
    fresh = RetrievalObjective(tiny, objective.data, cache_frozen=False).train()
    assert objective(batch).item() == pytest.approx(fresh(batch).item(), rel=REL)
    assert objective(batch).item() == pytest.approx(fresh(batch).item(), rel=REL)   # kept anew, from the new weight
    # Another method attached: the vision tower is now adapted from its first block.
    handle.detach()
    attach(tiny, "lora", {"towers": ["vision"], "dropout": 0.0})
    objective(batch)
    assert objective.frozen.kept() == {"captions": "output"}
    # Under no_grad nothing can be probed: nothing is kept.
    cache = FrozenCache(tiny)
    with torch.no_grad():
        cache.rows("media", torch.arange(2), lambda ids: tiny.encode_image(objective.data.pixels[ids]), 72)
    assert cache.kept() == {}


def test_a_tap_serves_only_the_thread_of_its_call(tiny, shapes_sets):
    """While a training call holds the towers' taps, another thread's encoding (an app scoring on the
    same backbone) runs the towers as ever."""
    objective, _ = _objective_with_probe(tiny, shapes_sets)
    images = torch.arange(4)
    keep = lambda ids: tiny.encode_image(objective.data.pixels[ids])  # noqa: E731
    objective.frozen.rows("media", images, keep, 72)
    assert objective.frozen.kept() == {"media.vision": "features"}
    other_pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tiny.encode_image(other_pixels)
    seen = []

    def keep_and_meanwhile(ids):
        thread = threading.Thread(target=lambda: seen.append(tiny.encode_image(other_pixels).detach()))
        thread.start()
        thread.join()
        return keep(ids)

    kept = objective.frozen.rows("media", images, keep_and_meanwhile, 72)
    assert torch.equal(seen[0], expected)
    with torch.no_grad():
        assert torch.allclose(kept, keep(images), rtol=REL, atol=0)


def test_frozen_parts_that_train_differently_are_never_kept(tiny, shapes_sets):
    """Dropout in a frozen part (here open_clip's patch dropout) draws anew each pass: refused."""
    from open_clip.transformer import PatchDropout

    assert stochastic_modules(tiny) == []   # open_clip towers have no active dropout
    objective, _ = _objective_with_probe(tiny, shapes_sets)
    tiny.model.visual.patch_dropout = PatchDropout(0.5)
    assert stochastic_modules(tiny) == ["model.visual.patch_dropout"]
    objective(torch.arange(8))
    objective(torch.arange(8))
    assert objective.frozen.kept() == {}
    objective.eval()   # in eval mode the dropout does nothing: keeping is safe again
    with torch.enable_grad():
        objective(torch.arange(8))
    assert objective.frozen.kept()


def _ddp_run(cache: bool, batch_size: int):
    torch.set_num_threads(1)
    backbone = load_backbone(TINY, seed=0)
    torch.manual_seed(0)
    handle = attach(backbone, "lora", {"towers": ["text"], "dropout": 0.0})
    generator = torch.Generator().manual_seed(0)
    data = RetrievalSet(torch.randn(16, 3, 32, 32, generator=generator),
                        backbone.tokenize([f"caption number {i}" for i in range(16)]), torch.arange(16))
    objective = RetrievalObjective(backbone, data, cache_frozen=cache)
    log = train(objective, handle.trainable_parameters(), TrainSettings(epochs=3, lr=1e-2, batch_size=batch_size))
    return handle.state_dict(), log.step_losses, objective.frozen.kept()


def _ddp_worker(rank: int, world: int, port: int, results):
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = _ddp_run(cache=True, batch_size=4)
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_each_process_keeps_its_own_rows():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    alone_state, alone_losses, _ = _ddp_run(cache=False, batch_size=8)
    for rank in (0, 1):
        state, losses, kept = results[rank]
        assert kept == {"media": "output"}
        assert losses == pytest.approx(alone_losses, abs=1e-5)
        for name, tensor in alone_state.items():
            assert torch.allclose(state[name], tensor, atol=1e-5), name
