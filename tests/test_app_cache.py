"""The app's one model cache (app/models.py): frozen backbones shared by every session within a
memory budget, a run's PET weights attached for one call and taken off after it, galleries
embedded once per model state, and inference in half precision ranking as fp32 does."""
import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

import app.tabs.compare
import app.tabs.data
import app.tabs.tune
import app.tuning
from app import models, sessions
from app.device import Call
from app.sessions import SessionStore
from app.tabs import ask, inspect, weights
from app.tabs.compare import compare_methods
from app.tabs.data import load_sample
from app.tabs.tune import tune_model
from app.tuning import load_for_report, report_on_device
import core.runs
import core.sweep
from core import query
from core.backbones import BackboneError
from core.backbones.base import weights_bytes
from core.data import read_dataset
from core.data.samples import sample_path
from core.runs import read_run_info, tune

CPU = Call(torch.device("cpu"))
TINY = "openclip:PETStudio-Tiny"
PHOTOS = "Photos: 8 photographs with captions and questions (image-text, VQA)"


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
    first, _ = cache.backbone(TINY, 0, False)
    assert cache.backbone(TINY, 0, False)[0] is first   # every session gets the same one
    size_mb = weights_bytes(first) / 2**20
    cache.budget = 2.5 * size_mb * 2**20                # room for two
    cache.backbone(TINY, 1, False)                      # another seed, another random init
    cache.backbone(TINY, 0, False)                      # seed 1 is now the least recently used
    cache.backbone(TINY, 2, False)
    assert len(cache) == 2 and cache.backbone(TINY, 0, False)[0] is first
    assert [key[1] for key in cache._backbones] == [2, 0]
    # pretrained weights are the same whatever the seed: one model, not one per seed
    cache.budget = 1e6 * 2**20
    assert cache.backbone("offline", 3, False)[0] is cache.backbone("offline", 0, False)[0] and len(cache) == 3


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
    items, embeddings, served = models.gallery(session, frozen, 8)
    assert embeddings is None and served == "offline"         # nothing embedded until a call does it
    with models.MODELS.on(CPU, frozen) as (backbone, _):
        embeddings = query.embed_gallery(backbone, items)
    models.keep_gallery(session, frozen, served, 8, items, embeddings)
    kept = models.gallery(session, frozen, 8)
    assert kept[0] is items and kept[1] is embeddings
    other_seed = models.ModelKey("offline", 1, False)         # the same pictures, its own embeddings
    shared, none, _ = models.gallery(session, other_seed, 8)
    assert shared is items and none is None
    assert not store.get("another").galleries                 # a session's galleries are its own
    for seed in range(2, 2 + models.GALLERIES_KEPT):
        models.keep_gallery(session, models.ModelKey("offline", seed, False), "offline", 8, items, embeddings)
    assert len(session.galleries) == models.GALLERIES_KEPT and models.gallery(session, frozen, 8)[1] is None


def test_inference_in_bf16_ranks_the_gallery_as_fp32_does(tmp_path):
    """The app computes queries in bf16 where the device has it natively: forced here on the CPU,
    every caption of the sample set finds the same best picture as in fp32."""
    session = SessionStore(tmp_path).get("bf16")
    session.dataset = read_dataset(sample_path("photos"), tmp_path)
    key = models.ModelKey("offline", 0, False)
    items, _, _ = models.gallery(session, key, 8)
    tops = {}
    for precision in (None, torch.bfloat16):
        with models.MODELS.on(CPU, key) as (backbone, _), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            embeddings = query.embed_gallery(backbone, items)
            tops[precision] = [query.search_by_text(backbone, items, embeddings, caption).hits[0].index
                               for caption in items.captions]
            assert embeddings.media.dtype == torch.float32
    assert len(tops[None]) >= 10 and tops[torch.bfloat16] == tops[None]


@pytest.fixture
def visitor(tmp_path, monkeypatch):
    """A request of a session of the app's own store, kept under tmp_path."""
    store = SessionStore(tmp_path / "sessions")
    for module in (sessions, weights, inspect, app.tuning, app.tabs.tune, app.tabs.compare, app.tabs.data):
        monkeypatch.setattr(module, "STORE", store)
    return SimpleNamespace(session_hash="visitor")


def test_a_backbone_larger_than_the_cache_is_refused_before_it_is_built(visitor, monkeypatch):
    built = []

    def recorded(load):
        def loading(spec, *args, **kwargs):
            if "bigG" in spec and kwargs.get("budget") is None:
                raise AssertionError("ViT-bigG-14 was being built")
            backbone = load(spec, *args, **kwargs)   # a load within a budget refuses before building
            built.append(spec)
            return backbone
        return loading

    for module in (models, core.runs, core.sweep):   # the app's cache, and a tuning's and a comparison's own loads
        monkeypatch.setattr(module, "load_backbone", recorded(module.load_backbone))
    cache = models.ModelCache(budget_mb=100)
    with pytest.raises(BackboneError, match=r"openclip:ViT-B-32 needs 577 MiB for its weights, more than this app "
                                            r"keeps for models \(100 MiB\)"):
        cache.backbone("openclip:ViT-B-32", 0, False)
    assert built == [] and len(cache) == 0
    assert cache.backbone("offline", 0, False)[0].spec == "offline" and built == ["offline"]   # 30 MB fits
    # Tune, Compare and Ask refuse ViT-bigG-14 (9.5 GiB, more than any budget's 8) before a folder or the device.
    load_sample(PHOTOS, visitor)
    big = "openclip:ViT-bigG-14"
    for call in (lambda: tune_model(big, "retrieval", "lora", {}, 4, 1, 1e-2, 8, "auto", "", 8, "studio", visitor),
                 lambda: compare_methods(big, "retrieval", ["lora"], None, "0", 4, 1, 8, 8, "auto", "studio", visitor),
                 lambda: ask.search_text("a cat", models.NO_RUN, big, visitor)):
        with pytest.raises(gr.Error, match="openclip:ViT-bigG-14 needs 9.5 GiB for its weights"):
            call()
    assert built == ["offline"]
    assert not [p for p in sessions.STORE.get("visitor").folder.iterdir() if p.name in ("runs", "sweeps")]
    # A hub repository may grow between that early check and a tuning's own load: the load keeps the budget too.
    monkeypatch.setattr(models.MODELS, "refuse_oversized", lambda spec: None)
    for call in (lambda: tune_model(big, "retrieval", "lora", {}, 4, 1, 1e-2, 8, "auto", "", 8, "studio", visitor),
                 lambda: compare_methods(big, "retrieval", ["lora"], None, "0", 4, 1, 8, 8, "auto", "studio", visitor)):
        with pytest.raises(gr.Error, match="openclip:ViT-bigG-14 needs 9.5 GiB for its weights, more than this app "
                                           "keeps for models"):
            call()
    assert built == ["offline"]


def test_an_export_keeps_the_apps_model_budget(visitor, tmp_path, monkeypatch):
    """Export loads its own copy of the run's backbone (core.export): within the budget, as every load is."""
    run = Path(tune("offline", sample_path("photos"), "lora", shots=2, epochs=1, lr=1e-2, seed=0,
                    out=tmp_path / "run").out)
    session = sessions.session_of(visitor)
    session.runs["1 · lora · offline"] = sessions.Run("1 · lora · offline", run, read_run_info("offline", run),
                                                      local_paths=False)
    monkeypatch.setattr(models.MODELS, "budget", 2**20)
    with pytest.raises(gr.Error, match=r"offline needs \d+ MiB for its weights, more than this app keeps for models "
                                       r"\(1 MiB\)"):
        inspect.export_run("1 · lora · offline", visitor)
    assert not list(session.folder.glob("exports/*"))
    monkeypatch.setattr(models.MODELS, "budget", 2**30)
    assert inspect.export_run("1 · lora · offline", visitor).endswith("exported.zip")


def test_a_refused_upload_leaves_no_model_behind(visitor, tmp_path):
    run = Path(tune("offline", sample_path("photos"), "lora", shots=2, epochs=1, lr=1e-2, seed=0,
                    out=tmp_path / "run").out)
    info = json.loads((run / "run.json").read_text())
    # the same weights claimed for another architecture: refused when attached, after its backbone was built
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({**info, "backbone": "openclip:PETStudio-Tiny", "seed": 7}))
    files = [str(run / "pet.safetensors"), str(tmp_path / "other" / "run.json")]
    held = dict(models.MODELS._backbones)
    with pytest.raises(gr.Error, match="pet.safetensors: lora weights do not match"):
        weights.load_weights(files, visitor)
    assert models.MODELS._backbones == held   # the tiny model it built for the check is let go
    (tmp_path / "other" / "run.json").write_text(json.dumps({**info, "backbone": "openclip:ViT-bigG-14"}))
    with pytest.raises(gr.Error, match="openclip:ViT-bigG-14 needs 9.5 GiB"):
        weights.load_weights(files, visitor)
    assert not list(sessions.STORE.get("visitor").folder.glob("runs/*"))


def test_a_stand_in_for_an_unreachable_backbone_refuses_its_runs_and_is_said_in_ask(visitor, tmp_path):
    # a run tuned on that backbone is not attached to the offline model standing in for it, nor is the stand-in kept
    run = Path(tune("offline", sample_path("photos"), "bitfit", shots=2, epochs=1, lr=1e-2, seed=0,
                    out=tmp_path / "run").out)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "backbone": "openclip:ViT-B-32:openai"}))
    held = dict(models.MODELS._backbones)
    with pytest.raises(gr.Error, match="this run was tuned on openclip:ViT-B-32:openai, which this app cannot load "
                                       "now: openclip:ViT-B-32:openai could not be fetched"):
        weights.load_weights([str(run / "pet.safetensors"), str(run / "run.json")], visitor)
    assert models.MODELS._backbones == held
    load_sample(PHOTOS, visitor)
    with pytest.warns(UserWarning, match="openclip:ViT-B-32:openai could not be fetched .*bundled offline model"):
        frozen, tuned = ask.search_text("a cat", models.NO_RUN, "openclip:ViT-B-32:openai", visitor)
    assert len(frozen) == 5 and tuned == []


def test_a_report_in_the_app_reads_the_gates_on_the_shared_backbone(runs, tmp_path, monkeypatch):
    """The Run report and Compare's report load no backbone of their own (a comparison's report had loaded
    one per method): the gates are read on the app's shared backbone, which is put back as it was."""
    import core.report

    def no_load(*args, **kwargs):
        raise AssertionError("the report loaded a backbone of its own")

    monkeypatch.setattr(core.report, "load_backbone", no_load)
    monkeypatch.setattr(core.runs, "load_backbone", no_load)   # nor through core.runs.load_run, as before
    # loaded before the device call, and only for methods with gates to show
    models.MODELS.clear()
    load_for_report("offline", 0, False, ["lora", "bitfit"])
    assert len(models.MODELS) == 0
    load_for_report("offline", 0, False, ["lora", "aurora"])
    assert len(models.MODELS) == 1

    with monkeypatch.context() as refusing:
        refusing.setattr(models.MODELS, "budget", 1)   # every model too large
        load_for_report(TINY, 0, False, ["vlpet"])   # left to the report's gates figure to say
        assert len(models.MODELS) == 1
    shared, _ = models.MODELS.backbone("offline", 0, False)
    before = _state(shared)
    page = Path(report_on_device(CPU, str(runs["aurora"]), str(tmp_path / "r.html"), False)).read_text()
    assert "aurora has no gates" not in page and "the gates need the run" not in page
    after = _state(shared)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert models.MODELS.backbone("offline", 0, False)[0] is shared and shared.pet is None
    # a backbone that cannot be fetched now: the offline model standing in for it has none of the run's gates
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "pet.safetensors").write_bytes((Path(runs["aurora"]) / "pet.safetensors").read_bytes())
    info = json.loads((Path(runs["aurora"]) / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**info, "backbone": "openclip:ViT-B-32:openai"}))
    page = Path(report_on_device(CPU, str(moved), str(tmp_path / "moved.html"), False)).read_text()
    assert "the gates need the run's backbone, which could not be loaded: this run was tuned on " \
           "openclip:ViT-B-32:openai, which this app cannot load now: openclip:ViT-B-32:openai could not be " \
           "fetched" in page


def test_a_stand_in_is_kept_a_minute_then_the_hub_is_asked_again(visitor, monkeypatch):
    """The offline model standing in for an unreachable backbone is not served under that backbone's name
    for ever: a query a minute later asks the hub again, keeps the stand-in while the hub stays down, and
    once it answers searches with the real backbone (the pictures and embeddings kept for the stand-in, of
    another size, are not used with it)."""
    hub = "openclip:ViT-B-32:openai"
    now = [1000.0]
    monkeypatch.setattr(models.time, "monotonic", lambda: now[0])
    models.MODELS.clear()
    load_sample(PHOTOS, visitor)
    with pytest.warns(UserWarning, match="could not be fetched"):
        frozen, _ = ask.search_text("a cat", models.NO_RUN, hub, visitor)
    stand_in = models.MODELS.backbone(hub, 0, False)[0]
    assert stand_in.fallback_note and stand_in.spec == "offline" and len(frozen) == 5
    tried = []
    real = models.load_backbone

    def hub_down(spec, seed, **kwargs):
        tried.append((spec, kwargs.get("fallback_offline", False)))
        return real(spec, seed, **kwargs)

    monkeypatch.setattr(models, "load_backbone", hub_down)
    now[0] += models.STAND_IN_RETRY_S - 1
    with pytest.warns(UserWarning, match="could not be fetched"):
        ask.search_text("a cat", models.NO_RUN, hub, visitor)
    assert tried == []   # within the minute: not asked again
    now[0] += 2
    with pytest.warns(UserWarning, match="could not be fetched"):
        ask.search_text("a cat", models.NO_RUN, hub, visitor)
    # asked once, with no second stand-in built: the first stays, and the next minute starts now
    assert tried == [(hub, False)] and models.MODELS.backbone(hub, 0, False)[0] is stand_in
    now[0] += models.STAND_IN_RETRY_S - 1
    with pytest.warns(UserWarning, match="could not be fetched"):
        ask.search_text("a cat", models.NO_RUN, hub, visitor)
    assert len(tried) == 1

    def hub_refuses(spec, seed, **kwargs):   # any other refusal on a retry keeps the stand-in too
        tried.append((spec, kwargs.get("fallback_offline", False)))
        raise BackboneError(f"{spec}: its checkpoint has a layer this PET Studio does not know")

    monkeypatch.setattr(models, "load_backbone", hub_refuses)
    now[0] += 2
    with pytest.warns(UserWarning, match="could not be fetched"):
        ask.search_text("a cat", models.NO_RUN, hub, visitor)
    assert len(tried) == 2 and models.MODELS.backbone(hub, 0, False)[0] is stand_in
    now[0] += models.STAND_IN_RETRY_S + 1
    fetched = real(TINY, 0)   # another architecture than the offline model: other pictures, other widths
    fetched.spec = hub

    def hub_back(spec, seed, **kwargs):
        tried.append((spec, kwargs.get("fallback_offline", False)))
        return fetched if spec == hub else real(spec, seed, **kwargs)

    monkeypatch.setattr(models, "load_backbone", hub_back)
    now[0] += 2
    frozen, _ = ask.search_text("a cat", models.NO_RUN, hub, visitor)
    assert tried == [(hub, False)] * 3 and models.MODELS.backbone(hub, 0, False)[0] is fetched
    assert len(frozen) == 5 and len(models.MODELS) == 1   # the stand-in is let go
    session = sessions.STORE.get("visitor")
    assert {served for (_, served, _, _) in session.galleries} == {"offline", hub}
    # a gallery the handler took for the stand-in, when the hub answered before the device call
    stale = next(items for (_, served, _, _), (items, _) in session.galleries.items() if served == "offline")
    with pytest.raises(BackboneError, match="replaced the bundled offline model that stood in for it while you asked"):
        ask._search_text_on(CPU, [(models.ModelKey(hub, 0, False), stale, None, "offline")], "a cat")
    models.MODELS.clear()


def test_a_load_lets_go_only_of_what_no_other_load_has_taken_since():
    cache = models.ModelCache(budget_mb=1e6)
    key = models.ModelKey(TINY, 5, False)
    loaded = cache.load([key])
    cache.forget(loaded)
    assert len(cache) == 0 and loaded.built == []
    loaded = cache.load([key])
    cache.backbone(TINY, 5, False)              # the same handler's device call uses it: still its own
    cache.forget(loaded)
    assert len(cache) == 0
    loaded = cache.load([key])
    assert cache.load([key]).built == []        # another session's load takes it meanwhile
    taken, _ = cache.backbone(TINY, 5, False)
    cache.forget(loaded)
    assert cache.backbone(TINY, 5, False)[0] is taken and len(cache) == 1
