"""What attaching a PET method returns, and the helpers methods share to attach."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from core.backbones import Backbone, BlockLayout, Projection


PULL_HELP = ("pull toward the pretrained weights: adds pull/N · ‖W − W₀‖² to the loss (N training items); "
             "1 is ProLIP's λ = 1/N, 0 none")


class PetError(ValueError):
    """A PET configuration or state that cannot be used, with a message meant for the user."""


class PetHandle:
    """A method attached to a backbone.

    The method's own parameters live in one module, installed as `backbone.pet`; methods that
    tune existing weights (BitFit, linear probe, full) name them instead. Everything else is
    frozen, so it gets no gradient and no optimizer state. Parameter names are the backbone's
    `named_parameters()` names, which is also the checkpoint format.
    """

    mergeable = False

    def __init__(self, backbone: Backbone, method: str, config: Any,
                 tuned_backbone_params: Iterable[nn.Parameter] = (), group: Callable[[str], str] = lambda n: "pet"):
        self.backbone, self.method, self.config = backbone, method, config
        self._group = group
        self._undo: list[Callable[[], None]] = []
        self.merged = False
        self._frozen_weights: list[torch.Tensor] = []   # while merged: each merged projection's frozen weight
        self.pull = 0.0                                 # strength of the pull toward the pretrained weights
        self._anchors: list[tuple[nn.Parameter, torch.Tensor]] = []
        backbone.requires_grad_(False)
        for p in tuned_backbone_params:
            p.requires_grad_(True)
        backbone.pet = None

    def pull_toward_pretrained(self, strength: float, params: Iterable[nn.Parameter]) -> None:
        """Train `params` with `strength`/N · Σ‖W − W₀‖² added to the loss (N training items, W₀
        their pretrained values): ProLIP's pull, its λ = 1/N at strength 1."""
        self.pull = strength
        self._anchors = [(p, p.detach().clone()) for p in params] if strength else []

    def pulled(self, objective: nn.Module, items: int) -> nn.Module:
        """`objective` with the pull added (itself when the method does not pull)."""
        return PulledObjective(objective, self._anchors, self.pull / max(1, items)) if self.pull else objective

    def install(self, module: nn.Module) -> None:
        """Register the method's own parameters under `backbone.pet`, trainable."""
        self.backbone.pet = module.to(self.backbone.device)
        module.requires_grad_(True)

    def on_detach(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def budget(self) -> dict[str, int]:
        groups: dict[str, int] = {}
        for name, p in self.trainable_parameters().items():
            groups[self._group(name)] = groups.get(self._group(name), 0) + p.numel()
        return groups

    def gate_readout(self, pixels: Optional[torch.Tensor] = None,
                     tokens: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Named tensors describing what the method's gates do on a batch (none by default)."""
        return {}

    @property
    def foldable(self) -> bool:
        """Whether the tuned model is the backbone alone once merged (for export): the method tunes
        backbone weights, or adds only deltas linear in them."""
        return self.backbone.pet is None or self.mergeable

    def vision_token_map(self, readout: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """A readout's per-token vision gates as one (rows, cols) map over the picture's patches
        (first sample, mean over layers and sites); None for a method without such gates."""
        return None

    def contextualise(self, embeddings: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """In training, what a method that mixes a batch's text context into embeddings makes
        of them (Aurora's informative context enhancement); others leave them as they are."""
        return embeddings

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, on the CPU; refused when any is NaN or infinite (a broken
        model is never saved as if it were a result)."""
        state = {n: p.detach().cpu().contiguous() for n, p in self.trainable_parameters().items()}
        broken = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if broken:
            raise PetError(f"{self.method} parameter {broken[0]} holds NaN or infinite values"
                           f"{f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''}: "
                           f"training went wrong; try a lower learning rate")
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load PET weights, checking every name, shape and dtype, and that every value is finite."""
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PetError(f"{self.method} weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in own.items():
            tensor = state[name]
            if tuple(tensor.shape) != tuple(p.shape):
                raise PetError(f"{self.method} weight {name} has shape {tuple(tensor.shape)}, "
                               f"expected {tuple(p.shape)}")
            if tensor.dtype != p.dtype:
                raise PetError(f"{self.method} weight {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                               f"expected {str(p.dtype).removeprefix('torch.')}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise PetError(f"{self.method} weight {name} holds NaN or infinite values: the weights are broken")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name])

    def linear_deltas(self) -> list[tuple[Projection, Any]]:
        """(projection, delta) pairs whose delta is linear in x, with a `delta_weight()` (out×in)."""
        return []

    def merge(self) -> None:
        """Fold every linear delta into its frozen weight: inference then costs nothing extra. The
        frozen weights are kept (on the CPU) so that unmerging gives them back bit for bit."""
        if not self.mergeable:
            raise PetError(f"{self.method} is not linear in the weights: it cannot be merged")
        if not self.merged:
            self._frozen_weights = []
            try:
                for projection, delta in self.linear_deltas():
                    self._frozen_weights.append(projection.weight.detach().to("cpu", copy=True))
                    projection.add_to_weight(delta.delta_weight())
                    projection.remove_delta(self.method)
            except BaseException:   # half merged: what was folded is put back, as it was
                self.merged = True
                self.unmerge()
                raise
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            for (projection, delta), weight in zip(self.linear_deltas(), self._frozen_weights):
                projection.set_weight(weight)
                projection.add_delta(self.method, delta)
            self._frozen_weights = []
            self.merged = False

    def detach(self) -> None:
        """Remove the method's computation and parameters; tuned backbone weights stay as they are."""
        if self.merged:
            self.unmerge()
        for undo in reversed(self._undo):
            undo()
        self.backbone.pet = None
        self.backbone.requires_grad_(False)


class PulledObjective(nn.Module):
    """An objective plus weight · Σ‖W − W₀‖² over the anchored parameters (summed, as ProLIP's code
    sums it); batches as the objective's."""

    def __init__(self, objective: nn.Module, anchors: list[tuple[nn.Parameter, torch.Tensor]], weight: float):
        super().__init__()
        self.objective, self.weight = objective, weight
        self._anchors = anchors   # a plain list: the parameters are the objective's, the anchors constants

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        distance = sum(((p.float() - anchor.float()) ** 2).sum() for p, anchor in self._anchors)
        return self.objective(batch) + self.weight * distance

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        return self.objective.batches(batch_size, generator)

    @property
    def last_spread(self) -> Optional[torch.Tensor]:
        return getattr(self.objective, "last_spread", None)

    @property
    def last_media_spread(self) -> Optional[torch.Tensor]:
        return getattr(self.objective, "last_media_spread", None)

    @property
    def chance_loss(self) -> Optional[float]:   # the pull adds nothing at the start, where it is read
        return getattr(self.objective, "chance_loss", None)


def resolve_towers(backbone: Backbone, towers: Iterable[str]) -> tuple[str, ...]:
    """The named towers, checked; none named means every tower of the backbone."""
    towers = tuple(towers) or tuple(backbone.towers)
    for tower in towers:
        if tower not in backbone.towers:
            raise PetError(f"backbone {backbone.spec} has no tower '{tower}' (has {', '.join(backbone.towers)})")
    return towers


def blocks_of(backbone: Backbone, towers: Iterable[str]) -> Iterable[tuple[str, BlockLayout]]:
    for tower in resolve_towers(backbone, towers):
        for block in backbone.towers[tower].blocks:
            yield tower, block


def _block_slot(modules: nn.ModuleDict, tower: str, block: BlockLayout) -> nn.ModuleDict:
    if tower not in modules:
        modules[tower] = nn.ModuleDict()
    if str(block.index) not in modules[tower]:
        modules[tower][str(block.index)] = nn.ModuleDict()
    return modules[tower][str(block.index)]


def attach_projection_deltas(handle: PetHandle, towers: Iterable[str], projections: Iterable[str],
                             make: Callable[[str, BlockLayout, str], nn.Module]) -> nn.ModuleDict:
    """One delta module per (tower, block, projection), added to that projection's output.

    Returns the modules as pet[tower][block][projection]; `make(tower, block, projection)`
    builds each one, and detaching the handle removes every delta again.
    """
    modules = nn.ModuleDict()
    attached = []
    for tower, block in blocks_of(handle.backbone, towers):
        per_block = _block_slot(modules, tower, block)
        for name in projections:
            if name not in block.projections:
                raise PetError(f"{tower} block {block.index} has no projection '{name}' "
                               f"(has {', '.join(block.projections)})")
            per_block[name] = make(tower, block, name)
            block.projections[name].add_delta(handle.method, per_block[name])
            attached.append(block.projections[name])
    handle.on_detach(lambda: [p.remove_delta(handle.method) for p in attached])
    return modules


def attach_site_combiners(handle: PetHandle, towers: Iterable[str], sites: Iterable[str],
                          make: Callable[[str, BlockLayout, str], nn.Module]) -> nn.ModuleDict:
    """One combiner module per (tower, block, residual site): module(x, h, token_mask).

    A site only some blocks have (BLIP's text `cross`) is used where it exists."""
    blocks = list(blocks_of(handle.backbone, towers))
    missing = [name for name in sites if not any(name in block.sites for _, block in blocks)]
    if missing:
        raise PetError(f"{handle.method}: no block of the {', '.join(resolve_towers(handle.backbone, towers))} "
                       f"tower(s) of {handle.backbone.spec} "
                       f"has a residual site {', '.join(missing)}")
    modules = nn.ModuleDict()
    attached = []
    for tower, block in blocks:
        per_block = _block_slot(modules, tower, block)
        for name in sites:
            if name not in block.sites:
                continue
            site = block.sites[name]
            if site.combiner is not None:
                raise PetError(f"{tower} block {block.index} site '{name}' already has a method attached")
            per_block[name] = make(tower, block, name)
            site.combiner = per_block[name]
            attached.append(site)
    handle.on_detach(lambda: [setattr(s, "combiner", None) for s in attached])
    return modules
