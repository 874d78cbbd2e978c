"""VL-PET: granularity-controlled gates (ICCV 2023).

At each residual site of an adapted encoder block, with X the residual stream (the sub-layer
input) and H the sub-layer output:
    ΔH  = W_up GELU(concat_i W_down,i H)        N_h heads of r/N_h each
    Y   = H + ΔH
    out = X + s · G ⊙ Y
G at one of four granularities: small (one value per sample, averaged over real tokens; on a
causal tower a running mean, so no position sees later tokens), middleX (per token), middleY
(per channel), large (per token and channel, through a gate bottleneck g). The LayerNorms of
gated blocks are trained too.

The authors' encoder–decoder design: a decoder tower (BLIP's answer decoder) gets no gated
adapter and keeps its LayerNorms frozen; each of its cross-attentions gets a value-parallel
adapter instead, value(h_enc) + W_up GELU(W_down h_enc), without a gate. `decoder="gated"`
gates the decoder like an encoder tower.

Initialisation `identity` (default) starts at the frozen model: W_up = 0 and gates written as
2σ(·) with a zero last layer (middleY: 1 + z, z = 0), so G = 1 and ΔH = 0; its small and middleX
gates read the direction of their input, u/‖u‖ (see `GatedAdapter.gate_input`). `paper` is the
authors' (HF `_init_weights`): every weight N(0, 0.02), every bias zero, z ~ N(0, 0.02), and for
`small` a zero W_up, with their gates as they wrote them (σ of the raw input); σ gates are then
near 0.5 at step 0. The value-parallel W_up is zero in both, so the decoder always starts as the
frozen one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.pet.handle import (PetError, PetHandle, attach_projection_deltas, attach_site_combiners, blocks_of,
                             resolve_towers)
from core.pet.registry import Method, register
from core.pet.options import option
from core.pet.recipes import Recipe, Setting

GRANULARITIES = ("small", "middleX", "middleY", "large")
INITS = ("identity", "paper")
DECODER_DESIGNS = ("value_parallel", "gated")
PAPER_STD = 0.02   # the authors' weight init (HF `initializer_range`)


@dataclass
class Config:
    granularity: str = option("large", "G per sample (small), token (middleX), channel (middleY) or both (large)",
                              choices=GRANULARITIES, main=True)
    towers: tuple[str, ...] = option((), "towers to adapt (empty: every tower)")
    sites: tuple[str, ...] = option(("attn", "mlp"), "residual sites to gate")
    adapter_heads: int = option(4, "N_h, heads of the down-projection", 1, 64)
    reduction: int = option(8, "r = g = width / reduction, rounded up to a multiple of N_h", 1, 1024, main=True)
    scale: float = option(1.0, "s, the scale of the gated output", 0.0, 100.0)
    init: str = option("identity", "identity: start at the frozen model; paper: the authors' init", choices=INITS)
    decoder: str = option("value_parallel", "a decoder tower's adaptation: value_parallel (the authors': an "
                          "ungated adapter on each cross-attention value) or gated (like an encoder tower)",
                          choices=DECODER_DESIGNS)


def _bottleneck(width: int, config: Config) -> int:
    """r = width / reduction, rounded up to a multiple of N_h (96 for 768 at the defaults)."""
    heads = config.adapter_heads
    return -(-(width // config.reduction) // heads) * heads


def _init_like_the_authors(*linears: nn.Linear) -> None:
    for linear in linears:
        nn.init.normal_(linear.weight, std=PAPER_STD)
        nn.init.zeros_(linear.bias)


def _zero(*linears: nn.Linear) -> None:
    for linear in linears:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


class GatedAdapter(nn.Module):
    def __init__(self, width: int, config: Config, causal: bool):
        super().__init__()
        heads, bottleneck = config.adapter_heads, _bottleneck(width, config)
        self.granularity, self.scale, self.causal = config.granularity, config.scale, causal
        self.pools_tokens = config.granularity == "small"   # see ResidualSite
        self.identity = config.init == "identity"
        self.down = nn.Parameter(torch.empty(heads, bottleneck // heads, width))
        self.down_bias = nn.Parameter(torch.zeros(heads, bottleneck // heads))
        nn.init.kaiming_uniform_(self.down.view(-1, width), a=5 ** 0.5)   # nn.Linear's default
        self.up = nn.Linear(bottleneck, width)
        if config.granularity == "large":
            self.gate_down = nn.Linear(width, bottleneck)
            self.gate_up = nn.Linear(bottleneck, width)
            last = self.gate_up
        elif config.granularity == "middleX":
            last = self.gate_proj = nn.Linear(width, 1)
        elif config.granularity == "small":
            last = self.gate_proj = nn.Linear(2 * width, 1)
        else:
            self.gate_shift = nn.Parameter(torch.zeros(width))   # middleY: G = 1 + z
            last = None
        if self.identity:
            _zero(self.up, *([last] if last is not None else []))
        else:
            nn.init.normal_(self.down, std=PAPER_STD)
            _init_like_the_authors(*(m for m in self.modules() if isinstance(m, nn.Linear)))
            if config.granularity == "middleY":
                nn.init.normal_(self.gate_shift, std=PAPER_STD)
            if config.granularity == "small":
                _zero(self.up)   # the authors' small script turns this on
        self.last_gate: Optional[torch.Tensor] = None
        self.record = False

    def _sigmoid(self, a: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(a) if self.identity else torch.sigmoid(a)

    def gate_input(self, u: torch.Tensor) -> torch.Tensor:
        """What a small/middleX gate's linear map reads: u/‖u‖ with the identity init, u (the
        authors') with theirs. Why: Adam moves each weight of the zero-started w by about lr a
        step whatever the gradient's size, so the logit w·u moves by about lr·‖u‖₁. On a pre-LN
        residual stream that is large (offline model: ‖X‖ ≈ 20–25 at d = 128, so ~2 a step at lr
        1e-2; more on big CLIPs) and σ saturates within 3–4 steps: per sample or token G sticks at
        2, or at 0, switching the sub-layer off with σ' = 0 so it never returns, and the gates
        memorise the few shots instead of helping (small/middleX ended at zero-shot). On u/‖u‖ a
        step moves the logit at most lr·√dim (~0.1 here), the pace of the large gate's zero-init
        last layer, which reads a modest GELU bottleneck. Same granularity; G = 1 still at w = 0."""
        return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6) if self.identity else u

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        heads = torch.einsum("bnd,kjd->bnkj", h, self.down.to(h.dtype)) + self.down_bias.to(h.dtype)
        return self.up(F.gelu(heads.flatten(-2)))

    def compute_gate(self, x: torch.Tensor, y: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.granularity == "large":
            return self._sigmoid(self.gate_up(F.gelu(self.gate_down(x))))
        if self.granularity == "middleX":
            return self._sigmoid(self.gate_proj(self.gate_input(x + y)))
        if self.granularity == "middleY":
            return (1 + self.gate_shift.to(x.dtype)).view(1, 1, -1)
        per_token = self._sigmoid(self.gate_proj(self.gate_input(torch.cat([x, y], dim=-1))))   # (B, N, 1)
        weights = (torch.ones_like(per_token) if token_mask is None
                   else token_mask.to(per_token.dtype).unsqueeze(-1))
        if self.causal:   # a running mean: position t averages tokens 0..t, never a later one
            return (per_token * weights).cumsum(dim=1) / weights.cumsum(dim=1).clamp_min(1)
        return (per_token * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        y = h + self.adapter(h)
        g = self.compute_gate(x, y, token_mask)
        if self.record:
            self.last_gate = g.detach()
        return x + self.scale * g * y


class ValueParallelAdapter(nn.Module):
    """Added to a decoder cross-attention's value projection, whose input is the encoder's states:
    W_up GELU(W_down h_enc), no gate. W_up starts at zero in both inits."""

    def __init__(self, in_features: int, out_features: int, bottleneck: int, init: str):
        super().__init__()
        self.down = nn.Linear(in_features, bottleneck)
        self.up = nn.Linear(bottleneck, out_features)
        if init == "paper":
            _init_like_the_authors(self.down)
        _zero(self.up)

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(encoder_states)))


_READOUT_SHAPE = {  # (B, N, d)-broadcastable gate -> the shape plots use
    # small: (B, 1, 1), or on a causal tower a running mean (B, N, 1) whose last position, with
    # padding masked out of it, is the mean over every real token
    "small": lambda g: g[:, -1, 0],
    "middleX": lambda g: g[..., 0],
    "middleY": lambda g: g[0, 0],
    "large": lambda g: g,
}


class VlPetHandle(PetHandle):
    def __init__(self, backbone, config: Config, value_parallel_towers: tuple[str, ...]):
        self.value_parallel_towers = value_parallel_towers
        super().__init__(backbone, "vlpet", config, group=self._group_of)

    def _group_of(self, name: str) -> str:
        if not name.startswith("pet."):
            return "layernorms"
        if name.split(".")[1] in self.value_parallel_towers:
            return "decoder"
        return "gates" if ".gate" in name else "adapters"

    @torch.no_grad()
    def gate_readout(self, pixels: Optional[torch.Tensor] = None,
                     tokens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """G per tower, layer and site for this batch: small (B,), middleX (B, N), middleY (d,),
        large (B, N, d). Vision tokens are [CLS] then the patches in row-major order
        (see `Backbone.patch_grid`). The towers run as `Backbone.run_towers` runs them; a tower
        run twice (BLIP's text: unimodal, then fused) reports its last pass. Value-parallel
        adapters have no gate and are not reported."""
        adapters = [(t, i, s, m) for t, blocks in self.backbone.pet.items()
                    for i, modules in blocks.items() for s, m in modules.items() if isinstance(m, GatedAdapter)]
        for *_, module in adapters:
            module.record, module.last_gate = True, None
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            self.backbone.run_towers(pixels, tokens)
        finally:
            self.backbone.train(was_training)
            for *_, module in adapters:
                module.record = False
        shape = _READOUT_SHAPE[self.config.granularity]
        return {f"{t}.{i}.{s}": shape(m.last_gate).float().cpu() for t, i, s, m in adapters
                if m.last_gate is not None}

    def patch_map(self, gate: torch.Tensor) -> torch.Tensor:
        """A vision middleX (B, N) or large (B, N, d) gate as (B, rows, cols) over the image's
        patch grid (large: mean over channels), for an overlay on the picture."""
        if gate.ndim not in (2, 3):
            raise PetError(f"only per-token gates (middleX, large) map onto patches, not shape {tuple(gate.shape)}")
        rows, cols, prefix = self.backbone.patch_grid()
        values = gate if gate.ndim == 2 else gate.mean(dim=-1)
        return values[:, prefix:prefix + rows * cols].reshape(-1, rows, cols)

    def vision_token_map(self, readout: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        maps = [self.patch_map(gate)[0] for key, gate in readout.items()
                if key.startswith("vision.") and gate.ndim in (2, 3)]
        return torch.stack(maps).mean(dim=0) if maps else None


def attach(backbone, config: Config) -> VlPetHandle:
    if config.granularity not in GRANULARITIES:
        raise PetError(f"vlpet granularity must be one of {', '.join(GRANULARITIES)}, not '{config.granularity}'")
    if config.init not in INITS:
        raise PetError(f"vlpet init must be one of {', '.join(INITS)}, not '{config.init}'")
    if config.decoder not in DECODER_DESIGNS:
        raise PetError(f"vlpet decoder must be one of {', '.join(DECODER_DESIGNS)}, not '{config.decoder}'")
    if config.adapter_heads < 1 or config.reduction < 1:
        raise PetError("vlpet: adapter_heads and reduction must be at least 1")
    towers = resolve_towers(backbone, config.towers)
    value_parallel = tuple(t for t in towers
                           if config.decoder == "value_parallel" and backbone.towers[t].role == "decoder")
    gated = tuple(t for t in towers if t not in value_parallel)
    handle = VlPetHandle(backbone, config, value_parallel)
    modules = nn.ModuleDict()
    if gated:   # none named would mean every tower
        modules.update(attach_site_combiners(
            handle, gated, config.sites,
            lambda tower, block, site: GatedAdapter(block.width, config, backbone.towers[tower].causal)))
        for _, block in blocks_of(backbone, gated):
            for norm in block.layernorms:
                norm.requires_grad_(True)
    if value_parallel:
        modules.update(attach_projection_deltas(
            handle, value_parallel, ("cross_v",),
            lambda tower, block, name: ValueParallelAdapter(block.projections[name].in_features,
                                                            block.projections[name].out_features,
                                                            _bottleneck(block.width, config), config.init)))
    handle.install(modules)
    return handle


def _figure(config: Config, readout: dict):
    from core.figures import vlpet_gate_figure

    return vlpet_gate_figure(readout, config.granularity)


def _authors_recipe(setting: Setting) -> Recipe:
    """HenryHZY/VL-PET's image-text scripts: the language model adapted over frozen visual
    features (so the text side only: the encoder gated, a decoder value-parallel), their init,
    lr 1e-3 with 10% warm-up (the studio's too)."""
    return Recipe("authors", "HenryHZY/VL-PET (scripts/image-text: language model only, the authors' init)",
                  {"towers": list(setting.text_towers), "init": "paper"}, lr=1e-3, warmup=0.1)


register(Method(
    name="vlpet", label="VL-PET (gates)", default_lr=1e-3, config=Config, attach=attach, figure=_figure,
    trains="gated multi-head adapters on sub-layer outputs and the gated blocks' LayerNorms; "
           "value-parallel adapters on a decoder's cross-attention values", authors_recipe=_authors_recipe,
    revision=3, revised="with the identity init, `small` and `middleX` gates read their input's direction (u/‖u‖), "
                        "so they no longer saturate within a few steps"))
