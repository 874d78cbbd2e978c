"""open_clip CLIP models: any `open_clip.list_models()` name, with a pretrained tag, a local
checkpoint file, or no weights (random init drawn from the run's seed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer, text_global_pool

from core.backbones.base import Backbone, BackboneError, built_on_meta, weights_bytes
from core.backbones.block import PreNormBlock
from core.backbones.layout import TowerLayout

CONFIGS = Path(__file__).parent / "configs"   # PET Studio's own architectures (PETStudio-Tiny, -World)
open_clip.add_model_config(CONFIGS)

_TRIMMABLE_POOLS = ("argmax", "eos", "first")


def load_openclip(spec: str, name: str, source: Optional[str], seed: int, as_path: bool = False) -> "OpenClipBackbone":
    """`source` is None (random init), a pretrained tag, or (`as_path`) a local checkpoint file."""
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model '{name}' in '{spec}': see open_clip.list_models()")
    if source is None:
        weights = f"random init (seed {seed}): no pretrained weights"
        pretrained = None
    elif as_path:
        if not Path(source).is_file():
            raise BackboneError(f"checkpoint file not found: {source}")
        weights, pretrained = f"local checkpoint {source}", source
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if source not in tags:
            raise BackboneError(f"open_clip has no pretrained tag '{source}' for {name}; known tags: {', '.join(tags) or 'none'}")
        weights, pretrained = f"pretrained tag {source}", source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except Exception as error:  # hub, network and checkpoint failures come in many library types
            if as_path:
                raise BackboneError(f"could not load open_clip {name} weights from file {source}: {error}") from error
            raise BackboneError(f"could not fetch open_clip {name} weights for tag {source} "
                                f"(no network, or the hub is unreachable): {error}", unreachable=True) from error
    return OpenClipBackbone(spec, name, model, preprocess, open_clip.get_tokenizer(name), weights, seed)


_SIZES: dict[str, int] = {}      # open_clip name -> its weights' bytes, once it has built (a failure is tried again)
_REFUSALS: dict[str, str] = {}   # open_clip name -> why PET Studio cannot tune it


def openclip_bytes(name: str) -> Optional[int]:
    """The bytes open_clip model `name`'s weights take in memory, from its architecture built on the
    meta device (nothing allocated, no weights read; a hub text tower's config alone is fetched): the
    same for every tag of it. An architecture PET Studio cannot tune is refused here, before it is
    built. None for a name open_clip does not know, or cannot build without a network (loading says
    why)."""
    if name not in open_clip.list_models():
        return None
    if name not in _SIZES and name not in _REFUSALS:
        try:
            model = built_on_meta(lambda: open_clip.create_model(name, device="meta", pretrained_text=False))
        except Exception:  # a hub text tower's config without a network, among others
            return None
        try:
            _check_architecture(name, model)
            _SIZES[name] = weights_bytes(model)
        except BackboneError as error:
            _REFUSALS[name] = str(error)
    if name in _REFUSALS:
        raise BackboneError(_REFUSALS[name])
    return _SIZES[name]


def _check_architecture(name: str, model) -> None:
    """Refuse an open_clip model whose towers PET Studio's layouts do not describe."""
    if not isinstance(model.visual, VisionTransformer):
        raise BackboneError(f"{name}: only ViT vision towers are supported (got {type(model.visual).__name__})")
    text = getattr(model, "text", model)
    # a Hugging Face text tower (HFTextEncoder) has a `transformer` too, but none of its layout
    if not isinstance(text, (open_clip.CLIP, TextTransformer)) or getattr(text, "cls_emb", None) is not None:
        raise BackboneError(f"{name}: only open_clip's own causal text transformer is supported")
    if model.visual.attn_pool is not None:
        raise BackboneError(f"{name}: attentional pooling vision towers are not supported")


class OpenClipBackbone(Backbone):
    family = "openclip"

    def __init__(self, spec, name, model, preprocess, tokenizer, weights, seed):
        super().__init__()
        _check_architecture(name, model)
        self.spec, self.name, self.weights, self.seed = spec, name, weights, seed
        self.model = model
        self.text = text = getattr(model, "text", model)
        self.image_transform = preprocess
        self._tokenizer = tokenizer
        self.towers = {
            "vision": self._convert(model.visual.transformer, "vision", model.visual.proj, causal=False),
            "text": self._convert(text.transformer, "text", text.text_projection, causal=text.attn_mask is not None),
        }
        self.model.eval()

    @staticmethod
    def _convert(transformer, name, projection, causal) -> TowerLayout:
        blocks = []
        for i, block in enumerate(transformer.resblocks):
            if not isinstance(block, ResidualAttentionBlock):
                raise BackboneError(f"unsupported open_clip block type {type(block).__name__}")
            transformer.resblocks[i] = PreNormBlock(block)
            blocks.append(transformer.resblocks[i].build_layout(i))
        if isinstance(projection, torch.nn.Linear):
            raise BackboneError("linear text projections are not supported")
        return TowerLayout(name=name, width=transformer.width, blocks=blocks,
                           output_parameters=(projection,) if projection is not None else (), causal=causal)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def patch_grid(self) -> tuple[int, int, int]:
        rows, cols = self.model.visual.grid_size
        return rows, cols, 1

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under open_clip's own names (its loaders read this back)."""
        return {name.replace(".attn.in_proj.weight", ".attn.in_proj_weight")
                .replace(".attn.in_proj.bias", ".attn.in_proj_bias"): tensor
                for name, tensor in self.model.state_dict().items()}

    @property
    def pad_id(self) -> int:
        return getattr(self.text, "pad_id", 0)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # Through the tower's begin / run / features, so a cache of frozen computation can stand in
        # for any frozen part of it (core.tasks.frozen).
        visual, tower = self.model.visual, self.towers["vision"]
        pixels = pixels.to(self.device)
        pooled = tower.features(lambda: visual._pool(tower.run(tower.begin(lambda: visual._embeds(pixels))))[0])
        return pooled @ visual.proj if visual.proj is not None else pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        text, tower = self.text, self.towers["text"]
        tokens = tokens.to(self.device)
        real = tokens != self.pad_id
        pool_type = getattr(self.model, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if tower.causal and pool_type in _TRIMMABLE_POOLS:
            # Under the causal mask no kept token sees the padding, so dropping it is exact.
            positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
            length = max(int((real * positions).max()), 1)
            tokens, real = tokens[:, :length], real[:, :length]
        cast_dtype = text.token_embedding.weight.dtype
        eos_id = getattr(self.model, "text_eos_id", getattr(text, "eos_id", None))

        def embed() -> torch.Tensor:
            x = text.token_embedding(tokens).to(cast_dtype)
            return x + text.positional_embedding[: tokens.shape[1]].to(cast_dtype)

        def pool() -> torch.Tensor:
            x = tower.run(tower.begin(embed, length=tokens.shape[1]), token_mask=real)
            return text_global_pool(text.ln_final(x), tokens, pool_type, eos_token_id=eos_id)

        pooled = tower.features(pool)
        return pooled @ text.text_projection if text.text_projection is not None else pooled
