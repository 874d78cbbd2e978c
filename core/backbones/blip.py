"""transformers BLIP: for image-text retrieval (ITC embeddings for ranking, ITM for matching)
and for question answering (an answer decoder generating the answer).

Specs: `blip:base` / `blip-vqa:base` (the BLIP-base architecture from the default BlipConfig,
random init from the seed), `blip:HUB_ID` / `blip-vqa:HUB_ID` (weights and processor through
transformers' from_pretrained, e.g. Salesforce/blip-itm-base-coco, Salesforce/blip-vqa-base)
and `blip:PATH` / `blip-vqa:PATH` (a local folder written by save_pretrained).
"""
from __future__ import annotations

import contextlib
import functools
import math
import shutil
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from core.backbones.base import Backbone, BackboneError, WeightsBudget, built_on_meta, bytes_text, weights_bytes
from core.backbones.layout import BlockLayout, Projection, ResidualSite, TowerLayout, pools_tokens

MAX_TEXT_TOKENS = 35   # BLIP's retrieval caption length


# BLIP's layers re-expressed once so their residual additions run through ResidualSites. The
# instances keep their weights and parameter names; only their class (their forward) changes.
def _sited_vision_forward(self, hidden_states, **kwargs):
    h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
    x = self.attn_site(hidden_states, h)
    return self.mlp_site(x, self.mlp(self.layer_norm2(x)))


def _sited_output_forward(self, hidden_states, input_tensor):
    """Post-LN (BERT): LN(X + H) becomes LN(site(X, H)), H the sub-layer's output after dropout."""
    h = self.dropout(self.dense(hidden_states))
    return self.LayerNorm(self.site(input_tensor, h, self.token_mask()))


_SITED_CLASSES: dict[type, type] = {}


def _give_sites(module: nn.Module, forward) -> None:
    cls = type(module)
    if cls not in _SITED_CLASSES:
        _SITED_CLASSES[cls] = type(f"Sited{cls.__name__}", (cls,), {"forward": forward})
    module.__class__ = _SITED_CLASSES[cls]


def stand_in_tokenizer():
    """A character-level WordPiece tokenizer for `blip:base`, which has no weights and so no
    trained vocabulary; checkpoints loaded from the hub or a folder bring their own."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {token: i for i, token in enumerate(specials + characters + ["##" + c for c in characters])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def vision_tower(vision_model: nn.Module, output_parameters: tuple) -> TowerLayout:
    """BLIP's ViT: packed qkv (q, k, v slices), projection (out), fc1, fc2; pre-LN sites."""
    blocks = []
    for i, layer in enumerate(vision_model.encoder.layers):
        attn, width = layer.self_attn, layer.self_attn.embed_dim
        layer.attn_site, layer.mlp_site = ResidualSite(), ResidualSite()
        _give_sites(layer, _sited_vision_forward)
        blocks.append(BlockLayout(
            index=i, module=layer,
            projections={"q": Projection(attn.qkv, slice(0, width)),
                         "k": Projection(attn.qkv, slice(width, 2 * width)),
                         "v": Projection(attn.qkv, slice(2 * width, 3 * width)),
                         "out": Projection(attn.projection),
                         "fc1": Projection(layer.mlp.fc1), "fc2": Projection(layer.mlp.fc2)},
            sites={"attn": layer.attn_site, "mlp": layer.mlp_site},
            layernorms=[layer.layer_norm1, layer.layer_norm2], width=width,
            mlp_width=layer.mlp.fc1.out_features, heads=attn.num_heads))
    return TowerLayout(name="vision", width=vision_model.config.hidden_size, blocks=blocks,
                       output_parameters=output_parameters, causal=False, prompt_slot=None)


def text_tower(name: str, text_model: nn.Module, cross_source: str, output_parameters: tuple,
               token_mask: Callable[[], Optional[torch.Tensor]], causal: bool = False,
               role: str = "encoder") -> TowerLayout:
    """A BLIP BERT with cross-attention (question encoder, answer decoder): self q, k, v, out;
    cross_q, cross_k, cross_v (their input comes from `cross_source`), cross_out; fc1, fc2;
    post-LN sites attn, cross, mlp."""
    blocks = []
    for i, layer in enumerate(text_model.encoder.layer):
        own, cross = layer.attention, layer.crossattention
        for output in (own.output, cross.output, layer.output):
            output.site, output.token_mask = ResidualSite(), token_mask
            _give_sites(output, _sited_output_forward)
        blocks.append(BlockLayout(
            index=i, module=layer,
            projections={"q": Projection(own.self.query), "k": Projection(own.self.key),
                         "v": Projection(own.self.value), "out": Projection(own.output.dense),
                         "cross_q": Projection(cross.self.query),
                         "cross_k": Projection(cross.self.key, source=cross_source),
                         "cross_v": Projection(cross.self.value, source=cross_source),
                         "cross_out": Projection(cross.output.dense),
                         "fc1": Projection(layer.intermediate.dense), "fc2": Projection(layer.output.dense)},
            sites={"attn": own.output.site, "cross": cross.output.site, "mlp": layer.output.site},
            layernorms=[own.output.LayerNorm, cross.output.LayerNorm, layer.output.LayerNorm],
            width=own.output.dense.out_features, mlp_width=layer.intermediate.dense.out_features,
            heads=own.self.num_attention_heads,
            sublayers={"self": own, "cross": cross}))
    return TowerLayout(name=name, width=text_model.config.hidden_size, blocks=blocks,
                       output_parameters=output_parameters, causal=causal, prompt_slot=None, role=role)


# What a BLIP hub repository must hold for loading: configs, tokenizer files, safetensors weights.
HUB_FILES = ["*.json", "*.txt", "*.safetensors"]


MAX_CONFIG_LAYERS = 96   # per tower: BLIP-large has 24; a config beyond this is not built, even on the meta device
# A repository's files to fetch may take this much disk over the model its config builds (weights in
# another precision or a second copy, tokenizer files), and must leave DISK_RESERVE free: a small config
# beside gigabytes of files would fill a shared Space's disk before from_pretrained found anything wrong.
FETCH_ALLOWANCE, FETCH_SLACK = 2, 64 * 2**20
DISK_RESERVE = 2**30
MAX_CONFIG_BYTES = 2**20   # BLIP-base's config.json is 5 KB


@dataclass(frozen=True)
class _SizedCommit:
    """A hub repository's config at one commit, sized; loading fetches that commit and nothing else."""
    commit: str   # a commit hash: every call given it reads that commit
    size: int


def blip_bytes(source: str, kind: str, answering: bool) -> Optional[int]:
    """The bytes a BLIP model's weights take in memory, from its architecture built on the meta
    device: the default BlipConfig's for `random`, the hub config's for `hub` (config.json alone is
    fetched, from the hub only, and the files loading would fetch are checked against it). None for
    a local folder, or a hub that cannot be reached (loading says why)."""
    if kind == "random":
        return _default_bytes(answering)
    if kind != "hub":
        return None
    sized = _size_hub_config(source, answering)
    if sized is None:
        return None
    _files_fit(source, sized)
    return sized.size


def _size_hub_config(source: str, answering: bool) -> Optional[_SizedCommit]:
    """The config.json of the commit the hub's default branch names now, fetched alone and sized;
    None where the hub cannot be reached and its cache holds nothing of it (loading says why)."""
    commit = _resolve(source)
    if commit is None:
        return None
    try:
        folder = Path(_config_file(source, commit)).parent
    except BackboneError:
        raise
    except Exception:  # hub, network and cache errors come in many library types
        return None
    return _SizedCommit(commit, _config_bytes(source, folder, answering))


def _config_bytes(source: str, folder: Path | str, answering: bool) -> int:
    """The bytes of the model the config.json in `folder` builds, sized on the meta device. A config
    that is not BLIP's, or that transformers cannot build, is refused (a broken repository, not a
    missing network), and one asking for more layers than any BLIP has before even its meta build."""
    from transformers import BlipConfig

    try:
        config = BlipConfig.from_pretrained(str(folder))
        layers = max(int(config.vision_config.num_hidden_layers), int(config.text_config.num_hidden_layers))
    except Exception as error:  # format errors come in many library types
        raise BackboneError(f"{source}: its config.json is not a BLIP config: {str(error)[:200]}") from error
    if layers > MAX_CONFIG_LAYERS:
        raise BackboneError(f"{source}: its config asks for {layers} layers in a tower; BLIP models here have at most "
                            f"{MAX_CONFIG_LAYERS}")
    try:
        return _meta_bytes(config, answering)
    except Exception as error:  # a config transformers cannot build
        raise BackboneError(f"{source}: transformers cannot build the model its config.json describes: "
                            f"{str(error)[:200]}") from error


def _resolve(source: str) -> Optional[str]:
    """The commit the hub's default branch names now (where the hub cannot say: the one the hub
    cache's ref keeps, the last loaded whole); None where neither can. Asked without moving that
    ref: only a load that builds moves it (`_remember_commit`). A repository the hub refuses is
    said as such: no network would be the wrong reason, and the offline model no stand-in for it."""
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(source).sha
    except Exception as error:  # hub, network and cache errors come in many library types
        _refuse_answer(source, error)
    return _kept_commit(source)


def _kept_commit(source: str) -> Optional[str]:
    """The commit the hub cache's ref of the default branch keeps; None where it keeps none."""
    from huggingface_hub import resolve_revision

    try:
        return resolve_revision(source, local_files_only=True).resolved
    except Exception:  # no ref in the cache
        return None


def _missing(folder: str, names: list[str]) -> list[str]:
    """Those of `names` (paths within a commit) that `folder` does not hold."""
    return [name for name in names if not (Path(folder) / name).is_file()]


def _refuse_answer(source: str, error: Exception) -> None:
    """BackboneError for an answer of the hub that refuses the repository (below 500: missing,
    private, gated, disabled); a 5xx or a 429 passes, as a hub that cannot answer now."""
    from huggingface_hub.errors import HfHubHTTPError

    for answer in (error, error.__cause__):   # a file's refusal comes wrapped, the hub's answer its cause
        status = getattr(getattr(answer, "response", None), "status_code", None)
        if isinstance(answer, HfHubHTTPError) and status is not None and status < 500 and status != 429:
            reason = str(answer).splitlines()[0][:200]
            raise BackboneError(f"{source}: the hub refuses it (HTTP {status}: {reason}); it may be missing, private "
                                f"or gated") from error


def _remember_commit(snapshot: Path) -> None:
    """Name the commit of `snapshot` (the hub cache's `<repository>/snapshots/<commit>`), just loaded
    whole, in its repository's ref of the default branch (written whole at once, as the library
    writes it), so that it loads from the cache later without a network."""
    ref = snapshot.parent.parent / "refs" / "main"
    with contextlib.suppress(OSError):   # a read-only cache: it keeps what it named
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial = ref.with_name(f".main.{uuid.uuid4().hex}.partial")
        partial.write_text(snapshot.name)
        partial.replace(ref)


def _config_file(source: str, commit: str) -> str:
    """The commit's config.json, its size asked first (a dry run): a repository's "config" of
    gigabytes would fill the disk before it could be read. Where the hub cannot be asked, the hub
    cache's copy (an error where there is none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        planned = hf_hub_download(repo_id=source, filename="config.json", revision=commit, dry_run=True)
    except RemoteEntryNotFoundError as error:
        raise BackboneError(f"{source}: the repository has no config.json: not a BLIP model") from error
    except Exception as error:  # hub, network and cache errors come in many library types
        _refuse_answer(source, error)   # a gated repository is listed, and refused only here
        return hf_hub_download(repo_id=source, filename="config.json", revision=commit, local_files_only=True)
    if planned.will_download and (planned.file_size is None or planned.file_size > MAX_CONFIG_BYTES):
        size = "an unknown size" if planned.file_size is None else bytes_text(planned.file_size)
        raise BackboneError(f"{source}: its config.json takes {size}, more than a config needs "
                            f"({bytes_text(MAX_CONFIG_BYTES)}): refused before fetching it")
    return hf_hub_download(repo_id=source, filename="config.json", revision=commit)


def _files_fit(source: str, sized: _SizedCommit) -> Optional[list[str]]:
    """The names of the files loading reads at the sized commit, listed by the hub (a dry run of
    snapshot_download), where they fit; BackboneError, before any is fetched, when they do not. None
    where the hub cannot list them: loading then reads only what the hub cache holds."""
    from huggingface_hub import constants, snapshot_download

    try:
        planned = snapshot_download(repo_id=source, allow_patterns=HUB_FILES, revision=sized.commit, dry_run=True)
    except Exception as error:  # hub, network and cache errors come in many library types
        _refuse_answer(source, error)   # a file the hub refuses is refused here, in the listing's HEAD requests
        return None
    fetched = [entry.file_size for entry in planned if entry.will_download]
    if None in fetched or sum(fetched) > FETCH_ALLOWANCE * sized.size + FETCH_SLACK:
        on_disk = "an unknown size" if None in fetched else bytes_text(sum(fetched))
        raise BackboneError(f"{source}: the files it would fetch take {on_disk} on disk, more than "
                            f"{FETCH_ALLOWANCE}× the {bytes_text(sized.size)} of the model its config builds: refused "
                            f"before fetching them")
    free = shutil.disk_usage(_existing(Path(constants.HF_HUB_CACHE))).free
    if fetched and sum(fetched) > free - DISK_RESERVE:   # a model the cache holds whole fetches nothing
        raise BackboneError(f"{source}: its files ({bytes_text(sum(fetched))}) would leave less than "
                            f"{bytes_text(DISK_RESERVE)} free on the disk of the hub cache ({bytes_text(free)} free): "
                            f"refused before fetching them")
    return [entry.filename for entry in planned]


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (the hub cache before its first download)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


@functools.lru_cache(maxsize=2)
def _default_bytes(answering: bool) -> int:
    from transformers import BlipConfig

    return _meta_bytes(BlipConfig(), answering)


def _meta_bytes(config, answering: bool) -> int:
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

    model_class = BlipForQuestionAnswering if answering else BlipForImageTextRetrieval
    return weights_bytes(built_on_meta(lambda: model_class(config)))


def _fetch_sized(spec: str, source: str, answering: bool, budget: Optional[WeightsBudget]) -> str:
    """The folder of a hub repository's files at the commit sized here, within `budget` and the disk
    (checked in this call, so a repository changed since an earlier check is checked as it is now);
    where the hub cannot list or serve that commit, a commit the hub cache already holds whole."""
    from huggingface_hub import snapshot_download

    sized = _size_hub_config(source, answering)
    if sized is not None and budget is not None:
        budget.refuse(spec, sized.size)
    planned = None if sized is None else _files_fit(source, sized)
    failure, said = None, "the hub could not be asked for it" if sized is None else "the hub could not list its files"
    if planned is not None:
        try:
            folder = snapshot_download(repo_id=source, allow_patterns=HUB_FILES, revision=sized.commit)
        except Exception as error:  # hub, network and validation errors come in many library types
            _refuse_answer(source, error)
            failure, said = error, f"the hub could not serve its files ({str(error)[:200]})"
        else:
            # a listing that fails in the fetch is not raised: the library returns what the folder holds
            missing = _missing(folder, planned)
            if not missing:
                return folder
            said = f"the hub did not serve all its files ({', '.join(missing[:3])} missing)"
    folder = _cached_whole(spec, source, answering, budget, sized, planned)
    if folder is None:
        raise BackboneError(f"could not fetch BLIP weights for {source} (no network, or the hub is unreachable): "
                            f"{said}, and the hub cache holds no weights of it", unreachable=True) from failure
    return folder


def _cached_whole(spec: str, source: str, answering: bool, budget: Optional[WeightsBudget],
                  sized: Optional[_SizedCommit], planned: Optional[list[str]]) -> Optional[str]:
    """The hub cache's folder of the commit the hub named (`sized`, holding every `planned` file where
    the hub listed them), else of the one the cache's ref keeps (the last one loaded whole here, or
    fetched by another program using the same cache), where it holds that commit's weights; a commit
    other than the sized one is sized from its own cached config, refused as the hub's would be, and
    kept to `budget`. None where the cache holds neither: a hub that names a newer commit and then
    cannot serve it still loads the model the cache holds."""
    from huggingface_hub import snapshot_download

    for commit in dict.fromkeys(c for c in (sized and sized.commit, _kept_commit(source)) if c):
        named = sized is not None and commit == sized.commit
        try:
            folder = snapshot_download(repo_id=source, allow_patterns=HUB_FILES, revision=commit,
                                       local_files_only=True)
        except Exception:  # that commit is not in the cache
            continue
        whole = not _missing(folder, planned) if named and planned is not None else \
            any(Path(folder).glob("*.safetensors"))
        if whole:
            size = sized.size if named else _config_bytes(source, folder, answering)
            if budget is not None:
                budget.refuse(spec, size)
            return folder
    return None


def load_blip(spec: str, source: str, seed: int, answering: bool = False, kind: str = "hub",
              budget: Optional[WeightsBudget] = None) -> Backbone:
    """BLIP for retrieval (BlipForImageTextRetrieval) or, with `answering`, for question
    answering (BlipForQuestionAnswering). `kind` says what `source` is: "random" (`base`),
    "hub" (a hub id, fetched into the hub cache and never looked up on the local disk) or
    "folder" (a local folder written by save_pretrained, not sized). Weights over `budget` are
    refused before they are built."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering, BlipImageProcessor, \
        BlipProcessor

    model_class = BlipForQuestionAnswering if answering else BlipForImageTextRetrieval
    if kind == "random":
        if budget is not None:
            budget.refuse(spec, _default_bytes(answering))
        tokenizer = stand_in_tokenizer()
        config = BlipConfig()
        # BlipVisionConfig's default initializer_range is 1e-10, which leaves a random ViT's linear,
        # patch, class and position embedding weights at ~1e-10: image tokens of ~1e-6, the same
        # [CLS] for every picture and cross-attention that adds nothing. Initialise the vision tower
        # like the text tower and the heads (BERT's 0.02).
        config.vision_config.initializer_range = config.text_config.initializer_range
        # The answer decoder starts at bos and stops at sep: use the stand-in tokenizer's.
        config.text_config.bos_token_id = tokenizer.cls_token_id
        config.text_config.sep_token_id = tokenizer.sep_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config)
        processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
        weights = f"random init (seed {seed}): no pretrained weights (stand-in character tokenizer)"
    else:
        folder = source
        if kind == "folder":
            if not Path(source).is_dir():
                raise BackboneError(f"BLIP folder not found: {source}")
            if not (Path(source) / "config.json").is_file():
                raise BackboneError(f"{source}: not a BLIP folder (no config.json; write one with save_pretrained)")
        else:
            folder = _fetch_sized(spec, source, answering, budget)
        try:
            model = model_class.from_pretrained(folder, dtype=torch.float32)   # as sized: not a config's dtype
            processor = BlipProcessor.from_pretrained(folder)
        except Exception as error:  # file and format errors come in many library types
            raise BackboneError(f"could not load BLIP from {'folder ' if kind == 'folder' else ''}{source}: "
                                f"{error}") from error
        if kind == "hub" and Path(folder).parent.name == "snapshots":   # the commit just built, whole
            _remember_commit(Path(folder))
        weights = f"local folder {source}" if kind == "folder" else f"pretrained {source}"
    backbone_class = BlipAnsweringBackbone if answering else BlipBackbone
    return backbone_class(spec, model, processor, weights, seed)


class _BlipBase(Backbone):
    """What BLIP's retrieval and answering models share: processor, tokenisation, vision tokens."""

    def __init__(self, spec, model, processor, weights, seed):
        super().__init__()
        self.spec, self.weights, self.seed = spec, weights, seed
        self.model = model.eval()
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id

    def image_transform(self, image) -> torch.Tensor:
        return self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def patch_grid(self) -> tuple[int, int, int]:
        config = self.model.config.vision_config
        side = config.image_size // config.patch_size
        return side, side, 1

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.processor.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                        return_tensors="pt")["input_ids"]

    def _trim(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop padding columns (exact: padded keys are masked) and return (ids, mask)."""
        tokens = tokens.to(self.device)
        mask = (tokens != self.pad_id).long()
        length = max(int(mask.sum(dim=1).max()), 1)
        return tokens[:, :length], mask[:, :length]

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state


class BlipBackbone(_BlipBase):
    family = "blip"
    capabilities = frozenset({"image_tokens", "matching"})

    def __init__(self, spec, model, processor, weights, seed):
        super().__init__(spec, model, processor, weights, seed)
        self._text_mask: Optional[torch.Tensor] = None   # real tokens of the text being encoded
        # BLIP's ITC temperature is not part of transformers' retrieval model: BLIP's init, 0.07.
        self.register_buffer("_logit_scale", torch.tensor(math.log(1 / 0.07)))
        self.towers = {
            "vision": vision_tower(model.vision_model, tuple(model.vision_proj.parameters())),
            "text": text_tower("text", model.text_encoder, "vision", tuple(model.text_proj.parameters()),
                               lambda: self._text_mask),
        }

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.model.vision_proj.parameters(), *self.model.itm_head.parameters()]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale

    def embed_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.model.vision_proj(image_tokens[:, 0])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_image_tokens(self.image_tokens(pixels))

    def _run_text(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        self._text_mask = mask
        try:
            return self.model.text_encoder(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state[:, 0]
        finally:
            self._text_mask = None

    def text_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unimodal text [CLS] (text encoder without cross-attention)."""
        return self._run_text(*self._trim(tokens))

    def embed_text_cls(self, text_cls: torch.Tensor) -> torch.Tensor:
        return self.model.text_proj(text_cls)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_text_cls(self.text_cls(tokens))

    def fused_cls(self, image_tokens: torch.Tensor, tokens: torch.Tensor,
                  pictures: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The multimodal [CLS]: the text encoder cross-attending to the image tokens, paired row by
        row, or one picture's (1, N, d) for every text: its attention then broadcasts them, so each
        layer projects the picture to keys and values once, not once per text. With `pictures`,
        text i is paired with image_tokens[pictures[i]], and each layer projects each picture once
        however many texts it meets (ITM's positive and two hard negatives meet each three times)."""
        ids, mask = self._trim(tokens)
        cache = None
        if pictures is not None:
            cache = self._cross_keys_and_values(image_tokens, pictures)
            image_tokens = image_tokens[pictures]   # what the layers see beside the cache: the same pairs
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        return self._run_text(ids, mask, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask,
                              past_key_values=cache)

    def _cross_keys_and_values(self, image_tokens: torch.Tensor, pictures: torch.Tensor):
        """Every layer's cross-attention keys and values of each picture, projected once (deltas on
        those projections included: they hook the linear layers) and then gathered per text, as the
        cache the layers read them from when generating."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for layer in self.model.text_encoder.encoder.layer:
            attention = layer.crossattention.self
            shape = (*image_tokens.shape[:2], -1, attention.attention_head_size)
            keys, values = (projection(image_tokens).view(shape).transpose(1, 2)[pictures]
                            for projection in (attention.key, attention.value))
            cache.cross_attention_cache.update(keys, values, attention.layer_idx)
            cache.is_updated[attention.layer_idx] = True
        return cache

    def match_logits(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """ITM logits (no match, match) from fused [CLS] vectors."""
        return self.model.itm_head(fused_cls)

    def run_towers(self, pixels: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> None:
        """The unimodal passes, then the fused one (the text tower's cross-attention) when both are given."""
        super().run_towers(pixels, tokens)
        if pixels is not None and tokens is not None:
            self.fused_cls(self.image_tokens(pixels), tokens)


class BlipAnsweringBackbone(_BlipBase):
    """BLIP for VQA: image -> question encoder (cross-attending to the image) -> answer decoder
    (cross-attending to the question) that generates the answer. Towers: vision, text (the
    question encoder), decoder."""

    family = "blip-vqa"
    capabilities = frozenset({"image_tokens", "answer_generation"})
    max_answer_tokens = 10

    def __init__(self, spec, model, processor, weights, seed):
        super().__init__(spec, model, processor, weights, seed)
        self._masks: dict[str, Optional[torch.Tensor]] = {"text": None, "decoder": None}
        self.towers = {
            "vision": vision_tower(model.vision_model, ()),
            "text": text_tower("text", model.text_encoder, "vision", (), lambda: self._masks["text"]),
            "decoder": text_tower("decoder", model.text_decoder.bert, "text", (), lambda: self._masks["decoder"],
                                  causal=True, role="decoder"),
        }

    def head_parameters(self) -> list[nn.Parameter]:
        return []

    def encode_question(self, image_tokens: torch.Tensor, questions: torch.Tensor):
        """(question states, their mask): the questions read against their pictures' tokens, paired
        row by row, or one picture's (1, N, d) for every question (broadcast, as in `fused_cls`)."""
        ids, mask = self._trim(questions)
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        self._masks["text"] = mask
        try:
            states = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                                             encoder_attention_mask=image_mask).last_hidden_state
        finally:
            self._masks["text"] = None
        return states, mask

    def _answer_logits(self, image_tokens: torch.Tensor, questions: torch.Tensor, answers: torch.Tensor,
                       **kwargs):
        """The answer decoder run with teacher forcing (answers start at the decoder's bos); one
        picture's one question given for several answers is encoded once, its states broadcast."""
        states, mask = self.encode_question(image_tokens, questions)
        ids, answer_mask = self._trim(answers)
        ids = ids.clone()
        ids[:, 0] = self.model.decoder_start_token_id
        self._masks["decoder"] = answer_mask
        try:
            output = self.model.text_decoder(input_ids=ids, attention_mask=answer_mask, encoder_hidden_states=states,
                                             encoder_attention_mask=mask, **kwargs)
        finally:
            self._masks["decoder"] = None
        return output, ids, answer_mask

    def answer_loss(self, image_tokens: torch.Tensor, questions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of the answer tokens."""
        tokens = self._trim(answers)
        labels = tokens[0].masked_fill(tokens[1] == 0, -100)
        return self._answer_logits(image_tokens, questions, answers, labels=labels, reduction="mean")[0].loss

    @torch.no_grad()
    def answer_log_likelihoods(self, image_tokens: torch.Tensor, questions: torch.Tensor,
                               answers: torch.Tensor) -> torch.Tensor:
        """(B,) summed log-probability of each answer's tokens: BLIP's ranking of candidate answers
        (image tokens and questions paired with the answers row by row, or one of each for all)."""
        output, ids, answer_mask = self._answer_logits(image_tokens, questions, answers)
        log_probs = output.logits[:, :-1].float().log_softmax(dim=-1)
        picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (picked * answer_mask[:, 1:]).sum(dim=1)

    def run_towers(self, pixels: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> None:
        """Vision, then the question encoder and the answer decoder (answering `tokens` as a question)."""
        if pixels is None:
            return   # the question encoder and the decoder both attend to the picture
        image_tokens = self.image_tokens(pixels)
        if tokens is not None:
            self.generate_answers(image_tokens, tokens)

    @torch.no_grad()
    def generate_answers(self, image_tokens: torch.Tensor, questions: torch.Tensor) -> list[str]:
        states, mask = self.encode_question(image_tokens, questions)
        start = torch.full((states.shape[0], 1), self.model.decoder_start_token_id, device=states.device)
        config = self.model.config.text_config
        generated = self.model.text_decoder.generate(
            input_ids=start, eos_token_id=config.sep_token_id, pad_token_id=config.pad_token_id,
            encoder_hidden_states=states, encoder_attention_mask=mask, max_new_tokens=self.max_answer_tokens,
            do_sample=False, num_beams=1, use_cache=not pools_tokens(self.towers["decoder"]))
        return self.processor.tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)
