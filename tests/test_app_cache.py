"""The app's one model cache (app/models.py): frozen backbones shared by every session within a
memory budget, a run's PET weights attached for one call and taken off after it, galleries
embedded once per model state, and inference in half precision ranking as fp32 does."""
import pytest
import torch
from PIL import Image

from app import models
from app.device import Call
from app.sessions import SessionStore
from core import query
from core.data import read_dataset
from core.data.samples import sample_path
from core.runs import tune

CPU = Call(torch.device("cpu"))


def _state(backbone) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in backbone.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An offline BitFit run (tunes biases in place) and an Aurora run (merged for inference)."""
    root = tmp_path_factory.mktemp("runs")
    return {method: tune("offline", sample_path("photos"), method, shots=4, epochs=2, lr=5e-2, seed=0,
                         out=root / method).out for method in ("bitfit", "aurora")}


def test_backbones_are_shared_and_the_least_recently_used_go_beyond_the_budget():
    cache = models.ModelCache(budget_mb=1e6)
    first, _ = cache.backbone("offline", 0, False)
    assert cache.backbone("offline", 0, False)[0] is first   # every session gets the same one
    size_mb = models._bytes(first) / 2**20
    cache.budget = 2.5 * size_mb * 2**20                      # room for two
    cache.backbone("offline", 1, False)
    cache.backbone("offline", 0, False)                       # seed 1 is now the least recently used
    cache.backbone("offline", 2, False)
    assert len(cache) == 2 and cache.backbone("offline", 0, False)[0] is first
    assert [key[1] for key in cache._backbones] == [2, 0]


@pytest.mark.parametrize("method", ["bitfit", "aurora"])
def test_a_run_is_attached_for_one_call_and_the_shared_backbone_is_put_back(runs, method):
    cache = models.ModelCache(budget_mb=1e6)
    backbone, _ = cache.backbone("offline", 0, False)
    before = _state(backbone)
    pixels = torch.stack([backbone.image_transform(Image.new("RGB", (40, 30), colour))
                          for colour in ((200, 40, 40), (30, 90, 220))])
    with torch.no_grad():
        frozen = backbone.encode_image(pixels)
    # a call computes in the precision the hardware does fastest (bf16 where native): the frozen
    # model's embeddings in the same call differ from the tuned model's only by the run's weights
    with cache.on(CPU, models.ModelKey("offline", 0, False)) as (inside, handle):
        assert inside is backbone and handle is None
        frozen_in_call = backbone.encode_image(pixels).float()
    key = models.ModelKey("offline", 0, False, str(runs[method]))
    with cache.on(CPU, key) as (inside, handle):
        assert inside is backbone and handle.method == method
        tuned = backbone.encode_image(pixels).float()
    assert not torch.allclose(tuned, frozen_in_call, atol=1e-2)   # the run's weights did act
    after = _state(backbone)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert not any(p.requires_grad for p in backbone.parameters()) and backbone.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(pixels), frozen)


def test_gallery_embeddings_are_kept_per_model_state_and_dataset(tmp_path):
    store = SessionStore(tmp_path)
    session = store.get("cache")
    session.dataset = read_dataset(sample_path("photos"), tmp_path)
    frozen = models.ModelKey("offline", 0, False)
    items, embeddings = models.gallery(session, frozen, 8)
    assert embeddings is None                                 # nothing embedded until a call does it
    with models.MODELS.on(CPU, frozen) as (backbone, _):
        embeddings = query.embed_gallery(backbone, items)
    models.keep_gallery(session, frozen, 8, items, embeddings)
    kept = models.gallery(session, frozen, 8)
    assert kept[0] is items and kept[1] is embeddings
    other_seed = models.ModelKey("offline", 1, False)         # the same pictures, its own embeddings
    shared, none = models.gallery(session, other_seed, 8)
    assert shared is items and none is None
    assert not store.get("another").galleries                 # a session's galleries are its own
    for seed in range(2, 2 + models.GALLERIES_KEPT):
        models.keep_gallery(session, models.ModelKey("offline", seed, False), 8, items, embeddings)
    assert len(session.galleries) == models.GALLERIES_KEPT and models.gallery(session, frozen, 8)[1] is None


def test_inference_in_bf16_ranks_the_gallery_as_fp32_does(tmp_path):
    """The app computes queries in bf16 where the device has it natively: forced here on the CPU,
    every caption of the sample set finds the same best picture as in fp32."""
    session = SessionStore(tmp_path).get("bf16")
    session.dataset = read_dataset(sample_path("photos"), tmp_path)
    key = models.ModelKey("offline", 0, False)
    items, _ = models.gallery(session, key, 8)
    tops = {}
    for precision in (None, torch.bfloat16):
        with models.MODELS.on(CPU, key) as (backbone, _), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            embeddings = query.embed_gallery(backbone, items)
            tops[precision] = [query.search_by_text(backbone, items, embeddings, caption).hits[0].index
                               for caption in items.captions]
            assert embeddings.media.dtype == torch.float32
    assert len(tops[None]) >= 10 and tops[torch.bfloat16] == tops[None]
