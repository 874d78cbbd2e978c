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


def _authors_mlp_blocks(mode, first: int, rank: int) -> list[torch.Tensor]:
    """The authors' CP/vit.py MLP layout, element by element: CPc[:, :, first:first+4] read
    row-major as R×4R, so its column 4j+m is column j of mode m; B_q is columns qR … qR+R−1."""
    blocks = []
    for q in range(4):
        B = torch.empty(rank, rank)
        for a in range(rank):
            for i in range(rank):
                j, m = divmod(q * rank + i, 4)
                B[a, i] = mode(first + m)[a, j]
        blocks.append(B)
    return blocks


def test_mlp_deltas_follow_the_authors_layout_every_quarter_mixing_all_four_modes(tiny):
    handle = attach(tiny, "aurora", {"rank": 4, "dropout": 0.0})
    _randomise(handle, seed=3)
    factors = tiny.pet.factors
    U, V, C = factors.U["64"], factors.V["64"], factors.core
    modes = factors.modes["vision"]
    mode = lambda i: sum(C[:, :, c] * modes[12 + i][c] for c in range(4))  # noqa: E731  (block 1)
    block = tiny.towers["vision"].blocks[1]
    fc1, fc2 = block.projections["fc1"], block.projections["fc2"]
    x, hidden = torch.randn(2, 5, 64), torch.randn(2, 5, 256)
    with torch.no_grad():
        b1, b2 = _authors_mlp_blocks(mode, 4, 4), _authors_mlp_blocks(mode, 8, 4)
        # fc1: hidden quarter q gets V((U x) B_q)
        expected_fc1 = torch.cat([((x @ U.T) @ b) @ V.T for b in b1], dim=-1)
        assert torch.allclose(fc1.linear(x) - (x @ fc1.weight.T + fc1.bias), expected_fc1, atol=1e-5)
        # fc2: V(Σ_q (U x_q) B_qᵀ) over the input's four quarters
        quarters = hidden.chunk(4, dim=-1)
        expected = sum(((xq @ U.T) @ b.T) for xq, b in zip(quarters, b2)) @ V.T
        assert torch.allclose(fc2.linear(hidden) - (hidden @ fc2.weight.T + fc2.bias), expected, atol=1e-5)
        # not the layout that gives each quarter its own mode vector (same count, other function)
        own = torch.cat([((x @ U.T) @ mode(4 + q)) @ V.T for q in range(4)], dim=-1)
        assert (own - expected_fc1).norm() > 0.1 * own.norm()
        # merged weights are exact: ΔW = V B_qᵀ U (fc1 rows) and V B_q U (fc2 columns)
        handle.merge()
        merged1, merged2 = fc1.linear(x), fc2.linear(hidden)
        handle.unmerge()
        assert torch.allclose(merged1, fc1.linear(x), atol=1e-5)
        assert torch.allclose(merged2, fc2.linear(hidden), atol=1e-5)


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


def test_a_towers_mode_matrices_are_computed_once_per_pass_and_kept_by_none(tiny, monkeypatch):
    """Every projection's delta takes its mode matrices from the shared core: a tower's are computed once
    per forward pass through it (the offline model has 48 projections), and nothing of a pass is kept
    after it, so whatever changes the weights between passes (an optimizer step, a restore) is seen;
    losses and gradients are those of computing each projection's own."""
    import copy
    import core.pet.aurora as aurora

    handle = attach(tiny, "aurora", {"rank": 4, "dropout": 0.0})
    _randomise(handle, seed=5)
    params = handle.trainable_parameters()
    factors = tiny.pet.factors
    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny.tokenize(["a", "b c", "d e f", "g"]), torch.arange(4))
    objective, ids = RetrievalObjective(tiny, data, handle).train(), torch.arange(4)

    def gradients(*losses) -> dict:
        for p in params.values():
            p.grad = None
        for loss in losses:
            loss.backward()
        return {name: p.grad.clone() for name, p in params.items()}

    def reference() -> tuple:   # every projection computes its own
        with monkeypatch.context() as each_its_own:
            each_its_own.setattr(aurora.AuroraFactors, "pass_mode_matrices", aurora.AuroraFactors.mode_matrices)
            loss = objective(ids)
            return loss.detach(), gradients(loss)

    expected_loss, expected = reference()
    computed, einsum = [], torch.einsum
    monkeypatch.setattr(aurora.torch, "einsum", lambda *args: computed.append(args[0]) or einsum(*args))
    loss = objective(ids)
    assert len(computed) == 2 and torch.allclose(loss, expected_loss, atol=1e-6)   # the two towers, once each
    assert factors._pass_modes == {} and factors._last_projection is None   # nothing kept after the pass
    got = gradients(loss)
    assert all(torch.allclose(got[name], expected[name], atol=1e-6) for name in expected)
    got = gradients(objective(ids), objective(ids))   # two passes, two backward passes
    assert len(computed) == 6 and all(torch.allclose(got[name], 2 * expected[name], atol=1e-5) for name in expected)
    objective(ids)   # a pass with no backward, then weights changed in a way no version counter records
    with torch.no_grad():
        params["pet.factors.core"].data.add_(0.01)
    changed = objective(ids)
    monkeypatch.undo()
    assert torch.allclose(changed, reference()[0], atol=1e-6) and not torch.allclose(changed, expected_loss)
    with torch.no_grad():   # a pass computed while the factors were frozen keeps nothing either
        objective(ids)
    assert all(g is not None for g in gradients(objective(ids)).values())
    objective(ids)
    copy.deepcopy(factors)   # no tensor of a pass left behind in the module


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
