"""open_clip's residual block re-expressed once, so PET methods can reach inside attention.

open_clip runs attention through the fused nn.MultiheadAttention, which hides q, k and v.
Here the same weights run as in_proj -> q, k, v (deltas land on each slice) ->
scaled_dot_product_attention (causal for text) -> out_proj, always batch-first, and the two
residual additions go through ResidualSite so gates and adapters can act on them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.backbones.layout import BlockLayout, Projection, ResidualSite

LOW_PRECISION = (torch.bfloat16, torch.float16)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the weights of an nn.MultiheadAttention."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("unsupported attention: separate q/k/v weights or extra k/v bias")
        width = mha.embed_dim
        self.heads = mha.num_heads
        self.in_proj = nn.Linear(width, 3 * width, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        packed = self.in_proj(x)
        if packed.requires_grad and packed.device.type == "cpu" and packed.dtype in LOW_PRECISION:
            # A CPU's low-precision attention backward is slower than fp32's, its forward is not
            # (README "Benchmark"): training leaves autocast for attention alone; out_proj casts back down.
            with torch.autocast("cpu", enabled=False):
                out = self._attend(packed.float(), causal)
        else:
            out = self._attend(packed, causal)
        return self.out_proj(out)

    def _attend(self, packed: torch.Tensor, causal: bool) -> torch.Tensor:
        """Attention over in_proj's (B, N, 3·width) output, head by head, back to (B, N, width)."""
        batch, tokens, packed_width = packed.shape
        width = packed_width // 3
        q, k, v = (t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
                   for t in packed.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).reshape(batch, tokens, width)


class PreNormBlock(nn.Module):
    """x -> x + ls_1(attn(ln_1 x)) -> x + ls_2(mlp(ln_2 x)), open_clip's ResidualAttentionBlock."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if hasattr(block, "ln_1_kv"):
            raise ValueError("cross-attention blocks are not supported in open_clip towers")
        self.ln_1 = block.ln_1
        self.attn = SelfAttention(block.attn)
        self.ls_1 = block.ls_1
        self.attn_site = ResidualSite()
        self.ln_2 = block.ln_2
        self.mlp = block.mlp
        self.ls_2 = block.ls_2
        self.mlp_site = ResidualSite()

    def forward(self, x: torch.Tensor, causal: bool, token_mask: Optional[torch.Tensor] = None):
        x = self.attn_site(x, self.ls_1(self.attn(self.ln_1(x), causal)), token_mask)
        return self.mlp_site(x, self.ls_2(self.mlp(self.ln_2(x))), token_mask)

    def build_layout(self, index: int) -> BlockLayout:
        """Called once per block by the backbone: each call registers new projections."""
        width = self.attn.out_proj.in_features
        packed = self.attn.in_proj
        return BlockLayout(
            index=index,
            module=self,
            projections={
                "q": Projection(packed, slice(0, width)),
                "k": Projection(packed, slice(width, 2 * width)),
                "v": Projection(packed, slice(2 * width, 3 * width)),
                "out": Projection(self.attn.out_proj),
                "fc1": Projection(self.mlp.c_fc),
                "fc2": Projection(self.mlp.c_proj),
            },
            sites={"attn": self.attn_site, "mlp": self.mlp_site},
            layernorms=[self.ln_1, self.ln_2],
            width=width,
            mlp_width=self.mlp.c_fc.out_features,
            heads=self.attn.heads,
        )
