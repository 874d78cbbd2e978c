import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from core.backbones import BackboneError, load_backbone
from core.pet import METHODS, PetError, attach
from core.pet.recipes import Setting, recipe_for
from core.runs import evaluate, tune
from core.tasks.retrieval import RetrievalObjective, RetrievalSet
from tests.conftest import assert_initialised_like_bert, assert_sees_images
from tests.test_pet import _randomise


@pytest.fixture
def inputs(tiny_blip):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tiny_blip.tokenize(["a red circle", "one blue square on a plain background"])
    return pixels, tokens


def outputs(backbone, pixels, tokens):
    backbone.eval()
    with torch.no_grad():
        image_tokens = backbone.image_tokens(pixels)
        return (backbone.encode_image(pixels), backbone.encode_text(tokens),
                backbone.match_logits(backbone.fused_cls(image_tokens, tokens)))


def test_blip_base_budget_is_the_papers_and_its_random_towers_see_images():
    backbone = load_backbone("blip:base")
    assert backbone.num_backbone_params() == 223_744_258 and not backbone.pretrained
    assert_initialised_like_bert(backbone.model)   # the vision tower at 0.02, not BlipVisionConfig's 1e-10
    assert_sees_images(backbone)
    handle = attach(backbone, "aurora")
    assert handle.budget() == {"shared": 81_920, "modes": 6_912} and handle.num_trainable() == 88_832
    assert round(100 * 88_832 / 223_744_258, 3) == 0.040
    handle.detach()
    handle = attach(backbone, "aurora", {"gqt": True})
    assert handle.budget() == {"shared": 81_920, "modes": 6_912, "gqt": 36_864}
    handle.detach()
    authors = recipe_for("authors", METHODS["aurora"], Setting.of(backbone, "retrieval"))
    handle = attach(backbone, "aurora", authors.options)   # GQT, ICE and the heads: the authors' count
    assert handle.num_trainable() == 324_098 and handle.budget()["heads"] == 198_402
    handle.detach()


def test_local_folder_loads_through_from_pretrained_and_matches_transformers(tiny_blip_folder, tiny_blip, inputs):
    pixels, tokens = inputs
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_blip_folder).eval()
    mask = (tokens != 0).long()
    image, text, itm = outputs(tiny_blip, pixels, tokens)
    with torch.no_grad():
        expected_itc = reference(input_ids=tokens, pixel_values=pixels, attention_mask=mask, use_itm_head=False)
        expected_itm = reference(input_ids=tokens, pixel_values=pixels, attention_mask=mask)
    assert torch.allclose(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, expected_itc.itm_score, atol=1e-5)
    assert torch.allclose(itm, expected_itm.itm_score, atol=1e-5)
    assert tiny_blip.weights == f"local folder {tiny_blip_folder}"


def test_aurora_starts_at_the_frozen_model_and_merges(tiny_blip, inputs):
    before = outputs(tiny_blip, *inputs)
    handle = attach(tiny_blip, "aurora", {"rank": 8})
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(outputs(tiny_blip, *inputs), before))
    _randomise(handle, seed=1)
    unmerged = outputs(tiny_blip, *inputs)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(unmerged, before))
    handle.merge()
    for a, b in zip(outputs(tiny_blip, *inputs), unmerged):
        assert (a - b).norm() / b.norm() < 1e-5
    handle.unmerge()
    for a, b in zip(outputs(tiny_blip, *inputs), unmerged):
        assert (a - b).norm() / b.norm() < 1e-5


def test_cross_attention_key_value_deltas_take_the_image_tokens(tiny_blip, inputs):
    attach(tiny_blip, "aurora")
    cross_k = tiny_blip.towers["text"].blocks[0].projections["cross_k"]
    assert cross_k.source == "vision" and "aurora" in cross_k.deltas
    seen = []
    cross_k.add_delta("probe", lambda x: seen.append(x.shape) or torch.zeros(*x.shape[:-1], 32))
    pixels, tokens = inputs
    with torch.no_grad():
        tiny_blip.encode_text(tokens)
        assert seen == []                                  # unimodal: no cross-attention
        tiny_blip.fused_cls(tiny_blip.image_tokens(pixels), tokens)
    assert seen == [(2, 1 + 16, 32)]                       # [CLS] + 4×4 patches


@pytest.mark.parametrize("method, options", [("aurora", {}), ("lora", {"projections": ["cross_k", "cross_v"],
                                                                          "towers": ["text"]})])
def test_texts_paired_with_pictures_by_index_project_each_picture_once(tiny_blip, method, options):
    """ITM pairs each picture with its caption and two hard negatives: `pictures` lets every layer
    project each picture to keys and values once, with the same output and gradients as pairing rows."""
    handle = attach(tiny_blip, method, options)
    _randomise(handle)   # deltas on the cross-attention's keys and values that change them
    tiny_blip.eval()     # no dropout: the two ways must agree
    cross_k = tiny_blip.towers["text"].blocks[0].projections["cross_k"]
    seen = []
    cross_k.add_delta("probe", lambda x: seen.append(x.shape) or torch.zeros(*x.shape[:-1], 32))
    torch.manual_seed(0)
    image_tokens = tiny_blip.image_tokens(torch.randn(3, 3, 32, 32)).detach()
    tokens = tiny_blip.tokenize(["a red circle", "one blue square", "a green triangle on grey", "x", "y z"] * 2)
    pictures = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0])
    results = []
    for paired in (True, False):
        tiny_blip.zero_grad()
        fused = (tiny_blip.fused_cls(image_tokens, tokens, pictures) if paired
                 else tiny_blip.fused_cls(image_tokens[pictures], tokens))
        tiny_blip.match_logits(fused).square().sum().backward()
        results.append((fused.detach(), {n: p.grad.clone() for n, p in handle.trainable_parameters().items()
                                         if p.grad is not None}))   # the vision tower's have none here
    (by_index, grads_by_index), (by_row, grads_by_row) = results
    assert seen == [(3, 17, 32), (10, 17, 32)]   # 3 pictures projected once, where 10 pairs were 10
    assert torch.allclose(by_index, by_row, atol=1e-5) and by_index.std() > 0.1
    assert grads_by_index.keys() == grads_by_row.keys() and grads_by_row
    for name in grads_by_row:
        assert torch.allclose(grads_by_index[name], grads_by_row[name], atol=1e-5), name
        assert grads_by_row[name].abs().max() > 0, name


def test_gqt_acts_only_in_multimodal_mode(tiny_blip, inputs):
    before = outputs(tiny_blip, *inputs)
    handle = attach(tiny_blip, "aurora", {"gqt": True})
    with torch.no_grad():
        for name, p in handle.trainable_parameters().items():
            if ".gqt." in name:
                p.normal_(std=0.5)
    image, text, itm = outputs(tiny_blip, *inputs)
    assert torch.equal(image, before[0]) and torch.allclose(text, before[1], atol=1e-6)
    assert (itm - before[2]).abs().max() > 1e-3
    readout = handle.gate_readout()
    assert readout["text.gqt_gamma_cross"].shape == (2, 32) and readout["vision.modes.fc1"].shape == (2, 4, 32)
    handle.detach()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(tiny_blip, *inputs), before))


def test_gradients_reach_only_aurora_parameters_and_the_heads(tiny_blip):
    handle = attach(tiny_blip, "aurora", {"gqt": True, "ice": True, "heads": True})
    _randomise(handle, seed=2)
    data = RetrievalSet(torch.randn(4, 3, 32, 32), tiny_blip.tokenize(["a", "b c", "d e f", "g"]), torch.arange(4))
    torch.manual_seed(0)
    RetrievalObjective(tiny_blip, data, handle).train()(torch.arange(4)).backward()
    trainable = handle.trainable_parameters()
    heads = {n for n, _ in tiny_blip.named_parameters() if n.startswith(("model.vision_proj", "model.itm_head"))}
    assert set(trainable) == {n for n, _ in tiny_blip.named_parameters() if n.startswith("pet.")} | heads
    for name, p in tiny_blip.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_aurora_tunes_tiny_blip_above_chance_and_the_checkpoint_round_trips(tiny_blip_folder, shapes, tmp_path):
    spec = f"blip:{tiny_blip_folder}"
    result = tune(spec, shapes, "aurora", {"gqt": True, "ice": True}, epochs=10, lr=1e-2, seed=0, out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.8 * losses[0]
    chance = 100 / 24
    assert result.tuned["t2i_r1"] >= 3 * chance and result.tuned["i2t_r1"] >= 3 * chance
    assert evaluate(spec, tmp_path / "run", shapes)["metrics"] == result.tuned


def test_other_methods_attach_where_their_definition_allows(tiny_blip, inputs):
    handle = attach(tiny_blip, "lora")
    assert handle.num_trainable() == 2 * 2 * 3 * 2 * (2 * 32)
    handle.detach()
    before = outputs(tiny_blip, *inputs)
    handle = attach(tiny_blip, "adapter", {"sites": ["attn", "mlp"]})
    assert handle.num_trainable() == 2 * 2 * 2 * (2 * 32 * 4 + 4 + 32)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(tiny_blip, *inputs), before))
    handle.detach()
    with pytest.raises(PetError, match="prompt tuning is not available on the vision tower"):
        attach(tiny_blip, "prompt")


@pytest.mark.parametrize("spec, message", [
    ("blip:/no/such/folder", "BLIP folder not found: /no/such/folder"),
    ("blip:Salesforce/blip-itm-base-coco", "could not fetch BLIP weights for Salesforce/blip-itm-base-coco (no network"),
])
def test_bad_blip_specs(spec, message):
    with pytest.raises(BackboneError, match=message.replace("(", r"\(")):
        load_backbone(spec)


def test_a_folder_without_config_is_not_blip(tmp_path):
    with pytest.raises(BackboneError, match="not a BLIP folder"):
        load_backbone(f"blip:{tmp_path}")


def test_evaluation_streams_vision_tokens_and_reranks_as_each_query_alone_would(tiny_blip, monkeypatch):
    """BLIP's evaluation holds one chunk of test images' vision tokens at a time and matches each
    candidate pair once, yet ranks exactly as re-scoring each query's top k on its own does."""
    from core.tasks import encoding, retrieval
    from core.tasks.matching import match_scores, rerank

    torch.manual_seed(3)
    captions = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")]
    data = RetrievalSet(torch.randn(7, 3, 32, 32), tiny_blip.tokenize(captions), torch.arange(9) % 7)
    similarity = torch.randn(7, 9)
    tiny_blip.eval()
    with torch.no_grad():
        every = tiny_blip.image_tokens(data.pixels)
        expected_i2t = torch.stack([rerank(similarity[i], 3, lambda top: match_scores(
            tiny_blip, every[i].expand(len(top), -1, -1), data.tokens[top])) for i in range(7)])
        expected_t2i = torch.stack([rerank(similarity[:, j], 3, lambda top: match_scores(
            tiny_blip, every[top], data.tokens[j].expand(len(top), -1))) for j in range(9)], dim=1)
    chunks, pairs, projected = [], [], []
    encode, score = encoding.media_tokens, retrieval.match_scores
    monkeypatch.setattr(encoding, "media_tokens", lambda b, p: chunks.append(len(p)) or encode(b, p))
    monkeypatch.setattr(retrieval, "match_scores", lambda b, t, x: pairs.append(len(x)) or score(b, t, x))
    key = tiny_blip.model.text_encoder.encoder.layer[0].crossattention.self.key
    hook = key.register_forward_hook(lambda m, i, o: projected.append(len(i[0])))
    try:
        i2t, t2i = retrieval.rerank_by_matching(tiny_blip, data, similarity, k=3, batch_size=2)
    finally:
        hook.remove()
    assert chunks == [2, 2, 2, 1]
    wanted = torch.zeros(7, 9, dtype=torch.bool)
    wanted.scatter_(1, similarity.topk(3, dim=1).indices, True)
    wanted.scatter_(0, similarity.topk(3, dim=0).indices, True)
    assert sum(pairs) == int(wanted.sum()) < 7 * 3 + 9 * 3   # a pair in both top-3s matched once
    # each picture's texts matched together (2 at a time): its tokens projected to keys once per call
    assert pairs == [len(t) for i in range(7) for t in wanted[i].nonzero().flatten().split(2)]
    assert projected == [1] * len(pairs)
    assert torch.allclose(i2t, expected_i2t, atol=1e-5) and torch.allclose(t2i, expected_t2i, atol=1e-5)


def test_blips_chance_loss_counts_its_matching_head(tiny_blip):
    """--lr auto's reference for BLIP retrieval: the contrastive loss with every pair scored alike
    (log of the batch) plus the matching head's with match and no match scored alike (log 2),
    which a batch of one picture does not train."""
    import math

    torch.manual_seed(0)
    captions = tiny_blip.tokenize(["a red circle", "a blue square", "a green star", "a red star"])
    data = RetrievalSet(torch.randn(3, 3, 32, 32), captions, torch.tensor([0, 1, 2, 0]))
    objective = RetrievalObjective(tiny_blip, data).train()
    with torch.no_grad():
        objective(torch.arange(4))
        assert objective.chance_loss == pytest.approx(math.log(4) + math.log(2))
        pixels = tiny_blip.image_tokens(data.pixels[:1])
        assert tiny_blip.match_logits(tiny_blip.fused_cls(pixels, captions[:1])).shape == (1, 2)   # two ways
        objective(torch.tensor([0, 3]))   # one picture: no negatives to match
        assert objective.chance_loss == pytest.approx(math.log(2))


def test_blips_objective_keeps_its_distinct_pictures_spread_in_the_joint_space(tiny_blip):
    from core.tasks.encoding import encode_test_media, media_spread

    torch.manual_seed(0)
    captions = tiny_blip.tokenize(["a red circle", "a blue square", "a green star", "a red star"])
    data = RetrievalSet(torch.randn(3, 3, 32, 32), captions, torch.tensor([0, 1, 2, 0]))
    objective = RetrievalObjective(tiny_blip, data).eval()
    with torch.no_grad():
        objective(torch.tensor([0, 3, 1, 2]))   # picture 0 twice, counted once
    expected = media_spread(encode_test_media(tiny_blip, data.pixels).embeddings)
    assert float(objective.last_media_spread) == pytest.approx(expected, rel=1e-4) and expected > 1e-3


@pytest.mark.parametrize("method", ["aurora", "lora", "vlpet"])
def test_one_pictures_texts_are_matched_with_its_cross_attention_keys_and_values_projected_once(tiny_blip, method):
    """One picture's tokens (1, N, d) with several texts, as re-ranking and the Search tab give them:
    every layer projects the picture to cross-attention keys and values once (through the method's
    deltas: Aurora adapts them), and the fused [CLS] is the paired one's."""
    torch.manual_seed(0)
    picture_pixels = torch.randn(1, 3, 32, 32)
    tokens = tiny_blip.tokenize(["a red circle", "one blue square on a plain background", "a star"])
    tiny_blip.eval()
    with torch.no_grad():
        untuned = tiny_blip.fused_cls(tiny_blip.image_tokens(picture_pixels).expand(3, -1, -1), tokens)
    handle = attach(tiny_blip, method)
    _randomise(handle)
    tiny_blip.eval()
    cross = tiny_blip.model.text_encoder.encoder.layer[-1].crossattention.self
    rows = []
    hooks = [projection.register_forward_hook(lambda m, i, o: rows.append(len(i[0]))) for projection in
             (cross.key, cross.value)]
    try:
        with torch.no_grad():
            picture = tiny_blip.image_tokens(picture_pixels)
            shared = tiny_blip.fused_cls(picture, tokens)
            paired = tiny_blip.fused_cls(picture.expand(3, -1, -1).contiguous(), tokens)
    finally:
        for hook in hooks:
            hook.remove()
        handle.detach()
    assert rows == [1, 1, 3, 3]
    assert torch.allclose(shared, paired, atol=1e-6) and not torch.allclose(paired, untuned, atol=1e-3)


def test_a_scoring_passes_each_test_picture_through_the_vision_tower_once(tiny_blip_folder, shapes, tmp_path,
                                                                          monkeypatch):
    """BLIP's embeddings are read off the vision tokens its re-ranking matches with: one pass per
    picture per scoring, the embeddings those of the [CLS] through the projection (frames averaged),
    and the scores the same whether the tokens were kept or read again a chunk at a time."""
    from core.backbones.blip import BlipBackbone
    from core.tasks import encoding, retrieval
    from core.tasks.encoding import embed_media, encode_test_media, media_tokens

    spec = f"blip:{tiny_blip_folder}"
    seen = []
    image_tokens = BlipBackbone.image_tokens
    monkeypatch.setattr(BlipBackbone, "image_tokens", lambda self, pixels: seen.append(len(pixels)) or
                        image_tokens(self, pixels))
    result = tune(spec, shapes, "lora", epochs=0, lr=1e-3, out=tmp_path / "run")
    assert sum(seen) == 2 * 24 and result.tuned == result.zero_shot   # 24 test pictures, untuned and tuned
    backbone = load_backbone(spec)
    torch.manual_seed(0)
    for pixels in (torch.randn(5, 3, 32, 32), torch.randn(3, 2, 3, 32, 32)):   # pictures, then clips of 2 frames
        media = encode_test_media(backbone, pixels, batch_size=2)
        assert torch.allclose(media.embeddings, embed_media(backbone, pixels), atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(media.tokens, media_tokens(backbone.eval(), pixels), atol=1e-5)
    captions = backbone.tokenize([f"a {c} shape" for c in ("red", "blue", "green", "grey", "pink")])
    data = RetrievalSet(torch.randn(5, 3, 32, 32), captions, torch.arange(5))
    kept = retrieval.evaluate(backbone, data, encode_test_media(backbone, data.pixels))
    monkeypatch.setattr(encoding, "KEPT_TOKENS_MB", 0)
    again = encode_test_media(backbone, data.pixels)
    assert again.tokens is None and retrieval.evaluate(backbone, data, again) == kept
