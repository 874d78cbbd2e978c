"""Asking a model about a dataset (core/query.py): gallery search both ways, answer ranking, gates."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core import query
from core.backbones import load_backbone
from core.data import read_dataset
from core.pet import attach
from core.tasks.vqa import answer_scores, prompt
from core.world import write_part


@pytest.fixture(scope="module")
def offline():
    return load_backbone("offline")


@pytest.fixture(scope="module")
def base_scenes(tmp_path_factory):
    """16 scenes of the kind the offline model was pretrained on (its zero-shot t2i R@1 there is 88%)."""
    folder = tmp_path_factory.mktemp("base")
    return read_dataset(write_part(folder / "data", "base", 16, seed=5), folder)


@pytest.fixture(scope="module")
def gallery(offline, base_scenes):
    gallery = query.load_gallery(offline, base_scenes)
    return gallery, query.embed_gallery(offline, gallery)


def test_gallery_holds_every_item_and_caption(gallery, base_scenes):
    gallery, embeddings = gallery
    assert len(gallery.paths) == 16 and embeddings.media.shape[0] == 16
    assert len(gallery.captions) == 32 == embeddings.captions.shape[0]
    assert torch.allclose(embeddings.media.norm(dim=1), torch.ones(16), atol=1e-5)
    assert [gallery.names[i] for i in gallery.caption_media[::2]] == [i.media for i in base_scenes.items]


def test_text_search_scores_are_the_cosine_similarities(offline, gallery):
    gallery, embeddings = gallery
    hits = query.search_by_text(offline, gallery, embeddings, "a large red circle", k=4).hits
    with torch.no_grad():
        text = F.normalize(offline.encode_text(offline.tokenize(["a large red circle"])), dim=-1)[0]
        images = F.normalize(offline.encode_image(gallery.pixels), dim=-1)
    expected = (images @ text).topk(4)
    assert [h.index for h in hits] == expected.indices.tolist()
    assert [h.score for h in hits] == pytest.approx(expected.values.tolist(), abs=1e-5)


def test_captions_find_their_pictures_and_pictures_their_captions(offline, gallery):
    gallery, embeddings = gallery
    found = sum(query.search_by_text(offline, gallery, embeddings, caption, k=1).hits[0].index == owner
                for caption, owner in zip(gallery.captions, gallery.caption_media))
    assert found >= 20   # of 32; chance is 2
    own = sum(gallery.caption_media[query.search_by_media(offline, gallery, embeddings, path, k=1).hits[0].index] == i
              for i, path in enumerate(gallery.paths))
    assert own >= 10     # of 16; chance is 1


def test_answers_are_the_softmax_over_the_candidates(offline, base_scenes):
    path = base_scenes.path(base_scenes.items[0])
    candidates = ["red", "green", "blue", "yellow", "purple", "orange"]
    result = query.answer(offline, path, "what colour is the shape?", candidates, k=6)
    assert result.generated is None
    assert sum(p for _, p in result.ranked) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        pixels = query._load_query_media(offline, path, 8)
        logits = answer_scores(offline, offline.encode_image(pixels), ["what colour is the shape?"], candidates)[0]
    expected = logits.softmax(dim=0)
    assert dict(result.ranked) == pytest.approx(dict(zip(candidates, expected.tolist())), abs=1e-5)


def test_questions_and_files_that_cannot_be_answered(offline, base_scenes, tmp_path):
    path = base_scenes.path(base_scenes.items[0])
    with pytest.raises(query.QueryError, match="give candidate answers"):
        query.answer(offline, path, "what colour?", [])
    with pytest.raises(query.QueryError, match="type a question"):
        query.answer(offline, path, "  ", ["red"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(query.QueryError, match="notes.txt: not an image"):
        query.answer(offline, tmp_path / "notes.txt", "what?", ["red"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(query.QueryError, match="broken.png: unreadable image"):
        query.answer(offline, tmp_path / "broken.png", "what?", ["red"])
    Image.new("1", (7000, 7000)).save(tmp_path / "huge.png")    # a few KB on disk, 49 megapixels
    assert (tmp_path / "huge.png").stat().st_size < 100_000
    asks = (lambda path: query.answer(offline, path, "what?", ["red"]),
            lambda path: query.read_gates(attach(offline, "zero_shot"), path))
    for ask in asks:
        with pytest.raises(query.QueryError, match="huge.png: image has 49000000 pixels .7000×7000., more than the "
                                                   "limit of 40000000"):
            ask(tmp_path / "huge.png")


def test_a_question_too_long_for_the_model_is_cut_and_says_so(offline, base_scenes):
    path = base_scenes.path(base_scenes.items[0])
    candidates = ["red", "green", "blue", "yellow", "purple", "orange"]
    question = "what colour is the shape? " + "please look very carefully " * 25_000   # 100k characters
    result = query.answer(offline, path, question, candidates, k=6)
    assert result.note.startswith("the question was too long for the model and was cut to its first ")
    assert result.note.endswith("of 100005 words: “what colour is the shape? please look very carefully "
                                "please look very carefully …”")
    kept = int(result.note.split("first ")[1].split(" of")[0])
    words = question.split()
    # The longest kept question leaves every candidate's answer inside the context; one word more would not.
    assert not any(offline.cut_by_tokenizer([prompt(" ".join(words[:kept]), a) for a in candidates]))
    assert any(offline.cut_by_tokenizer([prompt(" ".join(words[:kept + 1]), a) for a in candidates]))
    probabilities = [p for _, p in result.ranked]
    assert max(probabilities) - min(probabilities) > 1e-3      # the answers still tell apart
    assert query.answer(offline, path, "what colour is the shape?", candidates).note is None
    search = query.search_by_text(offline, *query_gallery(offline, base_scenes), "red " * 200)
    assert search.note.startswith("the text to search with was too long for the model and was cut")


def query_gallery(backbone, dataset):
    gallery = query.load_gallery(backbone, dataset)
    return gallery, query.embed_gallery(backbone, gallery)


def test_vlpet_token_gates_make_one_map_over_the_patches(offline, base_scenes):
    handle = attach(offline, "vlpet", {"granularity": "large", "init": "paper"})
    try:
        view = query.read_gates(handle, base_scenes.path(base_scenes.items[0]), "a red circle")
        rows, cols, _ = offline.patch_grid()
        assert view.patch_map.shape == (rows, cols)
        vision = [handle.patch_map(g)[0] for k, g in view.readout.items() if k.startswith("vision.")]
        assert torch.allclose(view.patch_map, torch.stack(vision).mean(dim=0))
        assert any(k.startswith("text.") for k in view.readout)
        assert view.picture.size == (64, 64)
    finally:
        handle.detach()


def test_aurora_readout_needs_no_picture(offline):
    handle = attach(offline, "aurora", {})
    try:
        view = query.read_gates(handle)
        assert view.patch_map is None and view.picture is None
        assert "vision.modes.q" in view.readout and "text.delta_norm.fc1" in view.readout
    finally:
        handle.detach()


@pytest.mark.parametrize("family", ["blip", "blip-vqa"])
def test_vlpet_gates_on_every_blip_tower(family, tmp_path, base_scenes):
    from tests.conftest import write_tiny_blip, write_tiny_blip_vqa

    write = write_tiny_blip if family == "blip" else write_tiny_blip_vqa
    backbone = load_backbone(f"{family}:{write(tmp_path / 'tiny')}")
    handle = attach(backbone, "vlpet", {"granularity": "middleX", "init": "paper", "sites": ["attn", "cross", "mlp"],
                                        "decoder": "gated"})   # the answer decoder gated too, not value-parallel
    view = query.read_gates(handle, base_scenes.path(base_scenes.items[0]), "what colour is the shape?")
    towers = {key.split(".")[0] for key in view.readout}
    assert towers == set(backbone.towers)   # vision, text (and the answer decoder)
    assert any(key.endswith(".cross") for key in view.readout)   # the text tower ran cross-attending
    assert view.patch_map.shape == backbone.patch_grid()[:2]
