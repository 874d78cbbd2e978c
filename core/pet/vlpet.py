"""VL-PET: granularity-controlled gates (ICCV 2023).

At each residual site of an adapted block, with X the residual stream (the sub-layer input) and
H the sub-layer output:
    ΔH  = W_up GELU(concat_i W_down,i H)        N_h heads of r/N_h each
    Y   = H + ΔH
    out = X + s · G ⊙ Y
G at one of four granularities: small (one value per sample, averaged over real tokens),
middleX (per token), middleY (per channel), large (per token and channel, through a gate
bottleneck g). The LayerNorms of adapted blocks are trained too.

Initialisation `identity` (default) starts at the frozen model: W_up = 0 and gates written as
2σ(·) with a zero last layer (middleY: 1 + z, z = 0), so G = 1 and ΔH = 0. `paper` is the
authors': default inits, σ gates near 0.5 at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.pet.handle import PetError, PetHandle, attach_site_combiners, blocks_of
from core.pet.registry import Method, register
from core.pet.options import option

GRANULARITIES = ("small", "middleX", "middleY", "large")
INITS = ("identity", "paper")


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


class GatedAdapter(nn.Module):
    def __init__(self, width: int, config: Config):
        super().__init__()
        heads = config.adapter_heads
        bottleneck = -(-(width // config.reduction) // heads) * heads   # r = d / 8, a multiple of N_h
        self.granularity, self.scale = config.granularity, config.scale
        self.identity = config.init == "identity"
        if heads < 1 or config.reduction < 1:
            raise PetError("vlpet: adapter_heads and reduction must be at least 1")
        self.down = nn.Parameter(torch.empty(heads, bottleneck // heads, width))
        self.down_bias = nn.Parameter(torch.zeros(heads, bottleneck // heads))
        nn.init.kaiming_uniform_(self.down.view(-1, width), a=5 ** 0.5)
        self.up = nn.Linear(bottleneck, width)
        if self.identity:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
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
        if self.identity and last is not None:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.last_gate: Optional[torch.Tensor] = None
        self.record = False

    def _sigmoid(self, a: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(a) if self.identity else torch.sigmoid(a)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        heads = torch.einsum("bnd,kjd->bnkj", h, self.down.to(h.dtype)) + self.down_bias.to(h.dtype)
        return self.up(F.gelu(heads.flatten(-2)))

    def compute_gate(self, x: torch.Tensor, y: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.granularity == "large":
            return self._sigmoid(self.gate_up(F.gelu(self.gate_down(x))))
        if self.granularity == "middleX":
            return self._sigmoid(self.gate_proj(x + y))
        if self.granularity == "middleY":
            return (1 + self.gate_shift.to(x.dtype)).view(1, 1, -1)
        per_token = self._sigmoid(self.gate_proj(torch.cat([x, y], dim=-1)))          # (B, N, 1)
        if token_mask is None:
            return per_token.mean(dim=1, keepdim=True)
        weights = token_mask.to(per_token.dtype).unsqueeze(-1)
        return (per_token * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        y = h + self.adapter(h)
        g = self.compute_gate(x, y, token_mask)
        if self.record:
            self.last_gate = g.detach()
        return x + self.scale * g * y


_READOUT_SHAPE = {  # (B, N, d)-broadcastable gate -> the shape plots use
    "small": lambda g: g[:, 0, 0],
    "middleX": lambda g: g[..., 0],
    "middleY": lambda g: g[0, 0],
    "large": lambda g: g,
}


class VlPetHandle(PetHandle):
    def __init__(self, backbone, config: Config):
        super().__init__(backbone, "vlpet", config, group=self._group_of)

    def _group_of(self, name: str) -> str:
        if not name.startswith("pet."):
            return "layernorms"
        return "gates" if ".gate" in name else "adapters"

    @torch.no_grad()
    def gate_readout(self, pixels: Optional[torch.Tensor] = None,
                     tokens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """G per tower, layer and site for this batch: small (B,), middleX (B, N), middleY (d,),
        large (B, N, d). Vision tokens are [CLS] then the patches in row-major order
        (see `Backbone.patch_grid`). The towers run as `Backbone.run_towers` runs them; a tower
        run twice (BLIP's text: unimodal, then fused) reports its last pass."""
        adapters = [(t, i, s, m) for t, blocks in self.backbone.pet.items()
                    for i, sites in blocks.items() for s, m in sites.items()]
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
    handle = VlPetHandle(backbone, config)
    handle.install(attach_site_combiners(handle, config.towers, config.sites,
                                         lambda tower, block, site: GatedAdapter(block.width, config)))
    for _, block in blocks_of(backbone, config.towers):
        for norm in block.layernorms:
            norm.requires_grad_(True)
    return handle


def _figure(config: Config, readout: dict):
    from core.figures import vlpet_gate_figure

    return vlpet_gate_figure(readout, config.granularity)


register(Method(
    name="vlpet", label="VL-PET (gates)", default_lr=1e-3, config=Config, attach=attach, figure=_figure,
    trains="gated multi-head adapters on sub-layer outputs, and the adapted blocks' LayerNorms"))
