import json
import shutil
from types import SimpleNamespace

import httpx2
import huggingface_hub
import huggingface_hub.errors
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from core.backbones import (FAMILIES, BackboneError, Family, WeightsBudget, describe_spec, load_backbone, register_family,
                            estimate_weights_bytes)
from core.backbones.base import weights_bytes
from core.backbones.blip import HUB_FILES
from tests.conftest import TINY, embeddings


def reference_model(name, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
    return model.eval()


@pytest.mark.parametrize("name", ["PETStudio-Tiny", "ViT-B-32"])
def test_embeddings_equal_open_clip(name):
    backbone = load_backbone(f"openclip:{name}", seed=3)
    reference = reference_model(name, seed=3)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, *reference.visual.image_size)
    tokens = backbone.tokenize(["a photo of a dog", "two red cubes next to a very small blue sphere"])
    image, text = embeddings(backbone, pixels, tokens)
    with torch.no_grad():
        assert torch.allclose(image, reference.encode_image(pixels), atol=1e-5, rtol=0)
        assert torch.allclose(text, reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_text_padding_is_trimmed_to_longest_caption_without_changing_embeddings(tiny):
    reference = reference_model("PETStudio-Tiny")
    tokens = tiny.tokenize(["a red square", "a blue circle on the left"])
    longest = int((tokens != 0).sum(dim=1).max())
    seen = []
    tiny.towers["text"].blocks[0].module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    _, text = embeddings(tiny, torch.zeros(1, 3, 32, 32), tokens)
    assert tokens.shape[1] == 32 and seen[-1] == longest < 32
    with torch.no_grad():
        assert torch.allclose(text, reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_tower_layout_describes_blocks_projections_and_sites():
    backbone = load_backbone("openclip:ViT-B-32")
    vision, text = backbone.towers["vision"], backbone.towers["text"]
    assert (vision.width, text.width, vision.depth, text.depth) == (768, 512, 12, 12)
    assert (vision.causal, text.causal) == (False, True)
    block = vision.blocks[5]
    assert set(block.projections) == {"q", "k", "v", "out", "fc1", "fc2"}
    assert set(block.sites) == {"attn", "mlp"}
    assert [block.projections[p].out_features for p in ("q", "k", "v", "fc1", "fc2")] == [768, 768, 768, 3072, 768]
    assert block.heads == 12 and text.blocks[0].heads == 8
    assert [p.shape for p in vision.output_parameters] == [(768, 512)]


def test_a_delta_lands_only_on_its_own_slice_of_the_packed_qkv(tiny):
    in_proj = tiny.towers["vision"].blocks[0].projections["v"].linear
    x = torch.randn(2, 5, 64)
    before = in_proj(x)
    tiny.towers["vision"].blocks[0].projections["v"].add_delta("test", lambda inp: torch.ones(*inp.shape[:-1], 64))
    after = in_proj(x)
    assert torch.equal(after[..., :128], before[..., :128])
    assert torch.allclose(after[..., 128:], before[..., 128:] + 1)
    tiny.towers["vision"].blocks[0].projections["v"].remove_delta("test")
    assert torch.equal(in_proj(x), before)


def test_random_init_is_drawn_from_the_seed_and_says_so():
    a, b, c = (load_backbone(TINY, seed=s) for s in (7, 7, 8))
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.visual.proj"], pc["model.visual.proj"])
    assert a.weights == "random init (seed 7): no pretrained weights" and not a.pretrained
    assert "random init" in a.describe()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads_through_open_clip(tmp_path, suffix):
    source = reference_model("PETStudio-Tiny", seed=11)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    backbone = load_backbone(f"openclip:PETStudio-Tiny:{path}", seed=0)
    assert backbone.pretrained and backbone.weights == f"local checkpoint {path}"
    pixels, tokens = torch.randn(2, 3, 32, 32), backbone.tokenize(["a cat", "a dog"])
    image, text = embeddings(backbone, pixels, tokens)
    with torch.no_grad():
        assert torch.allclose(image, source.encode_image(pixels), atol=1e-6)
        assert torch.allclose(text, source.encode_text(tokens), atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused_clearly(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(BackboneError, match=r"could not load open_clip PETStudio-Tiny weights from file .*wrong.pt"):
        load_backbone(f"openclip:PETStudio-Tiny:{path}")


@pytest.mark.parametrize("spec, message", [
    ("openclip:NoSuchNet", "unknown open_clip model 'NoSuchNet'"),
    ("openclip:ViT-B-32:no_such_tag", "no pretrained tag 'no_such_tag' for ViT-B-32; known tags: openai"),
    ("openclip:ViT-B-32:/nowhere/model.pt", "checkpoint file not found: /nowhere/model.pt"),
    ("clip-ish:thing", "unknown backbone spec 'clip-ish:thing'"),
])
def test_bad_specs_get_clear_messages(spec, message):
    with pytest.raises(BackboneError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_backbone(spec)


def test_pretrained_tag_without_network_says_so():
    with pytest.raises(BackboneError, match=r"could not fetch open_clip ViT-B-32 weights for tag openai \(no network"):
        load_backbone("openclip:ViT-B-32:openai")


@pytest.mark.parametrize("spec, local_paths, notice", [
    ("offline", False, "The bundled offline model: small, pretrained on PET Studio's procedural world, no network "
                       "needed."),
    ("openclip:ViT-B-32", False, "`openclip:ViT-B-32` has no pretrained weights: random init from the seed (for "
                                 "trying the mechanics, not quality)."),
    ("blip:Salesforce/blip-itm-base-coco", False, "`blip:Salesforce/blip-itm-base-coco` downloads its weights on "
     "first use. Without a network the run falls back to the bundled offline model and says so here."),
    ("blip-vqa:/srv/m", True, "`blip-vqa:/srv/m`: weights from a local path."),
    ("openclip:ViT-B-32:/srv/x.pt", False, "`openclip:ViT-B-32:/srv/x.pt` names a file or folder on the server, "
     "which this app does not open (its operator can allow it with PETSTUDIO_LOCAL_PATHS=1)."),
    ("clip-ish:thing", False, "unknown backbone spec 'clip-ish:thing': expected openclip:NAME[:TAG|:PATH], "
                              "blip:base|HUB_ID|PATH, blip-vqa:base|HUB_ID|PATH or offline"),
])
def test_a_spec_is_described_by_its_form_before_anything_loads(spec, local_paths, notice):
    assert describe_spec(spec, local_paths) == notice


def test_a_registered_family_is_read_loaded_and_described_like_the_others():
    def load(spec, seed, local_paths, budget):
        return load_backbone(TINY, seed, budget=budget)

    register_family(Family("toy", "toy", lambda rest: None if rest else ("PETStudio-Tiny", None, "random"), load,
                           ("retrieval",), {"random": "`{spec}` is a toy."}, lambda spec: 1234))
    try:
        assert load_backbone("toy").tasks == ("retrieval",) and estimate_weights_bytes("toy") == 1234
        assert describe_spec("toy", local_paths=False) == "`toy` is a toy."
        assert describe_spec("toy:x", local_paths=False).endswith("blip-vqa:base|HUB_ID|PATH, offline or toy")
        with pytest.raises(ValueError, match="already registered"):
            register_family(FAMILIES["toy"])
    finally:
        FAMILIES.pop("toy")
    older = Family("older", "older", lambda rest: ("PETStudio-Tiny", None, "random"),
                   lambda spec, seed, local_paths: load_backbone(TINY, seed), ("retrieval",), {}, lambda spec: None)
    with pytest.raises(ValueError, match=r"backbone family older: load must take \(spec, seed, local_paths, budget\)"):
        register_family(older)   # written before the budget: said when registered, not at a user's first load
    assert "older" not in FAMILIES


def test_optional_parts_are_declared_and_refused_clearly_where_missing(tiny):
    assert tiny.tasks == ("retrieval", "vqa") and not tiny.has("matching") and not tiny.has("image_tokens")
    with pytest.raises(BackboneError, match=r"^openclip:PETStudio-Tiny has no image-text matching head$"):
        tiny.fused_cls(torch.zeros(1, 4, 64), tiny.tokenize(["a cat"]))
    with pytest.raises(BackboneError, match="openclip:PETStudio-Tiny has no answer decoder"):
        tiny.generate_answers(torch.zeros(1, 4, 64), tiny.tokenize(["what?"]))
    with pytest.raises(ValueError, match="unknown backbone capability 'itm'"):
        tiny.has("itm")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_training_under_low_precision_autocast_runs_attention_in_fp32_on_a_cpu(low, monkeypatch):
    """A CPU's bf16/fp16 attention backward is slower than fp32's (README "Benchmark"): a pass whose
    attention needs gradients — from its input or from trainable projections — leaves autocast for
    attention alone; a frozen block in training and a forward without gradients stay in it."""
    import torch.nn.functional as F

    from core.backbones.block import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(torch.nn.MultiheadAttention(64, 4, batch_first=True))
    real, seen = F.scaled_dot_product_attention, []

    def spied(q, k, v, **options):
        seen.append(q.dtype)
        return real(q, k, v, **options)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spied)
    x = torch.randn(3, 7, 64)

    def attend(inputs):
        with torch.autocast("cpu", dtype=low):
            return attention(inputs, causal=True)

    trained = attend(x.requires_grad_())          # the input needs gradients
    attend(x.detach())                            # only the projections do
    attention.requires_grad_(False)
    attend(x.detach())                            # a frozen block in a training pass
    with torch.no_grad():
        attend(x)                                 # a query
    assert seen == [torch.float32, torch.float32, low, low] and trained.dtype == low
    # the gradients are those of a pass whose attention alone is fp32, by hand
    trained.float().sum().backward()
    grad, x.grad = x.grad, None
    with torch.autocast("cpu", dtype=low):
        q, k, v = (t.view(3, 7, 4, 16).transpose(1, 2) for t in attention.in_proj(x).chunk(3, dim=-1))
    mixed = real(q.float(), k.float(), v.float(), is_causal=True).transpose(1, 2).reshape(3, 7, 64)
    with torch.autocast("cpu", dtype=low):
        attention.out_proj(mixed).float().sum().backward()
    assert torch.equal(grad, x.grad)


def test_a_backbones_weights_are_sized_before_anything_builds_them(tiny_blip_folder, tmp_path, monkeypatch):
    for spec in ("offline", TINY):
        assert estimate_weights_bytes(spec) == weights_bytes(load_backbone(spec))
    assert estimate_weights_bytes("blip:base") == weights_bytes(load_backbone("blip:base").model)
    assert estimate_weights_bytes("openclip:ViT-B-32:openai") == estimate_weights_bytes("openclip:ViT-B-32") == 605_132_968   # fp32
    assert estimate_weights_bytes("openclip:ViT-B-32:/x.pt") is None and estimate_weights_bytes("openclip:no-such-model") is None
    for spec in ("openclip:RN50", "openclip:coca_ViT-B-32"):   # refused before anything is built
        with pytest.raises(BackboneError, match="only ViT vision towers|only open_clip's own causal text"):
            estimate_weights_bytes(spec)

    def unreachable(repo_id, filename, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert estimate_weights_bytes("blip:Salesforce/blip-itm-base-coco") is None   # its loader says why
    # A hub model is sized from its config.json alone, fetched from the hub (served here from a local copy
    # laid out as the hub cache lays out a commit).
    fetched, asked, repository = [], [], {"model.safetensors": 2_000_000, "config.json": 3_000, "tokenizer.json": 200_000}
    folder = tmp_path / "hub" / "snapshots" / "c0ffee"
    folder.mkdir(parents=True)
    cache_holds, cached = [tiny_blip_folder], {"config.json"}

    def hf_hub_download(repo_id, filename, revision=None, dry_run=False, local_files_only=False):
        """The hub's answer for one file: its size (a dry run), or the file, fetched."""
        if dry_run:
            if repository is None or refusal:
                raise OSError("no network")
            return huggingface_hub.DryRunFileInfo("c0ffee", repository["config.json"], filename, str(folder / filename),
                                                  False, True)
        if not local_files_only:   # the hub cache's copy otherwise
            assert revision == "c0ffee"   # the commit the dry run named
            fetched.append((repo_id, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    refusal = []   # what the hub answers a repository it refuses

    # the hub cache, where a load keeps the commit it built in the ref of the default branch
    repository_cache = tmp_path / "hub-cache" / "models--someone--tiny"
    ref = repository_cache / "refs" / "main"
    shutil.copytree(tiny_blip_folder, repository_cache / "snapshots" / "c0ffee")
    cache_holds[0] = repository_cache / "snapshots" / "c0ffee"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def repo_info(self, repo_id):
        """The commit the default branch names now, asked without moving the cache's ref."""
        if refusal:
            raise refusal[0]
        return SimpleNamespace(sha="c0ffee")

    def resolve_revision(repo_id, local_files_only=False):
        """The commit the hub cache's ref keeps (the library's own resolving is asked of the cache only)."""
        assert local_files_only
        if not ref.is_file():
            raise OSError("nothing cached")
        return SimpleNamespace(resolved=ref.read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "resolve_revision", resolve_revision)

    def snapshot_download(repo_id, allow_patterns, revision, dry_run=False, local_files_only=False):
        """The hub's listing of the files loading would fetch (a dry run), or the fetch itself."""
        assert allow_patterns == HUB_FILES
        if dry_run:
            if repository is None or refusal:
                raise OSError("no network")
            return [huggingface_hub.DryRunFileInfo(revision, size, name, str(folder / name), name in cached,
                                                   name not in cached) for name, size in repository.items()]
        asked.append((revision, local_files_only))
        return str(cache_holds[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    tiny_config = (tiny_blip_folder / "config.json").read_text()
    tiny_bytes = weights_bytes(load_backbone(f"blip:{tiny_blip_folder}").model)
    (folder / "config.json").write_text(tiny_config)
    assert estimate_weights_bytes("blip:someone/tiny") == tiny_bytes
    assert fetched == [("someone/tiny", "config.json")]
    # A repository the hub refuses (missing, private, gated) is said so, with no offline stand-in for it, and so is
    # one with no config.json.
    answer = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/someone/gated"))
    refusal.append(huggingface_hub.errors.GatedRepoError("gated", response=answer))
    with pytest.raises(BackboneError, match=r"someone/gated: the hub refuses it \(HTTP 401: gated\); it may be missing, "
                                            r"private or gated") as refused:
        load_backbone("blip:someone/gated", fallback_offline=True)
    assert not refused.value.unreachable
    refusal[0] = huggingface_hub.errors.HfHubHTTPError("403 Forbidden", response=httpx2.Response(
        403, request=httpx2.Request("GET", "https://huggingface.co/api/models/someone/forbidden")))
    with pytest.raises(BackboneError, match=r"someone/forbidden: the hub refuses it \(HTTP 403: 403 Forbidden\)") as refused:
        load_backbone("blip:someone/forbidden", fallback_offline=True)
    assert not refused.value.unreachable
    refusal.clear()
    missing = huggingface_hub.errors.RemoteEntryNotFoundError("no config.json", response=httpx2.Response(
        404, request=httpx2.Request("HEAD", "https://huggingface.co/someone/empty/resolve/c0ffee/config.json")))
    with monkeypatch.context() as empty:
        empty.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: (_ for _ in ()).throw(missing))
        with pytest.raises(BackboneError, match="someone/empty: the repository has no config.json: not a BLIP model"):
            estimate_weights_bytes("blip:someone/empty")
        # the hub lists a gated repository and refuses only its files
        gated = huggingface_hub.errors.GatedRepoError("gated", response=answer)
        empty.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: (_ for _ in ()).throw(gated))
        with pytest.raises(BackboneError, match=r"someone/gated: the hub refuses it \(HTTP 401") as refused:
            load_backbone("blip:someone/gated", fallback_offline=True)
        assert not refused.value.unreachable
    # A "config" of gigabytes is refused before it is fetched.
    repository["config.json"] = 2 * 2**30
    with pytest.raises(BackboneError, match=r"someone/bloated: its config.json takes 2\.0 GiB, more than a config "
                                            r"needs \(1 MiB\): refused before fetching it"):
        estimate_weights_bytes("blip:someone/bloated")
    repository["config.json"] = 3_000
    assert fetched == [("someone/tiny", "config.json")]
    # A hostile config is refused before even its meta-device model is built.
    config = json.loads(tiny_config)
    config["text_config"]["num_hidden_layers"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackboneError, match="someone/huge: its config asks for 100000 layers in a tower"):
        estimate_weights_bytes("blip:someone/huge")
    with pytest.raises(BackboneError, match="someone/huge: its config asks for 100000 layers in a tower"):
        load_backbone("blip:someone/huge")
    # Loading sizes the newest commit itself and fetches that commit: the repository may have changed since.
    (folder / "config.json").write_text(tiny_config)
    load_backbone("blip:someone/tiny")
    assert asked == [("c0ffee", False)]
    # A small config beside files far larger than its model is refused before they are fetched.
    repository["model.safetensors"] = 40 * 2**30
    for attempt in (lambda: estimate_weights_bytes("blip:someone/filler"), lambda: load_backbone("blip:someone/filler")):
        with pytest.raises(BackboneError, match=r"someone/filler: the files it would fetch take 40\.0 GiB on disk, "
                                                rf"more than 2× the {tiny_bytes:,} bytes of the model its config builds"):
            attempt()
    repository["model.safetensors"] = 2_000_000
    # So are files that would leave the disk of the hub cache nearly full.
    with monkeypatch.context() as full:
        full.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**30, 2**30 + 2**20))
        with pytest.raises(BackboneError, match=r"someone/tiny: its files \(2 MiB\) would leave less than 1\.0 GiB free"):
            load_backbone("blip:someone/tiny")
        cached.update(repository)   # a model the hub cache holds whole fetches nothing, and loads
        load_backbone("blip:someone/tiny")
        cached.intersection_update({"config.json"})
    # The hub cache's ref names the last commit a load built: a sizing or a refused load leaves it as it was, so a
    # model the cache holds whole still loads offline.
    assert ref.read_text() == "c0ffee"
    ref.write_text("a11ce0")
    estimate_weights_bytes("blip:someone/tiny")
    assert ref.read_text() == "a11ce0"
    # A budget is kept by the load itself, against the commit it would fetch.
    with pytest.raises(BackboneError, match=r"blip:someone/tiny needs [\d,]+ bytes for its weights, more than this process "
                                            r"keeps for models"):
        load_backbone("blip:someone/tiny", budget=WeightsBudget(tiny_bytes - 1))
    assert ref.read_text() == "a11ce0"
    # A hub that rate-limits (HTTP 429) is as if unreachable: the commit the cache's ref keeps is sized and loaded.
    refusal.append(huggingface_hub.errors.HfHubHTTPError("429 Too Many Requests", response=httpx2.Response(
        429, request=httpx2.Request("GET", "https://huggingface.co/api/models/someone/tiny"))))
    with pytest.raises(BackboneError, match="blip:someone/tiny needs"):
        load_backbone("blip:someone/tiny", budget=WeightsBudget(tiny_bytes - 1))
    load_backbone("blip:someone/tiny")
    assert asked[-1] == ("a11ce0", True)   # from the cache alone
    refusal.clear()
    asked.pop()
    assert asked == [("c0ffee", False)] * 2   # nothing fetched by the refusals
    # A config the hub serves broken is said so: a broken repository, not a missing network, with no stand-in.
    (folder / "config.json").write_text("{not json")
    for attempt in (lambda: estimate_weights_bytes("blip:someone/broken"), lambda: load_backbone("blip:someone/broken")):
        with pytest.raises(BackboneError, match="someone/broken: its config.json is not a BLIP config") as refused:
            attempt()
        assert not refused.value.unreachable
    (folder / "config.json").write_text(tiny_config)
    # Where the hub cannot list the files, loading reads only what the hub cache already holds, and says so when
    # that is no model.
    repository = None
    assert estimate_weights_bytes("blip:someone/unlisted") == tiny_bytes
    load_backbone("blip:someone/unlisted")
    assert asked[2:] == [("c0ffee", True)]   # the commit the hub named, from the cache
    cache_holds[0] = folder   # config.json alone
    with pytest.raises(BackboneError, match="the hub could not list its files, and the hub cache holds no weights") \
            as refused:
        load_backbone("blip:someone/unlisted")
    assert refused.value.unreachable   # the offline model may stand in


def test_a_hub_that_names_a_newer_commit_and_cannot_serve_it_loads_the_one_cached(tiny_blip_folder, tmp_path,
                                                                                      monkeypatch):
    """The hub answers which commit its default branch names, then fails to serve that commit's files: the
    commit the hub cache's ref keeps, held whole, loads, sized from its own config and kept to the budget; a
    refusal is still said; with nothing whole in the cache the load is unreachable, and the offline model may
    stand in."""
    cache = tmp_path / "hub-cache" / "models--someone--tiny"
    shutil.copytree(tiny_blip_folder, cache / "snapshots" / "a11ce0")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("a11ce0")
    # the newer commit's config.json, fetched alone into its snapshot folder: a smaller model than the cached one
    newer = cache / "snapshots" / "beef00"
    newer.mkdir()
    config = json.loads((tiny_blip_folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    (newer / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id: SimpleNamespace(sha="beef00"))
    monkeypatch.setattr(huggingface_hub, "resolve_revision", lambda repo_id, local_files_only=False: SimpleNamespace(
        resolved=(cache / "refs" / "main").read_text()))

    def hf_hub_download(repo_id, filename, revision=None, dry_run=False, local_files_only=False):
        assert revision == "beef00" and not local_files_only
        if dry_run:
            return huggingface_hub.DryRunFileInfo("beef00", 3_000, filename, str(newer / filename), True, False)
        return str(newer / filename)

    asked, fetch_fails, listing_fails = [], [], []

    def snapshot_download(repo_id, allow_patterns, revision, dry_run=False, local_files_only=False):
        if dry_run and listing_fails:
            raise listing_fails[0]
        if dry_run:   # the hub lists the newer commit's files
            return [huggingface_hub.DryRunFileInfo("beef00", size, name, "", name == "config.json",
                                                   name != "config.json")
                    for name, size in (("config.json", 3_000), ("model.safetensors", 2_000_000),
                                       ("tokenizer.json", 200_000))]
        asked.append((revision, local_files_only))
        if not local_files_only and fetch_fails:
            raise fetch_fails[0]
        if not (cache / "snapshots" / revision).is_dir():
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        # as the library does when its listing fails during the fetch: what the folder holds, no error
        return str(cache / "snapshots" / revision)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cached_bytes = weights_bytes(load_backbone(f"blip:{tiny_blip_folder}").model)
    newer_bytes = estimate_weights_bytes("blip:someone/tiny")
    assert newer_bytes < cached_bytes
    # the fetch returns the newer commit's folder holding its config alone: the commit the ref keeps loads
    backbone = load_backbone("blip:someone/tiny")
    assert backbone.weights == "pretrained someone/tiny" and weights_bytes(backbone.model) == cached_bytes
    assert asked == [("beef00", False), ("beef00", True), ("a11ce0", True)]
    assert (cache / "refs" / "main").read_text() == "a11ce0"   # the commit built, as before
    # that commit is sized from its own config: a budget the newer commit fits and it does not refuses it
    with pytest.raises(BackboneError, match="blip:someone/tiny needs"):
        load_backbone("blip:someone/tiny", budget=WeightsBudget(newer_bytes))
    # a fetch that fails outright (a 503) falls back alike; a refusal the library wraps (a file's 403 to the HEAD
    # request that lists it, or that fetches it) is said, with no stand-in
    request = httpx2.Request("HEAD", "https://huggingface.co/someone/tiny/resolve/beef00/model.safetensors")
    fetch_fails.append(huggingface_hub.errors.HfHubHTTPError("503 Service Unavailable",
                                                             response=httpx2.Response(503, request=request)))
    assert weights_bytes(load_backbone("blip:someone/tiny").model) == cached_bytes
    forbidden = huggingface_hub.errors.HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))
    wrapped = huggingface_hub.errors.LocalEntryNotFoundError("could not fetch model.safetensors")
    wrapped.__cause__ = forbidden
    for failing in (listing_fails, fetch_fails):
        failing[:] = [wrapped]
        with pytest.raises(BackboneError, match=r"someone/tiny: the hub refuses it \(HTTP 403") as refused:
            load_backbone("blip:someone/tiny", fallback_offline=True)
        assert not refused.value.unreachable
    listing_fails.clear()
    fetch_fails.clear()
    # the commit the ref keeps is refused as the hub's config would be (the ref is the cache's: any program
    # using the same cache may have moved it)
    hostile = json.loads((cache / "snapshots" / "a11ce0" / "config.json").read_text())
    hostile["vision_config"]["num_hidden_layers"] = 100_000
    (cache / "snapshots" / "a11ce0" / "config.json").write_text(json.dumps(hostile))
    with pytest.raises(BackboneError, match="someone/tiny: its config asks for 100000 layers in a tower"):
        load_backbone("blip:someone/tiny")
    for weights in (cache / "snapshots" / "a11ce0").glob("*.safetensors"):
        weights.unlink()   # the cache holds that commit's config alone
    with pytest.raises(BackboneError, match=r"the hub did not serve all its files \(model.safetensors, tokenizer.json "
                                            r"missing\), and the hub cache holds no weights of it") as unreachable:
        load_backbone("blip:someone/tiny")
    assert unreachable.value.unreachable


def test_an_open_clip_model_with_a_hugging_face_text_tower_is_refused_before_it_is_built(monkeypatch):
    import transformers
    from open_clip import hf_model

    tiny = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    monkeypatch.setattr(hf_model.AutoConfig, "from_pretrained", lambda name, *args, **kwargs: tiny)   # its config alone
    with pytest.raises(BackboneError, match="roberta-ViT-B-32: only open_clip's own causal text transformer"):
        estimate_weights_bytes("openclip:roberta-ViT-B-32")


def test_a_blip_config_asking_for_another_dtype_loads_in_fp32_as_sized(tiny_blip_folder, tmp_path):
    """A config's dtype would double a float64 model's memory past the size checked before loading."""
    folder = tmp_path / "float64"
    shutil.copytree(tiny_blip_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "float64", "torch_dtype": "float64"}))
    backbone = load_backbone(f"blip:{folder}")
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
