import pytest
import torch

from core.pet import METHODS, PetError, attach
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from core.trainer import TrainSettings, make_optimizer
from tests.conftest import embeddings
from tests.test_backbones import reference_model


def test_budgets_on_vit_b16_match_closed_forms(vit_b16):
    expected = {
        "zero_shot": {},
        "linear_probe": {"heads": 768 * 512 + 512 * 512},
        "lora": {"lora": 12 * 3 * 2 * (2 * 768) + 12 * 3 * 2 * (2 * 512)},          # CLIP-LoRA: 184,320
        "prompt": {"prompts": 9 * 4 * 768 + 9 * 4 * 512},
        "adapter": {"adapters": 24 * (2 * 768 * 96 + 96 + 768) + 24 * (2 * 512 * 64 + 64 + 512)},
        "full": {"backbone": vit_b16.num_backbone_params()},
    }
    assert expected["lora"]["lora"] == 184_320
    for method, groups in expected.items():
        handle = attach(vit_b16, method)
        assert handle.budget() == groups, method
        handle.detach()
    def block_biases(d):  # ln_1, in_proj (q, k, v), out_proj, ln_2, fc1 (4d), fc2
        return d + 3 * d + d + d + 4 * d + d

    handle = attach(vit_b16, "bitfit")
    assert handle.budget() == {"biases": 12 * block_biases(768) + 12 * block_biases(512) + 768 + 768 + 512}
    handle.detach()


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_methods_start_at_the_frozen_model_and_detach_cleanly(tiny, batch, method):
    before = embeddings(tiny, *batch)
    handle = attach(tiny, method)
    assert all(torch.equal(a, b) for a, b in zip(before, embeddings(tiny, *batch)))
    for p in handle.trainable_parameters().values():
        torch.nn.init.normal_(p, std=0.1)
    changed = embeddings(tiny, *batch)
    assert not torch.allclose(changed[0], before[0]) and not torch.allclose(changed[1], before[1])
    handle.detach()
    assert all(torch.equal(a, b) for a, b in zip(before, embeddings(tiny, *batch)))
    assert not any(p.requires_grad for p in tiny.parameters()) and tiny.pet is None


def _randomise(handle, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def test_lora_output_equals_independently_merged_weights(tiny, batch):
    handle = attach(tiny, "lora", {"rank": 2, "alpha": 1.0})
    _randomise(handle)
    reference = reference_model("PETStudio-Tiny")   # same seed: the same frozen weights
    state = reference.state_dict()
    towers = {"vision": "visual.transformer", "text": "transformer"}
    with torch.no_grad():
        for tower, prefix in towers.items():
            for index, deltas in tiny.pet[tower].items():
                width = tiny.towers[tower].width
                for offset, name in enumerate(("q", "k", "v")):
                    lora = deltas[name]
                    merged = lora.up @ lora.down * (1.0 / 2)            # (alpha / r) B A
                    rows = slice(offset * width, (offset + 1) * width)
                    state[f"{prefix}.resblocks.{index}.attn.in_proj_weight"][rows] += merged
    reference.load_state_dict(state)
    image, text = embeddings(tiny, *batch)
    with torch.no_grad():
        assert torch.allclose(image, reference.encode_image(batch[0]), atol=1e-5)
        assert torch.allclose(text, reference.encode_text(batch[1]), atol=1e-5)


def test_lora_merge_and_unmerge(tiny, batch):
    frozen = {n: p.detach().clone() for n, p in tiny.backbone_parameters().items()}
    handle = attach(tiny, "lora")
    _randomise(handle, seed=3)
    unmerged = embeddings(tiny, *batch)
    handle.merge()
    assert all(not p.deltas for t in tiny.towers.values() for b in t.blocks for p in b.projections.values())
    merged = embeddings(tiny, *batch)
    assert torch.allclose(merged[0], unmerged[0], atol=1e-5) and torch.allclose(merged[1], unmerged[1], atol=1e-5)
    handle.unmerge()
    again = embeddings(tiny, *batch)
    assert torch.allclose(again[0], unmerged[0], atol=1e-6) and torch.allclose(again[1], unmerged[1], atol=1e-6)
    assert all(torch.allclose(p, frozen[n], atol=1e-7) for n, p in tiny.backbone_parameters().items())
    with pytest.raises(PetError, match="adapter is not linear in the weights"):
        handle.detach()
        attach(tiny, "adapter").merge()


@pytest.mark.parametrize("method", [m for m in METHODS if m != "zero_shot"])
def test_only_trainable_parameters_get_gradients_and_optimizer_state(tiny, method):
    handle = attach(tiny, method)
    trainable = handle.trainable_parameters()
    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny.tokenize(["a", "b c", "d e f", "g"]), torch.arange(4))
    objective = RetrievalObjective(tiny, data).train()
    optimizer = make_optimizer(trainable, TrainSettings(lr=1e-2))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    objective(torch.arange(4)).backward()
    optimizer.step()
    for name, p in tiny.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    state_ids = {id(p) for p in optimizer.state}
    assert state_ids == {id(p) for p in trainable.values() if p.grad is not None}
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_state_dict_holds_only_pet_parameters(tiny):
    handle = attach(tiny, "lora")
    state = handle.state_dict()
    assert len(state) == 2 * 2 * 3 * 2 and all(n.startswith("pet.") for n in state)
    assert sum(t.numel() for t in state.values()) == handle.num_trainable()
    handle.detach()
    handle = attach(tiny, "bitfit")
    assert all(n.endswith(".bias") for n in handle.state_dict())


def test_text_prompts_keep_the_causal_mask_and_move_the_eot_pooling(tiny):
    """Reference: open_clip's own blocks on [SOT, prompts, tokens] with a full-length causal mask."""
    handle = attach(tiny, "prompt", {"length": 3, "depth": 1, "towers": ["text"]})
    _randomise(handle, seed=5)
    prompts = tiny.pet["text"][0]
    reference = reference_model("PETStudio-Tiny")
    tokens = tiny.tokenize(["a red square", "one green cross on a plain background"])
    with torch.no_grad():
        x = reference.token_embedding(tokens) + reference.positional_embedding
        x = torch.cat([x[:, :1], prompts.expand(2, -1, -1), x[:, 1:]], dim=1)
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        for block in reference.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = reference.ln_final(x)
        eot = tokens.argmax(dim=-1) + 3
        expected = x[torch.arange(2), eot] @ reference.text_projection
        _, text = embeddings(tiny, torch.zeros(1, 3, 32, 32), tokens)
    assert torch.allclose(text, expected, atol=1e-5)


def test_vision_prompts_follow_the_cls_token_and_are_removed_before_pooling(tiny):
    handle = attach(tiny, "prompt", {"length": 2, "depth": 2, "towers": ["vision"]})
    seen = []
    tiny.towers["vision"].blocks[1].module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    pixels = torch.randn(2, 3, 32, 32)
    embeddings(tiny, pixels, tiny.tokenize(["a"]))
    patches = (32 // 8) ** 2
    assert seen[0].shape[1] == 1 + 2 + patches
    assert torch.equal(seen[0][:, 1:3], handle.backbone.pet["vision"][1].expand(2, -1, -1))


def test_unknown_options_and_towers_are_refused(tiny):
    with pytest.raises(PetError, match="method lora has no option depth"):
        attach(tiny, "lora", {"depth": 3})
    with pytest.raises(PetError, match="has no tower 'audio'"):
        attach(tiny, "lora", {"towers": ["audio"]})
    with pytest.raises(PetError, match="unknown method 'dora'"):
        attach(tiny, "dora")
