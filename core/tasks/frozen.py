"""Nothing computed twice: what no trainable parameter can influence is computed once per run.

An objective encodes the same training items every epoch. Whatever part of that computation
depends on no trainable state gives the same values each time, so it is kept, per item, the first
time the item is computed, and reused afterwards. Two places, one mechanism (`FrozenCache`):

* a whole call of the objective's (`FrozenCache.rows`), e.g. the embeddings of every training
  image when the method adapts only the text tower, BLIP's vision tokens for its matching and
  answering heads, the embeddings of VQA's question-answer texts when only the vision tower is
  adapted;
* inside that call, each tower that runs through `TowerLayout.run` (a tap, see
  `core.backbones.layout.Tap`): the deepest frozen point of the tower is kept — the pooled features
  before the output projection when no block depends on training (a linear probe trains only the
  projections), else the input of the lowest block that does (the blocks below it are skipped).

Frozen-ness is read off the towers, never off a method's name, so new methods benefit as they are:
1. structure: `TowerLayout.first_live_block`, the lowest block with a delta, a combiner, prompts, a
   trainable parameter or a method's forward hook; nothing below it is cut into;
2. autograd: a value is kept only if, computed in grad mode on the first pass, it does not require
   grad, i.e. nothing trainable reached it (embeddings, final norms, hooks, any family's towers).
   A method that used trainable state without autograd (under no_grad, through argmax) would go
   unseen by this test: methods train through autograd, and none here does that;
3. determinism: a training pass and the pass that filled the cache must compute the same thing, so
   nothing is kept while the backbone, outside the method's own module (`backbone.pet`), has a part
   that behaves differently in training (dropout with p > 0 — open_clip's patch dropout too —, batch
   norm). open_clip towers and BLIP (dropout 0.0 in transformers' configs) have none by default.

Exactness: the first pass over an item is the uncached computation itself, made inside the
trainer's forward under its autocast; what is kept is what it produced, in the dtype it produced
(bf16 under bf16 autocast). Later passes reuse it: what a frozen part computes for an item does not
depend on the rest of its batch, up to the rounding of batched kernels (~1e-7 relative in fp32).
Text trimmed to its batch's longest caption (causal towers) is kept at the length it was computed
at: positions past a caption's end never reach its real ones, so a longer batch gets zeros there.
Invalidation: the cache lives in the objective (one per run) and is emptied whenever what it
assumed changes: the device, the autocast dtype, train or eval mode, which parameters are trainable,
the towers' first live blocks, or any frozen parameter or buffer (changed in place — merging, loading
weights — by its version counter; replaced, or cast, by its storage and dtype). Under
torch.distributed each process keeps only the rows it encodes itself. Only in grad mode: under
no_grad nothing is probed or kept.

Memory: per training item, an embedding (D floats), pooled features (width floats), a tower's
tokens at a cut (N × width: 50 × 768 for ViT-B/32, 150 KB in fp32) or BLIP's vision tokens (N × d:
577 × 768 for BLIP-base, 1.8 MB). All of an objective's stores together stay under
PETSTUDIO_FROZEN_CACHE_MB (default 2048 MiB, on the training device); a store that would not fit is
not made and that part is simply computed every time, so only large training sets go uncached.
PETSTUDIO_FROZEN_CACHE_MB=0 turns the cache off.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from core.backbones import Backbone, TowerLayout

FEATURES = "features"   # a cut at the pooled features, after every block
NONE = "none"           # nothing in this tower can be kept for this call

_UNKNOWN, _FROZEN, _LIVE = "unknown", "frozen", "live"


def max_bytes() -> int:
    """The bytes all stores of one objective may hold (PETSTUDIO_FROZEN_CACHE_MB, default 2048)."""
    try:
        megabytes = float(os.environ.get("PETSTUDIO_FROZEN_CACHE_MB", "2048"))
    except ValueError:
        megabytes = 2048.0
    return max(0, int(megabytes * (1 << 20)))


def stochastic_modules(backbone: Backbone) -> list[str]:
    """The backbone's modules outside the method's own (`pet`) that compute something else in
    training than in eval: dropout with p > 0 (also open_clip's PatchDropout and float dropout
    rates kept on attention modules), batch norm (running statistics)."""
    found = []
    for name, module in backbone.named_modules():
        if name == "pet" or name.startswith("pet."):
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(name)
            continue
        dropout_like = "drop" in type(module).__name__.lower()
        for attribute, value in vars(module).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                continue
            if "drop" in attribute.lower() or (dropout_like and attribute in ("p", "prob", "drop_prob")):
                found.append(name)
                break
    return found


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True

    def give(self, size: int) -> None:
        self.left += size


class RowStore:
    """One value per row (item), filled as rows are first computed, on their device and in their
    dtype. A `sequence` store holds (N, width) tokens whose N may vary between batches (trimmed
    padding on a causal tower): it keeps the longest N seen, a shorter row padded with zeros."""

    def __init__(self, size: int, budget: _Budget, sequence: bool = False):
        self.size, self.budget, self.sequence = size, budget, sequence
        self.values: Optional[torch.Tensor] = None
        self.filled: Optional[np.ndarray] = None   # on the host: asking what is kept never waits on the device
        self.bytes = 0

    def missing(self, rows: torch.Tensor) -> torch.Tensor:
        if self.filled is None:
            return torch.ones(len(rows), dtype=torch.bool)
        return torch.from_numpy(~self.filled[rows.numpy()])

    def has(self, rows: torch.Tensor) -> bool:
        return self.filled is not None and bool(self.filled[rows.numpy()].all())

    def _allocate(self, like: torch.Tensor, shape: tuple) -> bool:
        size = self.size * like.element_size() * int(torch.Size(shape).numel())
        if not self.budget.take(size):
            return False
        values = like.new_zeros((self.size, *shape))
        if self.values is not None:
            values[:, :self.values.shape[1]] = self.values
        self.release()
        self.values, self.bytes = values, size
        if self.filled is None:
            self.filled = np.zeros(self.size, dtype=bool)
        return True

    def put(self, rows: torch.Tensor, values: torch.Tensor) -> bool:
        """Keep `values` (one per row); False, keeping nothing, when over budget or unlike what is kept."""
        values = values.detach()
        if self.values is None:
            if not self._allocate(values, tuple(values.shape[1:])):
                return False
        elif (values.dtype, values.device, values.ndim) != (self.values.dtype, self.values.device, self.values.ndim) \
                or values.shape[2:] != self.values.shape[2:]:
            return False
        elif values.shape[1:] != self.values.shape[1:]:
            if not self.sequence:
                return False
            if values.shape[1] > self.values.shape[1] and not self._allocate(values, tuple(values.shape[1:])):
                return False
            if values.shape[1] < self.values.shape[1]:
                padded = values.new_zeros((len(values), *self.values.shape[1:]))
                padded[:, :values.shape[1]] = values
                values = padded
        self.filled[rows.numpy()] = True
        self.values[rows.to(self.values.device)] = values
        return True

    def get(self, rows: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
        values = self.values[rows.to(self.values.device)]
        if length is None or length == values.shape[1]:
            return values
        if length < values.shape[1]:
            return values[:, :length]
        padded = values.new_zeros((len(values), length, *values.shape[2:]))
        padded[:, :values.shape[1]] = values
        return padded

    def release(self) -> None:
        if self.values is not None:
            self.budget.give(self.bytes)
        self.values, self.bytes = None, 0


class _Cut:
    """Where one tower is cut for one kind of call: undecided (None), NONE, a block index (its
    input is kept; `depth` means the last block's output) or FEATURES."""

    def __init__(self):
        self.at: Optional[int | str] = None
        self.store: Optional[RowStore] = None
        self.per_item: Optional[int] = None   # tower rows per item (a video's frames)

    def give_up(self) -> None:
        if self.store is not None:
            self.store.release()
        self.at, self.store = NONE, None


class _TowerTap:
    """A tap on one tower for one call: resumes from the cut when every row is kept, else lets the
    tower run and captures the rows at the cut (choosing the cut on the first pass). One pass per
    call: a tower run twice (another use of it inside the same call) turns the tap off for good."""

    def __init__(self, cut: _Cut, items: torch.Tensor, items_total: int, live_from: int, budget: _Budget):
        self.cut, self.items, self.items_total = cut, items, items_total
        self.live_from, self.budget = live_from, budget
        self.thread = threading.get_ident()
        self.off = False
        self.resumed_at: Optional[int] = None
        self.begun = self.featured = False
        self.last_index = -1
        self.ran = False                                       # a pass ran (not resumed)
        self.candidate: Optional[tuple[int | str, torch.Tensor]] = None
        self.captured: Optional[torch.Tensor] = None

    def _mine(self) -> bool:
        return not self.off and threading.get_ident() == self.thread

    def _second_pass(self) -> None:
        self.off = True
        self.cut.give_up()

    def _rows(self, per_item: int) -> torch.Tensor:
        return (self.items[:, None] * per_item + torch.arange(per_item)).flatten()

    def _kept(self) -> Optional[torch.Tensor]:
        """The rows of this call when all are kept at the cut, else None."""
        cut = self.cut
        if cut.store is None or cut.per_item is None:
            return None
        rows = self._rows(cut.per_item)
        return rows if cut.store.has(rows) else None

    def begin(self, tower: TowerLayout, embed: Callable[[], torch.Tensor], length: Optional[int]) -> torch.Tensor:
        if not self._mine():
            return embed()
        if self.begun:
            self._second_pass()
            return embed()
        self.begun = True
        if isinstance(self.cut.at, int) and (rows := self._kept()) is not None \
                and (length is None or self.cut.store.sequence or length == self.cut.store.values.shape[1]):
            self.resumed_at = self.cut.at
            return self.cut.store.get(rows, length)
        return embed()

    def start(self, tower: TowerLayout) -> int:
        return (self.resumed_at or 0) if self._mine() else 0

    def block_input(self, tower: TowerLayout, index: int, x: torch.Tensor) -> None:
        if not self._mine():
            return
        if index <= self.last_index:
            self._second_pass()
            return
        self.last_index = index
        if self.resumed_at is not None:
            return
        self.ran = True
        if self.cut.at is None:
            if 1 <= index <= self.live_from and not x.requires_grad:
                self.candidate = (index, x)
        elif self.cut.at == index:
            self.captured = x

    def features(self, tower: TowerLayout, pool: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._mine():
            return pool()
        if self.featured:
            self._second_pass()
            return pool()
        self.featured = True
        if self.cut.at == FEATURES and (rows := self._kept()) is not None:
            return self.cut.store.get(rows)
        out = pool()
        if self.off or self.resumed_at is not None:
            return out
        self.ran = True
        if self.cut.at is None:
            if self.live_from == tower.depth and not out.requires_grad:
                self.candidate = (FEATURES, out)
        elif self.cut.at == FEATURES:
            self.captured = out
        return out

    def finish(self, tower: TowerLayout) -> None:
        """After the call: choose the cut on the first pass, keep the captured rows."""
        cut = self.cut
        if self.off or not self.ran:
            return
        if cut.at is None:
            if self.candidate is None:
                cut.give_up()
                return
            cut.at, value = self.candidate
            cut.store = RowStore(0, self.budget, sequence=isinstance(cut.at, int) and tower.causal)
        else:
            value = self.captured
        if value is None or len(value) % len(self.items) or value.requires_grad:
            cut.give_up()
            return
        per_item = len(value) // len(self.items)
        if cut.per_item is None:
            cut.per_item, cut.store.size = per_item, self.items_total * per_item
        if per_item != cut.per_item or not cut.store.put(self._rows(per_item), value):
            cut.give_up()


class _Entry:
    def __init__(self, size: int):
        self.size = size
        self.state = _UNKNOWN
        self.store: Optional[RowStore] = None
        self.cuts: dict[str, _Cut] = {}

    def drop_cuts(self) -> None:
        for cut in self.cuts.values():
            cut.give_up()


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class FrozenCache:
    """Per-item values of an objective's frozen computation, for one run (see the module's docstring).

    `rows(key, ids, compute, size)` stands for `compute(ids)`: the rows of `size` items named by
    `ids` (a 1-D CPU index tensor) for one kind of call `key`, computed from the items alone.
    """

    def __init__(self, backbone: Backbone, enabled: bool = True):
        self.backbone = backbone
        self.enabled = enabled and max_bytes() > 0
        self._signature: Optional[tuple] = None
        self._deterministic = False
        self._live: dict[str, int] = {}
        self._reset()

    def _reset(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._budget = _Budget(max_bytes())

    def _usable(self) -> bool:
        """Empty the cache when what it was computed under has changed; whether it may be used now."""
        backbone = self.backbone
        params = list(backbone.parameters())
        device = params[0].device
        self._live = {name: tower.first_live_block() for name, tower in backbone.towers.items()}
        frozen = [p for p in params if not p.requires_grad] + list(backbone.buffers())
        signature = (device, backbone.training, _autocast_dtype(device),
                     tuple(id(p) for p in params if p.requires_grad),
                     tuple((t.data_ptr(), t.dtype, t._version) for t in frozen),   # replaced or changed in place
                     tuple(self._live.items()))
        if signature != self._signature:
            self._signature = signature
            self._reset()
            self._deterministic = not backbone.training or not stochastic_modules(backbone)
        return self._deterministic

    def kept(self) -> dict[str, str]:
        """What is kept, per key and tower (for tests and reports): "output", a block index, "features"."""
        out = {}
        for key, entry in self._entries.items():
            if entry.state == _FROZEN:
                out[key] = "output"
            for tower, cut in entry.cuts.items():
                if cut.at not in (None, NONE):
                    out[f"{key}.{tower}"] = f"block {cut.at}" if isinstance(cut.at, int) else cut.at
        return out

    def rows(self, key: str, ids: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
             size: int) -> torch.Tensor:
        if not (self.enabled and torch.is_grad_enabled()) or not self._usable():
            return compute(ids)
        entry = self._entries.setdefault(key, _Entry(size))
        if entry.state == _FROZEN:
            missing = entry.store.missing(ids)
            if missing.any():
                with torch.no_grad():
                    fresh = compute(ids[missing])
                if not entry.store.put(ids[missing], fresh):
                    entry.store.release()
                    entry.state, entry.store = _LIVE, None
                    return self._tapped(entry, ids, compute)
            return entry.store.get(ids)
        return self._tapped(entry, ids, compute)

    def _tapped(self, entry: _Entry, ids: torch.Tensor,
                compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with self._taps(entry, ids) as taps:
            out = compute(ids)
        if entry.state == _UNKNOWN:
            towers = self.backbone.towers
            ran_frozen = all(self._live[name] == towers[name].depth for name, tap in taps.items() if tap.ran)
            store = RowStore(entry.size, self._budget)
            if not out.requires_grad and ran_frozen and store.put(ids, out):
                entry.state, entry.store = _FROZEN, store
                entry.drop_cuts()
                return out
            entry.state = _LIVE
        for name, tap in taps.items():
            tap.finish(self.backbone.towers[name])
        return out

    @contextmanager
    def _taps(self, entry: _Entry, ids: torch.Tensor) -> Iterator[dict[str, _TowerTap]]:
        taps = {}
        towers = self.backbone.towers
        try:
            for name, tower in towers.items():
                cut = entry.cuts.setdefault(name, _Cut())
                if tower.tap is None and cut.at != NONE:
                    taps[name] = tower.tap = _TowerTap(cut, ids, entry.size, self._live[name], self._budget)
            yield taps
        finally:
            for name in taps:
                towers[name].tap = None
