import pytest
import torch

from core.pet import attach
from core.runs import tune
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from tests.conftest import TINY, embeddings
from tests.test_pet import _randomise


def test_openclip_vit_b16_budget_matches_the_paper_scheme(vit_b16):
    handle = attach(vit_b16, "aurora")
    # C 32³ + vision U,V 2·768·32 + text U,V 2·512·32; 12 mode vectors per block, 24 blocks
    assert handle.budget() == {"shared": 32_768 + 49_152 + 32_768, "modes": 24 * 12 * 32}
    assert handle.num_trainable() == 123_904
    handle.detach()
    handle = attach(vit_b16, "aurora", {"gqt": True, "heads": True})
    assert handle.budget() == {"shared": 114_688, "modes": 9_216, "gqt": 12 * 2 * 512, "heads": 768 * 512}
    handle.detach()


def test_starts_exactly_at_the_frozen_model(tiny, batch):
    before = embeddings(tiny, *batch)
    attach(tiny, "aurora", {"gqt": False})
    after = embeddings(tiny, *batch)
    assert (after[0] - before[0]).abs().max() <= 1e-6 and (after[1] - before[1]).abs().max() <= 1e-6


def test_delta_equals_v_mt_u_computed_independently(tiny):
    handle = attach(tiny, "aurora", {"rank": 4, "dropout": 0.0})
    _randomise(handle, seed=1)
    factors = tiny.pet.factors
    U, V, C = factors.U["64"], factors.V["64"], factors.core
    block = tiny.towers["vision"].blocks[1]
    x = torch.randn(2, 5, 64)
    modes = factors.modes["vision"]               # 12 per block: q k v out fc1×4 fc2×4
    mode = lambda i: sum(C[:, :, c] * modes[12 + i][c] for c in range(4))  # noqa: E731
    with torch.no_grad():
        q = block.projections["q"]
        expected_q = x @ (q.weight + V @ mode(0).T @ U).T + q.bias
        assert torch.allclose(q.linear(x)[..., :64], expected_q, atol=1e-5)
        fc1 = block.projections["fc1"]
        delta_fc1 = torch.cat([V @ mode(4 + i).T @ U for i in range(4)], dim=0)
        assert torch.allclose(fc1.linear(x), x @ (fc1.weight + delta_fc1).T + fc1.bias, atol=1e-5)
        fc2 = block.projections["fc2"]
        hidden = torch.randn(2, 5, 256)
        delta_fc2 = torch.cat([V @ mode(8 + i).T @ U for i in range(4)], dim=1)
        assert torch.allclose(fc2.linear(hidden), hidden @ (fc2.weight + delta_fc2).T + fc2.bias, atol=1e-5)


def test_merge_and_unmerge_agree_and_leave_no_extra_computation(tiny, batch):
    handle = attach(tiny, "aurora", {"gqt": True})
    _randomise(handle, seed=2)
    unmerged = embeddings(tiny, *batch)
    handle.merge()
    assert all(not p.deltas for t in tiny.towers.values() for b in t.blocks for p in b.projections.values())
    merged = embeddings(tiny, *batch)
    for a, b in zip(merged, unmerged):
        assert ((a - b).norm() / b.norm()) < 1e-5
    handle.unmerge()
    again = embeddings(tiny, *batch)
    for a, b in zip(again, unmerged):
        assert ((a - b).norm() / b.norm()) < 1e-5


def test_gradients_reach_only_aurora_parameters_and_declared_heads(tiny):
    handle = attach(tiny, "aurora", {"gqt": True, "heads": True, "ice": True})
    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny.tokenize(["a", "b c", "d e f", "g"]), torch.arange(4))
    _randomise(handle, seed=4)
    RetrievalObjective(tiny, data, handle).train()(torch.arange(4)).backward()
    trainable = handle.trainable_parameters()
    assert set(trainable) == {n for n, _ in tiny.named_parameters() if n.startswith("pet.")} | {"model.visual.proj"}
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_readout_has_modes_delta_norms_and_gqt_per_layer(tiny):
    handle = attach(tiny, "aurora", {"gqt": True, "rank": 8})
    _randomise(handle, seed=3)
    readout = handle.gate_readout()
    assert readout["vision.modes.q"].shape == (2, 1, 8) and readout["vision.modes.fc1"].shape == (2, 4, 8)
    assert readout["text.delta_norm.fc2"].shape == (2,) and (readout["text.delta_norm.fc2"] > 0).all()
    assert readout["text.gqt_gamma"].shape == (2, 48) and "vision.gqt_gamma" not in readout
    block = tiny.towers["text"].blocks[1]
    delta = [d for t, i, n, _, d in handle.deltas if (t, i, n) == ("text", 1, "v")][0]
    assert readout["text.delta_norm.v"][1] == pytest.approx(torch.linalg.norm(delta.delta_weight()).item(), rel=1e-5)
    assert block.projections["v"].deltas["aurora"] is delta


def test_aurora_tunes_a_tiny_clip_above_chance(shapes, tmp_path):
    result = tune(TINY, shapes, "aurora", {"rank": 16}, epochs=8, lr=1e-2, seed=0, out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.8 * losses[0]
    assert result.tuned["t2i_r1"] >= 3 * 100 / 24 and result.tuned["t2i_r1"] > result.zero_shot["t2i_r1"]
