"""BLIP question answering: the answer decoder generates answers, PET methods attach to all three towers."""
import pytest
import torch

from core.backbones import load_backbone
from core.data.shapes import write_shapes_vqa_dataset
from core.pet import attach
from core.data import read_dataset
from core.query import answer
from core.runs import RunError, evaluate, load_run, tune
from core.tasks.vqa import normalize_answer
from tests.conftest import assert_initialised_like_bert, assert_sees_images, write_tiny_blip_vqa


@pytest.fixture(scope="module")
def blip_vqa(tmp_path_factory):
    spec = f"blip-vqa:{write_tiny_blip_vqa(tmp_path_factory.mktemp('blipvqa') / 'tiny')}"
    assert_sees_images(load_backbone(spec))
    return spec


@pytest.fixture(scope="module")
def shapes_vqa(tmp_path_factory):
    return write_shapes_vqa_dataset(tmp_path_factory.mktemp("shapesvqa") / "data")


def test_random_blip_vqa_base_sees_images():
    """Random `blip-vqa:base`: vision weights at 0.02 (not BlipVisionConfig's 1e-10), so its image
    tokens tell pictures apart and reach the question encoder."""
    backbone = load_backbone("blip-vqa:base")
    assert not backbone.pretrained and set(backbone.towers) == {"vision", "text", "decoder"}
    assert_initialised_like_bert(backbone.model)
    assert_sees_images(backbone)
    # The authors' GQT is in every multimodal text layer: the question encoder and the answer decoder.
    handle = attach(backbone, "aurora", {"gqt": True})
    assert handle.budget() == {"shared": 81_920, "modes": 9_216, "gqt": 2 * 12 * 4 * 768}
    assert handle.num_trainable() == 164_864
    handle.detach()


def test_aurora_adapts_vision_question_encoder_and_answer_decoder(blip_vqa):
    backbone = load_backbone(blip_vqa)
    assert set(backbone.towers) == {"vision", "text", "decoder"}
    assert backbone.towers["decoder"].blocks[0].projections["cross_k"].source == "text"
    handle = attach(backbone, "aurora", {"rank": 8})
    # 12 mode vectors per vision block; q, k, v of self- and cross-attention in the two text towers
    assert handle.budget()["modes"] == (2 * 12 + 2 * 6 + 2 * 6) * 8


def test_generated_answers_learn_the_shapes(blip_vqa, shapes_vqa, tmp_path):
    result = tune(blip_vqa, shapes_vqa, "full", epochs=30, lr=3e-3, batch_size=16, task="vqa", seed=0,
                  out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.2 * losses[0]
    assert result.tuned["vqa_acc"] >= 50.0 and result.zero_shot["vqa_acc"] < 10.0
    assert evaluate(blip_vqa, tmp_path / "run", shapes_vqa)["metrics"] == result.tuned
    # Ranking candidates by the decoder's likelihood (the app's Ask tab) agrees with what it generates.
    backbone, _, _ = load_run(blip_vqa, tmp_path / "run")
    dataset = read_dataset(shapes_vqa, tmp_path)
    candidates = sorted({a for item in dataset.items for qa in item.qa for a in qa.answers})
    agree = total = 0
    for item in dataset.split("test"):
        for qa in item.qa:
            answers = answer(backbone, dataset.path(item), qa.question, candidates, k=len(candidates))
            assert sum(p for _, p in answers.ranked) == pytest.approx(1.0, abs=1e-4)
            agree += answers.ranked[0][0] == normalize_answer(answers.generated)
            total += 1
    assert total >= 4 and agree >= 0.8 * total


def test_aurora_tunes_the_answer_decoder(blip_vqa, shapes_vqa, tmp_path):
    result = tune(blip_vqa, shapes_vqa, "aurora", {"gqt": True}, epochs=4, lr=1e-2, batch_size=16, task="vqa",
                  seed=0, out=tmp_path / "run")
    losses = result.train.epoch_losses
    assert losses[-1] < 0.85 * losses[0]


def test_retrieval_is_refused_on_an_answering_backbone(blip_vqa, tmp_path, shapes):
    backbone = load_backbone(blip_vqa)
    assert backbone.tasks == ("vqa",) and backbone.has("answer_generation") and not backbone.has("matching")
    with pytest.raises(RunError, match="serves vqa, not retrieval"):
        tune(blip_vqa, shapes, "lora", epochs=1, out=tmp_path / "run")


def test_the_answering_objective_keeps_its_distinct_pictures_spread_on_their_vision_cls(blip_vqa, shapes_vqa, tmp_path):
    from core.tasks import vqa
    from core.tasks.encoding import encode_test_media, media_spread

    backbone = load_backbone(blip_vqa)
    dataset = read_dataset(shapes_vqa, tmp_path)
    items = dataset.split("test")
    data = vqa.prepare(backbone, dataset, items, vqa.candidate_answers(items))
    objective = vqa.VqaObjective(backbone, data).eval()
    questions = torch.arange(6)
    with torch.no_grad():
        objective(questions)
    pictures = data.question_image[questions].unique()
    assert len(pictures) < len(questions)   # two questions a picture: each picture counted once
    expected = media_spread(encode_test_media(backbone, data.pixels[pictures]).embeddings)
    assert float(objective.last_media_spread) == pytest.approx(expected, rel=1e-4) and expected > 1e-3


def test_scoring_passes_each_picture_through_the_vision_tower_once_for_its_answers(blip_vqa, shapes_vqa, tmp_path,
                                                                                   monkeypatch):
    """Generated answers read each test picture's vision tokens, computed once however many questions
    it has (two here) or kept by the scoring, and each question is answered from its own picture's
    tokens; the scoring's embeddings (the spread's) are the pictures' [CLS], frames averaged."""
    import dataclasses

    import torch.nn.functional as F

    from core.backbones.blip import BlipAnsweringBackbone
    from core.tasks import vqa
    from core.tasks.encoding import encode_test_media

    backbone = load_backbone(blip_vqa)
    dataset = read_dataset(shapes_vqa, tmp_path)
    items = dataset.split("test")
    test = vqa.prepare(backbone, dataset, items, vqa.candidate_answers(items))
    assert len(test) == 2 * len(test.pixels) and len(test.pixels) > 3
    seen = []
    image_tokens = BlipAnsweringBackbone.image_tokens
    monkeypatch.setattr(BlipAnsweringBackbone, "image_tokens",
                        lambda self, pixels: seen.append(len(pixels)) or image_tokens(self, pixels))
    # which picture's tokens, and which question, reached the decoder (the pictures' tokens differ)
    alone = torch.cat([image_tokens(backbone, test.pixels[i:i + 1]) for i in range(len(test.pixels))])

    def whose(tokens):
        distance = (alone - tokens).flatten(1).abs().max(dim=1).values
        assert distance.min() < 1e-4 and distance.sort().values[1] > 1e-2
        return int(distance.argmin())

    def generate(self, tokens, questions):   # as the decoder, which cannot be given no question
        assert len(questions) > 0
        return [(whose(t), q.tolist()) for t, q in zip(tokens.expand(len(questions), -1, -1), questions)]

    monkeypatch.setattr(BlipAnsweringBackbone, "generate_answers", generate)
    answered = vqa.predict(backbone, test, batch_size=3)
    assert answered == [(int(test.question_image[i]), test.question_tokens[i].tolist()) for i in range(len(test))]
    assert sum(seen) == len(test.pixels) and max(seen) == 3
    # a picture nobody asks about is passed over
    rest = (test.question_image != 1).nonzero().flatten()
    fewer = dataclasses.replace(test, question_image=test.question_image[rest],
                                question_tokens=test.question_tokens[rest],
                                questions=[test.questions[i] for i in rest.tolist()])
    assert vqa.predict(backbone, fewer, batch_size=3) == [answered[i] for i in rest.tolist()]
    # the tokens a scoring kept: no pass of its own, the same routing; the spread's embeddings the [CLS]
    media = encode_test_media(backbone, test.pixels, batch_size=5)
    seen.clear()
    assert vqa.predict(backbone, test, media, batch_size=3) == answered and seen == []
    assert torch.allclose(media.embeddings, F.normalize(alone[:, 0], dim=-1), atol=1e-5)
    clips = torch.stack([test.pixels[:3], test.pixels[3:6]], dim=1)   # 3 clips of 2 frames
    assert torch.allclose(encode_test_media(backbone, clips).embeddings, F.normalize(
        (alone[:3, 0] + alone[3:6, 0]) / 2, dim=-1), atol=1e-5)
    # a run's scorings, untuned and tuned: one pass each, the spread read off the answers' tokens
    monkeypatch.undo()
    monkeypatch.setattr(BlipAnsweringBackbone, "image_tokens",
                        lambda self, pixels: seen.append(len(pixels)) or image_tokens(self, pixels))
    seen.clear()
    tune(blip_vqa, shapes_vqa, "lora", epochs=0, lr=1e-3, task="vqa", out=tmp_path / "run")
    assert sum(seen) == 2 * len(test.pixels)


def test_the_ask_tab_encodes_one_question_once_for_every_candidate_answer(blip_vqa, tmp_path):
    """Ranking candidate answers to one question about one picture runs the question encoder on one
    row, and gives the likelihoods of the question paired with each answer."""
    from PIL import Image

    backbone = load_backbone(blip_vqa)
    backbone.eval()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    candidates = ["red", "blue square", "green star", "circle"]   # as the tab normalises them
    rows = []
    hook = backbone.model.text_encoder.register_forward_hook(lambda m, i, kw, o: rows.append(len(kw["input_ids"])),
                                                             with_kwargs=True)
    try:
        ranked = answer(backbone, tmp_path / "red.png", "what colour is the shape?", candidates, k=4)
    finally:
        hook.remove()
    assert rows == [1, 1]   # the generated answer's question, then the ranking's
    with torch.no_grad():
        picture = backbone.image_tokens(backbone.image_transform(Image.open(tmp_path / "red.png")).unsqueeze(0))
        question = backbone.tokenize(["what colour is the shape?"])
        paired = backbone.answer_log_likelihoods(picture.expand(4, -1, -1), question.expand(4, -1),
                                                 backbone.tokenize(candidates)).softmax(dim=0)
    assert [a for a, _ in ranked.ranked] == [candidates[i] for i in paired.argsort(descending=True)]
    assert [p for _, p in ranked.ranked] == pytest.approx(paired.sort(descending=True).values.tolist(), abs=1e-5)


def test_one_pictures_questions_are_encoded_with_its_cross_attention_projected_once(blip_vqa, shapes_vqa,
                                                                                    tmp_path):
    """Scoring answers a picture's questions together: the question encoder projects its tokens to
    cross-attention keys and values once per call (with Aurora's deltas on them), and encodes each
    question as it does paired with its own copy of the picture."""
    from core.tasks import vqa
    from tests.test_pet import _randomise

    backbone = load_backbone(blip_vqa)
    handle = attach(backbone, "aurora")
    _randomise(handle)
    assert backbone.towers["text"].blocks[0].projections["cross_k"].deltas
    dataset = read_dataset(shapes_vqa, tmp_path)
    items = dataset.split("test")
    test = vqa.prepare(backbone, dataset, items, vqa.candidate_answers(items))
    cross = backbone.model.text_encoder.encoder.layer[0].crossattention.self
    rows = []
    hook = cross.key.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    try:
        vqa.predict(backbone, test)
        assert rows == [1] * len(test.pixels)   # two questions a picture, one projection
        backbone.eval()
        with torch.no_grad():
            picture = backbone.image_tokens(test.pixels[:1])
            questions = test.question_tokens[test.question_image == 0]
            shared, shared_mask = backbone.encode_question(picture, questions)
            paired, paired_mask = backbone.encode_question(picture.expand(len(questions), -1, -1).contiguous(),
                                                           questions)
    finally:
        hook.remove()
        handle.detach()
    assert torch.equal(shared_mask, paired_mask) and torch.allclose(shared, paired, atol=1e-5)
