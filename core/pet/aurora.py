"""Aurora: mode approximation (NeurIPS 2023), with gated query transformation and informative
context enhancement.

Every adapted projection j gets Δ_j(x) = s · V(dropout((U x) M_j)), M_j = Σ_c C[:, :, c] λ_j[c]:
the factors U (R×d), V (d×R, zero init) and the core C (R×R×R) are shared by all layers of all
towers (U, V per width, so per tower when widths differ); each projection owns only its mode
vector λ_j ∈ R^R. An MLP (hidden width k·d) takes k mode vectors for fc1 and k for fc2, laid out
as the authors' CP/vit.py does: the k matrices M_1..M_k, stacked modes-last and read row-major as
one R×kR matrix F, whose R-wide column blocks B_1..B_k each mix all k modes; fc1's hidden quarter q
is V((U x) B_q), and fc2 maps its input quarters x_q to V(Σ_q (U x_q) B_qᵀ).
Linear in the weights: ΔW_j = V M_jᵀ U merges into the frozen weight for inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from core.backbones import BlockLayout, Projection
from core.pet.handle import PetError, PetHandle, blocks_of
from core.pet.registry import Method, register
from core.pet.options import option
from core.pet.recipes import Recipe, Setting

CONTEXT_WEIGHT = 0.1   # informative context enhancement (the authors' 0.1)
SELF_AND_CROSS = ("q", "k", "v", "cross_q", "cross_k", "cross_v")
FULL_BLOCK = ("q", "k", "v", "out", "fc1", "fc2")


@dataclass
class Config:
    rank: int = option(32, "R, the rank of the shared factors U, V and the core C", 1, 256, main=True)
    towers: tuple[str, ...] = option((), "towers to adapt (empty: every tower)")
    projections: tuple[str, ...] = option((), "projections to adapt (empty: the authors' choice per tower)")
    dropout: float = option(0.1, "dropout inside each delta", 0.0, 0.9)
    scale: float = option(1.0, "s, the scale of every delta", 0.0, 100.0)
    share_factors: bool = option(True, "one U, V for towers of equal width")
    gqt: bool = option(False, "gated query transformation", main=True)
    gqt_towers: tuple[str, ...] = option((), "towers that get the gated query transformation (empty: every text "
                                             "tower, as the authors: BLIP's text encoder and answer decoder)")
    ice: bool = option(False, "informative context enhancement (training only)", main=True)
    heads: bool = option(False, "also tune the task heads (vision projection, ITM head)", main=True)


def _projections_for(block: BlockLayout, config: Config) -> tuple[str, ...]:
    """The authors adapt self- and cross-attention q, k, v in text towers with cross-attention
    (BLIP), and q, k, v, out, fc1, fc2 elsewhere (every ViT block; both towers of CLIP)."""
    if config.projections:
        return config.projections
    return SELF_AND_CROSS if "cross_q" in block.projections else FULL_BLOCK


def _pieces(projection: Projection, where: str) -> tuple[int, str]:
    """How many mode vectors a projection takes and how its delta is laid out: k for an MLP
    projection between widths d and k·d (fc1 widens, fc2 narrows), one otherwise."""
    wide, narrow = max(projection.in_features, projection.out_features), \
        min(projection.in_features, projection.out_features)
    if wide == narrow:
        return 1, "plain"
    if wide % narrow:
        raise PetError(f"{where}: aurora's MLP layout needs a hidden width that is a multiple of the "
                       f"block width, not {wide} for {narrow}")
    return wide // narrow, "widen" if projection.out_features == wide else "narrow"


class AuroraFactors(nn.Module):
    def __init__(self, rank: int, widths: dict[str, int], mode_counts: dict[str, int], dropout: float):
        super().__init__()
        self.core = nn.Parameter(torch.empty(rank, rank, rank))
        nn.init.xavier_uniform_(self.core)
        self.U = nn.ParameterDict()
        self.V = nn.ParameterDict()
        for key, width in widths.items():
            self.U[key] = nn.Parameter(nn.Linear(width, rank, bias=False).weight.detach().clone())
            self.V[key] = nn.Parameter(torch.zeros(width, rank))    # zero: starts at the frozen model
        self.modes = nn.ParameterDict()
        for tower, count in mode_counts.items():
            self.modes[tower] = nn.Parameter(torch.empty(count, rank))
            nn.init.xavier_uniform_(self.modes[tower])
        self.dropout = nn.Dropout(dropout)
        self._last_projection: Optional[tuple] = None
        self._pass_modes: dict[str, Optional[torch.Tensor]] = {}   # tower in a pass -> its mode matrices

    def project(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """U x. Projections fed the same input (q, k and v; cross-attention k and v) reuse it:
        the last input is remembered by identity, and every forward pass makes new inputs."""
        last = self._last_projection
        if last is not None and last[0] is x and last[1] == key:
            return last[2]
        u = x @ self.U[key].to(x.dtype).T
        self._last_projection = (x, key, u)
        return u

    def mode_matrices(self, tower: str, rows: slice) -> torch.Tensor:
        """(pieces, R, R): M = Σ_c C[:, :, c] λ[c] for each mode vector in `rows`."""
        return torch.einsum("abc,pc->pab", self.core, self.modes[tower][rows])

    def begin_pass(self, tower: str) -> None:
        """A forward pass enters the tower's first adapted block: its projections share one computation
        of the tower's mode matrices (48 projections a pass on the offline model; README "Nothing
        computed twice")."""
        self._pass_modes[tower] = None

    def end_pass(self, tower: str) -> None:
        """It leaves the last: nothing of the pass is kept (autograd holds what the backward needs)."""
        self._pass_modes.pop(tower, None)
        self._last_projection = None

    def pass_mode_matrices(self, tower: str, rows: slice) -> torch.Tensor:
        """`mode_matrices`, computed once for the whole tower within one of its forward passes."""
        if tower not in self._pass_modes:   # outside a pass (a projection called on its own)
            return self.mode_matrices(tower, rows)
        if self._pass_modes[tower] is None:
            self._pass_modes[tower] = torch.einsum("abc,pc->pab", self.core, self.modes[tower])
        return self._pass_modes[tower][rows]


class AuroraDelta:
    """The delta of one projection; holds no parameters of its own (they are all shared)."""

    def __init__(self, factors: AuroraFactors, tower: str, rows: slice, layout: str,
                 in_key: str, out_key: str, scale: float):
        self.factors, self.tower, self.rows, self.layout = factors, tower, rows, layout
        self.in_key, self.out_key, self.scale = in_key, out_key, scale

    def mixed_modes(self, in_pass: bool = False) -> torch.Tensor:
        """F (R × k·R): the k mode matrices stacked modes-last and read row-major, so column
        k·j + m is column j of M_m, and each R-wide column block mixes all k modes (CP/vit.py)."""
        M = self._mode_matrices(in_pass)                                  # (k, R, R)
        return M.permute(1, 2, 0).reshape(M.shape[1], -1)

    def _mode_matrices(self, in_pass: bool) -> torch.Tensor:
        f = self.factors
        return f.pass_mode_matrices(self.tower, self.rows) if in_pass else f.mode_matrices(self.tower, self.rows)

    def blocks(self) -> torch.Tensor:
        """(k, R, R): B_q, the q-th R-wide column block of F."""
        F = self.mixed_modes()
        return F.view(F.shape[0], -1, F.shape[0]).transpose(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        V = f.V[self.out_key].to(x.dtype)
        if self.layout == "plain":
            M = self._mode_matrices(in_pass=True)[0].to(x.dtype)
            return f.dropout(f.project(x, self.in_key) @ M) @ V.T * self.scale
        F = self.mixed_modes(in_pass=True).to(x.dtype)
        rank = F.shape[0]
        if self.layout == "widen":      # hidden quarter q: V((U x) B_q)
            u = f.project(x, self.in_key) @ F
            return (f.dropout(u.unflatten(-1, (-1, rank))) @ V.T).flatten(-2) * self.scale
        # narrow: V(Σ_q (U x_q) B_qᵀ), the sum over quarters being one product with Fᵀ
        U = f.U[self.in_key].to(x.dtype)
        u = (x.unflatten(-1, (F.shape[1] // rank, -1)) @ U.T).flatten(-2)
        return f.dropout(u @ F.T) @ V.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        U, V = f.U[self.in_key], f.V[self.out_key]
        if self.layout == "plain":
            return V @ f.mode_matrices(self.tower, self.rows)[0].T @ U * self.scale
        if self.layout == "widen":      # rows of quarter q: V B_qᵀ U
            return torch.cat([V @ b.T @ U for b in self.blocks()], dim=0) * self.scale
        return torch.cat([V @ b @ U for b in self.blocks()], dim=1) * self.scale   # columns: V B_q U


class QueryGate(nn.Module):
    """GQT on a pre-LN block: x_out = x_mid + h + 0.1 (x_mid ⊙ γ + β), at the MLP residual site."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(width) * 2e-4)
        self.beta = nn.Parameter(torch.randn(width) * 2e-4)

    def forward(self, x: torch.Tensor, h: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        return x + h + 0.1 * (x * self.gamma.to(x.dtype) + self.beta.to(x.dtype))


class CrossQueryGate(nn.Module):
    """GQT on a post-LN text layer with cross-attention (BLIP), in multimodal mode only:
    layer_out += 0.1 (A_self ⊙ γ_s + β_s) + 0.1 (A_cross ⊙ γ_c + β_c), with A_self and A_cross
    the self- and cross-attention outputs after their Add&LN, observed through forward hooks."""

    def __init__(self, block: BlockLayout):
        super().__init__()
        for part in ("gamma_self", "beta_self", "gamma_cross", "beta_cross"):
            self.register_parameter(part, nn.Parameter(torch.randn(block.width) * 2e-4))
        self._seen: dict[str, torch.Tensor] = {}
        self.hooks = [block.sublayers["self"].register_forward_hook(self._keep("self")),
                      block.sublayers["cross"].register_forward_hook(self._keep("cross")),
                      block.module.register_forward_hook(self._add)]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self._seen[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def _add(self, module, inputs, output):
        seen, self._seen = self._seen, {}
        if "cross" not in seen:        # unimodal pass: no cross-attention, no gate
            return output
        out = output[0] if isinstance(output, tuple) else output
        dtype = out.dtype
        out = out + 0.1 * (seen["self"] * self.gamma_self.to(dtype) + self.beta_self.to(dtype)) \
            + 0.1 * (seen["cross"] * self.gamma_cross.to(dtype) + self.beta_cross.to(dtype))
        return (out, *output[1:]) if isinstance(output, tuple) else out


class AuroraModule(nn.Module):
    def __init__(self, factors: AuroraFactors):
        super().__init__()
        self.factors = factors
        self.gqt: Optional[nn.Module] = None


class AuroraHandle(PetHandle):
    mergeable = True

    def __init__(self, backbone, config: Config):
        heads = backbone.head_parameters() if config.heads else ()
        super().__init__(backbone, "aurora", config, tuned_backbone_params=heads,
                         group=self._group_of)
        self.deltas: list[tuple[str, int, str, Projection, AuroraDelta]] = []

    @staticmethod
    def _group_of(name: str) -> str:
        if name.startswith("pet.factors.modes."):
            return "modes"
        if name.startswith("pet.factors."):
            return "shared"
        if name.startswith("pet.gqt."):
            return "gqt"
        return "heads"

    def linear_deltas(self):
        return [(projection, delta) for *_, projection, delta in self.deltas]

    @property
    def foldable(self) -> bool:
        return not self.config.gqt   # GQT's gates act on sub-layer outputs: not a weight

    def contextualise(self, embeddings: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ICE: 0.1 × the batch mean of the unimodal text context is added (training only)."""
        if not self.config.ice:
            return embeddings
        return embeddings + CONTEXT_WEIGHT * context.mean(dim=0, keepdim=True)

    @torch.no_grad()
    def gate_readout(self, pixels=None, tokens=None) -> dict[str, torch.Tensor]:
        """Mode vectors λ and ‖ΔW‖_F per (tower, projection) over layers; GQT γ/β per layer."""
        out: dict[str, list[torch.Tensor]] = {}
        for tower, _, name, _, delta in self.deltas:
            out.setdefault(f"{tower}.modes.{name}", []).append(self.backbone.pet.factors.modes[tower][delta.rows])
            out.setdefault(f"{tower}.delta_norm.{name}", []).append(torch.linalg.norm(delta.delta_weight()))
        readout = {k: torch.stack(v).float().cpu() for k, v in out.items()}
        if self.backbone.pet.gqt is not None:
            for tower, gates in self.backbone.pet.gqt.items():
                for part, _ in next(iter(gates.values())).named_parameters():
                    readout[f"{tower}.gqt_{part}"] = torch.stack(
                        [getattr(gate, part) for gate in gates.values()]).float().cpu()
        return readout


def attach(backbone, config: Config) -> AuroraHandle:
    if config.rank < 1:
        raise PetError(f"aurora rank must be at least 1, got {config.rank}")
    handle = AuroraHandle(backbone, config)
    plan = []     # (tower, block, name, projection, pieces, layout, U key, V key)
    widths: dict[str, int] = {}
    counts: dict[str, int] = {}

    def key(tower: str, width: int) -> str:
        return str(width) if config.share_factors else f"{tower}_{width}"

    for tower, block in blocks_of(backbone, config.towers):
        for name in _projections_for(block, config):
            if name not in block.projections:
                raise PetError(f"{tower} block {block.index} has no projection '{name}' "
                               f"(has {', '.join(block.projections)})")
            projection = block.projections[name]
            pieces, layout = _pieces(projection, f"{tower} block {block.index} {name}")
            source = projection.source or tower
            width_in = projection.in_features // (pieces if layout == "narrow" else 1)
            width_out = projection.out_features // (pieces if layout == "widen" else 1)
            widths[key(source, width_in)] = width_in
            widths[key(tower, width_out)] = width_out
            plan.append((tower, block, name, projection, pieces, layout, key(source, width_in), key(tower, width_out)))
            counts[tower] = counts.get(tower, 0) + pieces
    factors = AuroraFactors(config.rank, widths, counts, config.dropout)
    module = AuroraModule(factors)
    handle.install(module)
    used: dict[str, int] = {}
    for tower, block, name, projection, pieces, layout, in_key, out_key in plan:
        start = used.get(tower, 0)
        used[tower] = start + pieces
        delta = AuroraDelta(factors, tower, slice(start, start + pieces), layout, in_key, out_key, config.scale)
        projection.add_delta(handle.method, delta)
        handle.deltas.append((tower, block.index, name, projection, delta))
    handle.on_detach(lambda: [p.remove_delta(handle.method) for *_, p, _ in handle.deltas])
    ends: dict[str, list[BlockLayout]] = {}   # each tower's first and last adapted block, in the order they run
    for tower, block, *_ in plan:
        ends.setdefault(tower, [block, block])[1] = block
    hooks = []
    for tower, (first, last) in ends.items():
        hooks.append(first.module.register_forward_pre_hook(lambda _, args, tower=tower: factors.begin_pass(tower)))
        hooks.append(last.module.register_forward_hook(lambda _, args, out, tower=tower: factors.end_pass(tower)))
    handle.on_detach(lambda: [hook.remove() for hook in hooks])
    if config.gqt:
        module.gqt = _attach_query_gates(handle, config.gqt_towers or _text_towers(backbone))
        module.gqt.to(backbone.device).requires_grad_(True)
    return handle


def _text_towers(backbone) -> tuple[str, ...]:
    """The towers that read text: the authors gate every text layer run in multimodal mode."""
    return tuple(name for name in backbone.towers if name != "vision")


def _attach_query_gates(handle: AuroraHandle, towers: tuple[str, ...]) -> nn.ModuleDict:
    """GQT gates as gqt[tower][block]: on the MLP residual site of pre-LN blocks (CLIP), through
    sub-layer hooks on post-LN blocks with cross-attention (BLIP text)."""
    gates = nn.ModuleDict()
    for tower, block in blocks_of(handle.backbone, towers):
        gates[tower] = gates[tower] if tower in gates else nn.ModuleDict()
        if "cross" in block.sublayers:
            gate = CrossQueryGate(block)
            handle.on_detach(lambda gate=gate: [h.remove() for h in gate.hooks])
        elif "mlp" in block.sites:
            gate = QueryGate(block.width)
            if block.sites["mlp"].combiner is not None:
                raise PetError(f"{tower} block {block.index}: the MLP site already has a method attached")
            block.sites["mlp"].combiner = gate
            handle.on_detach(lambda site=block.sites["mlp"]: setattr(site, "combiner", None))
        else:
            raise PetError(f"gated query transformation is not available on the {tower} tower of "
                           f"{handle.backbone.spec}")
        gates[tower][str(block.index)] = gate
    return gates


def _figure(config: Config, readout: dict):
    from core.figures import aurora_figure

    return aurora_figure(readout)


def _authors_recipe(setting: Setting) -> Recipe:
    """WillDreamer/Aurora's BLIP scripts: GQT always on (text layers in multimodal mode), and on
    retrieval also ICE and the tuned heads; R = 32 for pictures, 64 for video; AdamW with weight
    decay 0.05 (the studio's too), lr 1e-4, cosine, no warm-up. ICE and the heads need a fused
    [CLS] and an ITM head, which only BLIP retrieval has."""
    matching = "matching" in setting.capabilities
    options = {"gqt": True, "rank": 64 if setting.video else 32}
    if matching:
        options.update(ice=True, heads=True)
    return Recipe("authors", "WillDreamer/Aurora (BLIP retrieval, VQA and video scripts)", options, lr=1e-4,
                  warmup=0.0)


register(Method(
    name="aurora", label="Aurora (mode approximation)", default_lr=1e-4, config=Config, attach=attach, figure=_figure,
    trains="shared low-rank factors U, V, core C and one mode vector per projection", authors_recipe=_authors_recipe,
    revision=2, revised="its MLP deltas now follow the authors' layout, every hidden quarter mixing all four modes"))
