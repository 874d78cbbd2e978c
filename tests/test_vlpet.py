import pytest
import torch

from core.backbones import load_backbone
from core.pet import PetError, attach
from core.pet.vlpet import Config as VlPetConfig, GatedAdapter, ValueParallelAdapter
from core.runs import tune
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from tests.conftest import TINY, embeddings, write_tiny_blip_vqa
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
    if granularity == "middleY":   # 1 + z, z ~ N(0, 0.02): no sigmoid in the authors' code
        assert (gates - 1).abs().max() < 0.1 and 0.01 < gates.std() < 0.03
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
    with pytest.raises(PetError, match="decoder must be one of value_parallel, gated"):
        attach(tiny, "vlpet", {"decoder": "none"})


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_each_granularity_tunes_with_falling_loss(shapes, tmp_path, granularity):
    result = tune(TINY, shapes, "vlpet", {"granularity": granularity}, epochs=5, lr=1e-2, seed=0,
                  out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.85 * losses[0], losses
    assert result.tuned["t2i_r1"] > result.zero_shot["t2i_r1"]


@pytest.mark.parametrize("stream_norm", [5.0, 25.0])   # 25: the offline model's ‖X‖
@pytest.mark.parametrize("granularity", ["small", "middleX"])
def test_identity_gates_move_at_the_same_pace_whatever_the_residual_stream_norm(granularity, stream_norm):
    """AdamW moves each gate weight by about lr a step, so a small/middleX gate's logit moves by at
    most ~lr·(√dim + 1) a step whatever ‖X‖. Read from the raw pre-LN stream the logit moved by
    ~lr·‖X‖₁ a step (here 2–4 after 5 steps at ‖X‖ = 25) and on the offline model G stuck at 0 or
    2 within a few steps, switching sub-layers off per sample/token."""
    torch.manual_seed(0)
    width, tokens, steps, lr = 64, 10, 5, 1e-2
    config = VlPetConfig(granularity=granularity)
    adapter = GatedAdapter(width, config, causal=False)
    x = torch.randn(4, tokens, width)
    x = x * stream_norm / x.norm(dim=-1, keepdim=True)
    h = torch.randn(4, tokens, width)
    h = h * stream_norm / 3 / h.norm(dim=-1, keepdim=True)
    target = torch.randn(4, tokens, width)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (-(adapter(x, h) * target).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        gate = adapter.compute_gate(x, h + adapter.adapter(h), None)
    logit = torch.logit(gate / 2)   # G = 2σ(logit)
    gate_dim = adapter.gate_proj.in_features
    assert 1e-2 < logit.abs().max() <= steps * lr * (gate_dim ** 0.5 + 1), logit.abs().max()   # moved, not run off
    assert 0.8 < gate.min() and gate.max() < 1.2, (gate.min(), gate.max())
    u = torch.randn(2, 3, gate_dim) * stream_norm   # the authors' init keeps their gate: σ(w·u + b) on u as it is
    assert torch.equal(GatedAdapter(width, VlPetConfig(granularity=granularity, init="paper"), False).gate_input(u), u)


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


# BLIP VQA: the authors' encoder–decoder design, causal gates, the authors' init.

def _adapter(d, r):   # d→r (multi-head or not, same count) → d, with biases
    return d * r + r + r * d + d


@pytest.fixture(scope="module")
def blip_vqa_base():
    """blip-vqa:base at random init (about 10 s to build), shared by this module's tests."""
    return load_backbone("blip-vqa:base")


@pytest.fixture
def vqa_base(blip_vqa_base):
    """(backbone, attach_vlpet): what a test attaches is detached after it, whatever happens."""
    handles = []

    def attach_vlpet(options=None):
        handles.append(attach(blip_vqa_base, "vlpet", options or {}))
        return handles[-1]

    yield blip_vqa_base, attach_vlpet
    for handle in handles:
        handle.detach()


@pytest.fixture(scope="module")
def tiny_blip_vqa(tmp_path_factory):
    return load_backbone(f"blip-vqa:{write_tiny_blip_vqa(tmp_path_factory.mktemp('blipvqa') / 'tiny')}")


def _question_and_answers(backbone, answers):
    """Random image tokens (the decoder never sees the picture directly), one question per answer."""
    generator = torch.Generator().manual_seed(0)
    image_tokens = torch.randn(1, 8, backbone.towers["text"].width, generator=generator).expand(len(answers), -1, -1)
    return image_tokens, backbone.tokenize(["what is it?"] * len(answers)), backbone.tokenize(answers)


def _answer_logits(backbone, image_tokens, questions, answers):
    backbone.eval()
    with torch.no_grad():
        return backbone._answer_logits(image_tokens, questions, answers)[0].logits


def _decoder_sites_and_deltas(backbone):
    decoder = backbone.towers["decoder"].blocks
    return ([s.combiner for b in decoder for s in b.sites.values()],
            {name: [b.projections[name].deltas.get("vlpet") for b in decoder] for name in decoder[0].projections})


def test_blip_vqa_default_is_the_authors_encoder_decoder_design(vqa_base):
    backbone, attach_vlpet = vqa_base
    handle = attach_vlpet()
    combiners, deltas = _decoder_sites_and_deltas(backbone)
    assert combiners == [None] * 36                                      # no gate in the decoder
    assert all(isinstance(d, ValueParallelAdapter) for d in deltas["cross_v"]) and len(deltas["cross_v"]) == 12
    assert all(d is None for name, per_block in deltas.items() if name != "cross_v" for d in per_block)
    for tower in ("vision", "text"):                                      # encoders: gated attn and mlp
        for block in backbone.towers[tower].blocks:
            assert {s for s, site in block.sites.items() if isinstance(site.combiner, GatedAdapter)} == {"attn", "mlp"}
            assert all(norm.weight.requires_grad for norm in block.layernorms)
    assert not any(p.requires_grad for b in backbone.towers["decoder"].blocks for n in b.layernorms
                   for p in n.parameters())
    sites = 12 * 2 * 2                                                    # vision and question encoder
    assert handle.budget() == {"adapters": sites * _adapter(768, 96), "gates": sites * _adapter(768, 96),
                               "layernorms": 12 * (2 + 3) * 2 * 768, "decoder": 12 * _adapter(768, 96)}
    assert handle.budget()["decoder"] == 1_779_840
    handle.detach()
    assert _decoder_sites_and_deltas(backbone)[1]["cross_v"] == [None] * 12


def test_decoder_gated_gates_the_decoder_like_an_encoder(vqa_base):
    backbone, attach_vlpet = vqa_base
    handle = attach_vlpet({"decoder": "gated"})
    combiners, deltas = _decoder_sites_and_deltas(backbone)
    assert all(d is None for per_block in deltas.values() for d in per_block)
    for block in backbone.towers["decoder"].blocks:
        assert isinstance(block.sites["attn"].combiner, GatedAdapter) and block.sites["attn"].combiner.causal
        assert isinstance(block.sites["mlp"].combiner, GatedAdapter) and block.sites["cross"].combiner is None
        assert all(norm.weight.requires_grad and norm.bias.requires_grad for norm in block.layernorms)
    sites = 12 * 2 * 3
    assert handle.budget() == {"adapters": sites * _adapter(768, 96), "gates": sites * _adapter(768, 96),
                               "layernorms": 12 * (2 + 3 + 3) * 2 * 768}


def test_towers_option_decides_which_towers_get_what(tiny_blip_vqa):
    def layout(towers):
        handle = attach(tiny_blip_vqa, "vlpet", {"towers": towers})
        try:
            return ({t for t, b in handle.backbone.pet.items() for sites in b.values()
                     for m in sites.values() if isinstance(m, GatedAdapter)},
                    {t for t, b in handle.backbone.pet.items() for sites in b.values()
                     for m in sites.values() if isinstance(m, ValueParallelAdapter)}, set(handle.budget()))
        finally:
            handle.detach()

    assert layout(["text", "decoder"]) == ({"text"}, {"decoder"}, {"adapters", "gates", "layernorms", "decoder"})
    assert layout(["text"]) == ({"text"}, set(), {"adapters", "gates", "layernorms"})
    assert layout(["decoder"]) == (set(), {"decoder"}, {"decoder"})
    assert layout(["vision"]) == ({"vision"}, set(), {"adapters", "gates", "layernorms"})
    handle = attach(tiny_blip_vqa, "vlpet", {"granularity": "small"})   # value-parallel adapters have no gate
    readout = handle.gate_readout(torch.randn(2, 3, 32, 32), tiny_blip_vqa.tokenize(["what?", "which colour?"]))
    handle.detach()
    assert set(readout) == {f"{t}.{i}.{s}" for t in ("vision", "text") for i in (0, 1) for s in ("attn", "mlp")}
    assert all(gate.shape == (2,) for gate in readout.values())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_no_gate_lets_the_answer_decoder_see_later_tokens(vqa_base, granularity):
    """Teacher forcing two answers that share their first 5 tokens ([CLS] a r ##e ##d): a causal
    decoder's logits over that prefix cannot depend on what follows it."""
    backbone, attach_vlpet = vqa_base
    attach_vlpet({"granularity": granularity, "decoder": "gated", "init": "paper"})
    image_tokens, questions, answers = _question_and_answers(backbone, ["a red disc", "a red square"])
    prefix = 5
    assert torch.equal(answers[0, :prefix], answers[1, :prefix]) and answers[0, prefix] != answers[1, prefix]
    logits = _answer_logits(backbone, image_tokens, questions, answers)
    assert (logits[0, :prefix] - logits[1, :prefix]).abs().max() < 1e-5
    assert (logits[0, prefix] - logits[1, prefix]).abs().max() > 1e-2   # from there on, they differ


def test_causal_small_gate_on_clip_text_ends_at_the_masked_mean(tiny):
    handle = attach(tiny, "vlpet", {"granularity": "small", "init": "paper", "towers": ["text"]})
    _randomise(handle, seed=3)
    module = tiny.towers["text"].blocks[1].sites["mlp"].combiner
    assert module.causal
    seen = []
    module.register_forward_pre_hook(lambda m, inputs: seen.append(inputs))
    tokens = tiny.tokenize(["a red square", "two blue circles left of a big green tree"])
    readout = handle.gate_readout(tokens=tokens)["text.1.mlp"]
    x, h, mask = seen[-1]
    with torch.no_grad():
        y = h + module.adapter(h)
        running = module.compute_gate(x, y, mask)[..., 0]                   # (B, N)
        per_token = torch.sigmoid(module.gate_proj(torch.cat([x, y], dim=-1)))[..., 0]
    weights = mask.float()
    full = (per_token * weights).sum(1) / weights.sum(1)
    last_real = mask.sum(1) - 1
    assert mask[0].sum() < mask.shape[1]                                  # the first sample is padded
    assert torch.allclose(running[torch.arange(2), last_real], full, atol=1e-6)
    assert torch.allclose(running[:, -1], full, atol=1e-6) and torch.allclose(readout, full, atol=1e-6)
    assert torch.allclose(running[:, 2], per_token[:, :3].mean(1), atol=1e-6)   # position 2: tokens 0..2 only
    assert (running[:, 0] - full).abs().max() > 1e-3


def _trainable_linears(handle, kind):
    return [m for m in handle.backbone.pet.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_paper_init_is_the_authors_hf_init(vqa_base, granularity):
    backbone, attach_vlpet = vqa_base
    handle = attach_vlpet({"granularity": granularity, "init": "paper", "towers": ["text", "decoder"]})
    gated, value_parallel = _trainable_linears(handle, GatedAdapter), _trainable_linears(handle, ValueParallelAdapter)
    assert len(gated) == 24 and len(value_parallel) == 12

    def weights(modules, pick):
        return torch.cat([pick(m).detach().flatten() for m in modules])

    def n_002(values):   # N(0, 0.02): std within 3 %, and tails past 3σ, unlike PyTorch's uniform default
        return abs(values.std().item() - 0.02) < 0.0006 and values.abs().max() > 0.06

    assert n_002(weights(gated, lambda m: m.down)) and not weights(gated, lambda m: m.down_bias).any()
    gate_linears = [lin for m in gated for name, lin in m.named_children() if name.startswith("gate_")]
    if gate_linears:
        assert n_002(torch.cat([lin.weight.detach().flatten() for lin in gate_linears]))
        assert not any(lin.bias.any() for lin in gate_linears)
    if granularity == "middleY":
        assert n_002(weights(gated, lambda m: m.gate_shift))
    if granularity == "small":   # the authors' small script zero-inits W_up
        assert not weights(gated, lambda m: m.up.weight).any()
    else:
        assert n_002(weights(gated, lambda m: m.up.weight))
    assert not weights(gated, lambda m: m.up.bias).any()
    assert n_002(weights(value_parallel, lambda m: m.down.weight))
    assert not weights(value_parallel, lambda m: m.down.bias).any()
    assert not weights(value_parallel, lambda m: m.up.weight).any() and not weights(value_parallel, lambda m: m.up.bias).any()


@pytest.mark.parametrize("granularity", ["small", "large"])
def test_identity_init_keeps_the_frozen_blip_vqa_answers(vqa_base, granularity):
    backbone, attach_vlpet = vqa_base
    image_tokens, questions, answers = _question_and_answers(backbone, ["a red disc", "no"])
    before = _answer_logits(backbone, image_tokens, questions, answers)
    handle = attach_vlpet({"granularity": granularity, "towers": ["text", "decoder"]})   # image tokens are given
    value_parallel = _trainable_linears(handle, ValueParallelAdapter)
    down = torch.cat([m.down.weight.detach().flatten() for m in value_parallel])
    assert down.abs().max() <= 768 ** -0.5 and down.std() > 0.01         # PyTorch's default Linear init
    assert all(m.down.bias.any() for m in value_parallel)
    assert torch.equal(_answer_logits(backbone, image_tokens, questions, answers), before)


def test_value_parallel_adapter_learns_and_changes_the_answers(vqa_base):
    backbone, attach_vlpet = vqa_base
    image_tokens, questions, answers = _question_and_answers(backbone, ["a red disc", "no"])
    before = _answer_logits(backbone, image_tokens, questions, answers)
    handle = attach_vlpet({"towers": ["decoder"]})
    adapters = _trainable_linears(handle, ValueParallelAdapter)

    def gradients():
        backbone.train()
        backbone.zero_grad(set_to_none=True)
        backbone.answer_loss(image_tokens, questions, answers).backward()
        return {name: p.grad for name, p in handle.trainable_parameters().items()}

    grads = gradients()   # at the start W_up = 0: only W_up has a gradient, and it has one
    assert set(grads) == {n for n, _ in backbone.named_parameters() if n.startswith("pet.decoder.")}
    assert all(grads[n].abs().sum() > 0 for n in grads if ".up." in n)
    assert not any(grads[n].any() for n in grads if ".down." in n)
    with torch.no_grad():
        for m in adapters:
            m.up.weight.normal_(std=0.02, generator=torch.Generator().manual_seed(m.up.weight.numel()))
    assert (_answer_logits(backbone, image_tokens, questions, answers) - before).abs().max() > 1e-2
    assert all(g.abs().sum() > 0 for g in gradients().values())
    assert not any(p.grad is not None for n, p in backbone.named_parameters() if not n.startswith("pet."))


def test_generation_with_a_small_decoder_gate_matches_teacher_forcing(tiny_blip_vqa, monkeypatch):
    """A decoder generating with a key/value cache feeds its gates one token at a time; a `small`
    gate pools over the tokens so far, so generation runs without the cache and every generated
    token is the teacher-forced argmax after the tokens before it."""
    handle = attach(tiny_blip_vqa, "vlpet", {"granularity": "small", "decoder": "gated", "init": "paper",
                                             "towers": ["decoder"]})
    try:
        decoder = tiny_blip_vqa.model.text_decoder
        generated = []
        original = decoder.generate

        def generate(**kwargs):   # the scores of each generated token, too
            generated.append(original(**kwargs, output_scores=True, return_dict_in_generate=True))
            return generated[-1].sequences

        monkeypatch.setattr(decoder, "generate", generate)
        image_tokens, questions, _ = _question_and_answers(tiny_blip_vqa, ["x", "y"])
        tiny_blip_vqa.eval()
        tiny_blip_vqa.generate_answers(image_tokens, questions)
        ids, scores = generated[0].sequences, torch.stack(generated[0].scores, dim=1)
        assert ids.shape[1] >= 3
        with torch.no_grad():
            states, mask = tiny_blip_vqa.encode_question(image_tokens, questions)
            logits = decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
        assert torch.allclose(scores, logits[:, :-1], atol=1e-4)
        assert torch.equal(logits[:, :-1].argmax(-1), ids[:, 1:])
    finally:
        handle.detach()
