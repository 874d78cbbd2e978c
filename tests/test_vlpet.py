import pytest
import torch

from core.pet import PetError, attach
from core.runs import tune
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from tests.conftest import TINY, embeddings
from tests.test_pet import _randomise

GRANULARITIES = ["small", "middleX", "middleY", "large"]


def test_budget_on_vit_b16_matches_the_closed_form(vit_b16):
    handle = attach(vit_b16, "vlpet", {"granularity": "large"})

    def per_tower(d, r):   # 12 blocks, 2 sites: adapter d→r→d, gate d→g→d (g = r), 2 LayerNorms
        adapter = d * r + r + r * d + d
        gate = d * r + r + r * d + d
        return 12 * 2 * adapter, 12 * 2 * gate, 12 * 2 * 2 * d

    vision, text = per_tower(768, 96), per_tower(512, 64)
    assert handle.budget() == {"adapters": vision[0] + text[0], "gates": vision[1] + text[1],
                               "layernorms": vision[2] + text[2]}
    handle.detach()
    per_site = {"small": lambda d: 2 * d + 1,     # w·[X; Y] + b
                "middleX": lambda d: d + 1,       # w·(X + Y) + b
                "middleY": lambda d: d}           # z
    for granularity, gate in per_site.items():
        handle = attach(vit_b16, "vlpet", {"granularity": granularity})
        assert handle.budget()["gates"] == 24 * gate(768) + 24 * gate(512), granularity
        assert handle.budget()["adapters"] == vision[0] + text[0]
        handle.detach()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gate_readout_shapes_for_both_towers(tiny, batch, granularity):
    handle = attach(tiny, "vlpet", {"granularity": granularity})
    readout = handle.gate_readout(*batch)
    assert set(readout) == {f"{t}.{i}.{s}" for t in ("vision", "text") for i in (0, 1) for s in ("attn", "mlp")}
    text_tokens = int((batch[1] != 0).sum(dim=1).max())
    expected = {"small": {"vision": (3,), "text": (3,)},
                "middleX": {"vision": (3, 17), "text": (3, text_tokens)},
                "middleY": {"vision": (64,), "text": (48,)},
                "large": {"vision": (3, 17, 64), "text": (3, text_tokens, 48)}}[granularity]
    for name, gate in readout.items():
        assert tuple(gate.shape) == expected[name.split(".")[0]], name
        assert torch.allclose(gate, torch.ones_like(gate))       # identity start: G = 1


@pytest.mark.parametrize("granularity", ["middleX", "large"])
def test_vision_token_gates_map_onto_the_patch_grid(tiny, batch, granularity):
    handle = attach(tiny, "vlpet", {"granularity": granularity, "init": "paper"})
    gate = handle.gate_readout(pixels=batch[0])["vision.1.attn"]
    grid = handle.patch_map(gate)
    assert grid.shape == (3, 4, 4)
    flat = gate if gate.ndim == 2 else gate.mean(-1)
    assert grid[1, 2, 3] == flat[1, 1 + 2 * 4 + 3]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_identity_init_keeps_the_frozen_model(tiny, batch, granularity):
    before = embeddings(tiny, *batch)
    attach(tiny, "vlpet", {"granularity": granularity})
    after = embeddings(tiny, *batch)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(after, before))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_paper_init_changes_outputs_with_sigmoid_gates_near_half(tiny, batch, granularity):
    before = embeddings(tiny, *batch)
    handle = attach(tiny, "vlpet", {"granularity": granularity, "init": "paper"})
    after = embeddings(tiny, *batch)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(after, before))
    gates = torch.cat([g.flatten() for g in handle.gate_readout(*batch).values()])
    if granularity == "middleY":
        assert torch.equal(gates, torch.ones_like(gates))   # 1 + z, z = 0: no sigmoid in the authors' code
    else:
        assert 0.35 < gates.mean() < 0.65


def test_padding_does_not_change_the_small_gate(tiny):
    handle = attach(tiny, "vlpet", {"granularity": "small", "init": "paper"})
    _randomise(handle, seed=1)
    alone = handle.gate_readout(tokens=tiny.tokenize(["a red square"]))
    padded = handle.gate_readout(tokens=tiny.tokenize(["a red square", "one green cross on a plain white background"]))
    for name, gate in alone.items():
        assert torch.allclose(gate[0], padded[name][0], atol=1e-6), name


def test_gradients_reach_only_vlpet_parameters_and_adapted_layernorms(tiny):
    handle = attach(tiny, "vlpet", {"granularity": "large", "towers": ["vision"]})
    _randomise(handle, seed=2)
    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny.tokenize(["a", "b c", "d e f", "g"]), torch.arange(4))
    RetrievalObjective(tiny, data).train()(torch.arange(4)).backward()
    trainable = handle.trainable_parameters()
    norms = {n for n, _ in tiny.named_parameters() if ".visual.transformer.resblocks." in n and ".ln_" in n}
    assert set(trainable) == {n for n, _ in tiny.named_parameters() if n.startswith("pet.")} | norms
    assert handle.budget()["layernorms"] == 2 * 2 * 2 * 64
    for name, p in tiny.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_bad_options_are_refused(tiny):
    with pytest.raises(PetError, match="granularity must be one of small, middleX, middleY, large, not 'huge'"):
        attach(tiny, "vlpet", {"granularity": "huge"})
    with pytest.raises(PetError, match="init must be one of identity, paper"):
        attach(tiny, "vlpet", {"init": "xavier"})


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_each_granularity_tunes_with_falling_loss(shapes, tmp_path, granularity):
    result = tune(TINY, shapes, "vlpet", {"granularity": granularity}, epochs=5, lr=1e-2, seed=0,
                  out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.85 * losses[0], losses
    assert result.tuned["t2i_r1"] > result.zero_shot["t2i_r1"]


def test_vlpet_on_blip_gates_vision_and_post_ln_text_sites(tiny_blip):
    torch.manual_seed(0)
    pixels, tokens = torch.randn(2, 3, 32, 32), tiny_blip.tokenize(["a red circle", "one blue square here"])
    tiny_blip.eval()
    with torch.no_grad():
        before = tiny_blip.encode_image(pixels), tiny_blip.encode_text(tokens)
    handle = attach(tiny_blip, "vlpet", {"granularity": "middleX", "sites": ["attn", "cross", "mlp"]})
    with torch.no_grad():
        after = tiny_blip.encode_image(pixels), tiny_blip.encode_text(tokens)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after, before))
    readout = handle.gate_readout(pixels, tokens)
    length = int((tokens != 0).sum(dim=1).max())
    assert readout["vision.1.mlp"].shape == (2, 17) and readout["text.0.attn"].shape == (2, length)
    assert readout["text.0.cross"].shape == (2, length)   # the readout's fused pass cross-attends
    assert handle.patch_map(readout["vision.0.attn"]).shape == (2, 4, 4)
    # layernorms: vision 2 per block, text 3 per block (self, cross, output), weight and bias
    assert handle.budget()["layernorms"] == 2 * (2 + 3) * 2 * 32


def test_small_gate_ignores_padding_on_blip_text(tiny_blip):
    handle = attach(tiny_blip, "vlpet", {"granularity": "small", "init": "paper", "towers": ["text"]})
    alone = handle.gate_readout(tokens=tiny_blip.tokenize(["a red square"]))
    padded = handle.gate_readout(tokens=tiny_blip.tokenize(["a red square", "one green cross on a white background"]))
    for name, gate in alone.items():
        assert torch.allclose(gate[0], padded[name][0], atol=1e-6), name


def test_a_site_no_block_has_is_refused_before_anything_is_attached(tiny):
    with pytest.raises(PetError, match="vlpet: no block of the vision, text tower\\(s\\) of .* has a residual site cross"):
        attach(tiny, "vlpet", {"sites": ["attn", "cross"]})
    assert all(s.combiner is None for t in tiny.towers.values() for b in t.blocks for s in b.sites.values())
