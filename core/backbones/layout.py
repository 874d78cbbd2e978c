"""The tower layout: what PET methods see of a backbone.

A tower is a list of blocks; a block exposes named projections (q, k, v, out, fc1, fc2) and
named residual sites (attn, mlp). Methods add *deltas* to projections and *combiners* to
sites; they never touch a library's module names, so every method works on every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn

Delta = Callable[[torch.Tensor], torch.Tensor]
Combiner = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class Projection:
    """A frozen linear map y = W x + b inside a tower, extended by deltas: y + Σ Δ(x).

    `rows` selects this projection's rows of a packed weight (q, k and v share one in_proj),
    so a delta is added to exactly its own slice of the packed output. Deltas receive the
    linear's own input, which for cross-attention keys and values is the other modality:
    `source` then names the tower that input comes from.
    """

    def __init__(self, linear: nn.Linear, rows: Optional[slice] = None, source: Optional[str] = None):
        self.linear = linear
        self.source = source
        self.rows = rows if rows is not None else slice(0, linear.out_features)
        self.deltas: dict[str, Delta] = {}
        siblings = linear.__dict__.setdefault("_pet_projections", [])
        siblings.append(self)
        if len(siblings) == 1:
            linear.register_forward_hook(_add_deltas)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.rows]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return None if self.linear.bias is None else self.linear.bias[self.rows]

    def add_delta(self, name: str, delta: Delta) -> None:
        self.deltas[name] = delta

    def remove_delta(self, name: str) -> None:
        self.deltas.pop(name, None)

    @torch.no_grad()
    def add_to_weight(self, delta_weight: torch.Tensor) -> None:
        """Fold a weight delta (out×in) into the frozen weight, in place (merge)."""
        self.linear.weight[self.rows] += delta_weight.to(self.linear.weight.dtype)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Put back a weight as it was (unmerge: subtracting the delta again would not be exact)."""
        self.linear.weight[self.rows] = weight.to(self.linear.weight.device, self.linear.weight.dtype)


def _add_deltas(linear: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    projections = [p for p in linear._pet_projections if p.deltas]
    if not projections:
        return output
    x = inputs[0]
    if len(linear._pet_projections) == 1:
        return output + sum(d(x) for d in projections[0].deltas.values())
    # Packed weight: build the delta for the whole output, zero where no projection adds one.
    parts = []
    for p in linear._pet_projections:
        if p.deltas:
            parts.append(sum(d(x) for d in p.deltas.values()).to(output.dtype))
        else:
            parts.append(output.new_zeros(*output.shape[:-1], p.out_features))
    return output + torch.cat(parts, dim=-1)


class ResidualSite:
    """Where a sub-layer's output h joins the residual stream x.

    Plain `x + h` unless a method installs a combiner (gates, adapters). `token_mask` (B, N)
    marks real tokens, so per-sample pooling can ignore padding. Not an nn.Module, so a
    combiner's parameters stay registered only under the method's own module. A combiner that
    pools over the tokens it is given says so with `pools_tokens = True`: a decoder generating
    with a cache of past keys and values feeds it one token at a time, so it generates without.
    """

    def __init__(self):
        self.combiner: Optional[Combiner] = None

    def __call__(self, x: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        if self.combiner is None:
            return x + h
        return self.combiner(x, h, token_mask)


def pools_tokens(tower: "TowerLayout") -> bool:
    """Whether a combiner on the tower pools over tokens (see ResidualSite)."""
    return any(getattr(site.combiner, "pools_tokens", False) for block in tower.blocks for site in block.sites.values())


@dataclass
class BlockLayout:
    index: int
    module: nn.Module
    projections: dict[str, Projection]
    sites: dict[str, ResidualSite]
    layernorms: list[nn.LayerNorm]
    width: int
    mlp_width: int
    heads: int
    # Post-LN blocks (BERT/BLIP text): the modules whose outputs are the sub-layer outputs after
    # their Add&LN, e.g. {"self": ..., "cross": ...}; methods observe them with forward hooks.
    sublayers: dict[str, nn.Module] = field(default_factory=dict)


PromptSource = Callable[[int], Optional[torch.Tensor]]


class Tap(Protocol):
    """What a cache of frozen computation (core.tasks.frozen) sees of one pass through a tower,
    and where it may stand in for it: the tokens entering the blocks (`begin`), the first block
    to run (`start`), each block's input (`block_input`; index `depth` is the last block's output)
    and the pooled features before the output projection (`features`)."""

    def begin(self, tower: "TowerLayout", embed: Callable[[], torch.Tensor], length: Optional[int]) -> torch.Tensor: ...

    def start(self, tower: "TowerLayout") -> int: ...

    def block_input(self, tower: "TowerLayout", index: int, x: torch.Tensor) -> None: ...

    def features(self, tower: "TowerLayout", pool: Callable[[], torch.Tensor]) -> torch.Tensor: ...


def _foreign_hooks(module: nn.Module) -> bool:
    """Whether a forward hook other than the projections' own delta hook acts inside `module`."""
    for m in module.modules():
        if m._forward_pre_hooks or any(hook is not _add_deltas for hook in m._forward_hooks.values()):
            return True
    return False


def block_depends_on_training(block: BlockLayout, prompts: Optional[PromptSource] = None) -> bool:
    """Whether the block computes anything from trainable state: a delta on one of its projections,
    a combiner at one of its sites, prompts inserted at it, a trainable parameter inside it, or a
    forward hook inside it (a method observing or changing a sub-layer) — whichever method put it there."""
    return (any(p.deltas for p in block.projections.values())
            or any(site.combiner is not None for site in block.sites.values())
            or (prompts is not None and prompts(block.index) is not None)
            or any(p.requires_grad for p in block.module.parameters())
            or _foreign_hooks(block.module))


@dataclass
class TowerLayout:
    """One tower: its blocks, its width, and the parameters of its projection into the joint space.

    `prompt_slot` is where learnable prompt tokens are inserted (after [CLS] / start token;
    None for towers that do not run through `run`); a method sets `prompts` to a function
    layer -> (n, width) tokens or None. `role` is "decoder" for a tower that generates text
    while cross-attending to an encoder's states (BLIP's answer decoder), "encoder" otherwise.
    """

    name: str
    width: int
    blocks: list[BlockLayout]
    output_parameters: tuple[nn.Parameter, ...]
    causal: bool
    prompt_slot: Optional[int] = 1
    role: str = "encoder"
    prompts: Optional[PromptSource] = field(default=None)
    # Set by core.tasks.frozen for the length of one objective call: see Tap. Backbones whose
    # towers run through `run` pass their embedding and pooling through `begin` and `features`.
    tap: Optional[Tap] = field(default=None, repr=False, compare=False)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def first_live_block(self) -> int:
        """The lowest block that depends on trainable state (see `block_depends_on_training`), or
        `depth` when none does. The blocks below it compute the same outputs from the same inputs
        for as long as the attached method stays as it is."""
        return next((block.index for block in self.blocks if block_depends_on_training(block, self.prompts)),
                    self.depth)

    def begin(self, embed: Callable[[], torch.Tensor], length: Optional[int] = None) -> torch.Tensor:
        """The (B, N, width) tokens that enter the first block: `embed()`, unless a tap holds a later
        block's input for every row (`run` then starts at that block). `length` is N when it varies
        from batch to batch (trimmed padding), for a tap to cut what it holds to the same length."""
        return embed() if self.tap is None else self.tap.begin(self, embed, length)

    def features(self, pool: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tower's pooled features before its output projection: `pool()` (embedding, `run`,
        final norm, pooling), unless a tap holds them for every row."""
        return pool() if self.tap is None else self.tap.features(self, pool)

    def run(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks on (B, N, width) tokens, inserting (and finally removing) prompts."""
        slot, n_prompts = self.prompt_slot, 0
        tap = self.tap
        start = 0 if tap is None else tap.start(self)
        for block in self.blocks[start:]:
            if tap is not None:
                tap.block_input(self, block.index, x)
            prompts = self.prompts(block.index) if self.prompts is not None else None
            if prompts is not None:
                prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :slot], prompts, x[:, slot + n_prompts:]], dim=1)
                if token_mask is not None and n_prompts == 0:
                    ones = token_mask.new_ones(x.shape[0], prompts.shape[1])
                    token_mask = torch.cat([token_mask[:, :slot], ones, token_mask[:, slot:]], dim=1)
                n_prompts = prompts.shape[1]
            x = block.module(x, self.causal, token_mask)
        if tap is not None:
            tap.block_input(self, self.depth, x)
        if n_prompts:
            x = torch.cat([x[:, :slot], x[:, slot + n_prompts:]], dim=1)
        return x
