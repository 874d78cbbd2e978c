"""The one interface every backbone family implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from core.backbones.layout import TowerLayout


def weights_bytes(module: nn.Module) -> int:
    """The bytes `module`'s parameters and buffers take; on the meta device, what they would take."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def built_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on PyTorch's meta device: the module's structure and shapes, no memory allocated and
    no random number drawn."""
    with torch.device("meta"):
        return build()


class BackboneError(ValueError):
    """A backbone spec that cannot be loaded, with a message meant for the user.

    `unreachable` marks weights that could not be fetched (no network, hub down): the case
    in which callers may fall back to the bundled offline model."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def bytes_text(size: int) -> str:
    """A size as a person reads it: GiB with one decimal, else whole MiB, else bytes (a budget of
    50 MiB is not "0.0 GiB")."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size:,} bytes"


@dataclass(frozen=True)
class WeightsBudget:
    """The most memory a backbone's weights may take where it is loaded, and what to do past it. A
    loader refuses past it before building (core.backbones.load_backbone), against the very weights it
    would build: a hub repository may change between an early check and the load."""
    bytes: int
    holder: str = "this process"   # who keeps the models, as the message says it
    remedy: str = "choose a smaller backbone"

    def refuse(self, spec: str, needed: Optional[int]) -> None:
        """BackboneError when `needed` bytes (None: not known beforehand) are over the budget."""
        if needed is not None and needed > self.bytes:
            raise BackboneError(f"{spec[:200]} needs {bytes_text(needed)} for its weights, more than {self.holder} "
                                f"keeps for models ({bytes_text(self.bytes)}): {self.remedy}")


# The optional parts of the interface, and what a backbone without one is said to lack. A
# subclass declares those it implements in `capabilities`; the base class refuses the rest.
CAPABILITIES = {
    "image_tokens": "per-token vision output",  # image_tokens
    "matching": "image-text matching head",     # text_cls, fused_cls, match_logits, embed_image_tokens, embed_text_cls
    "answer_generation": "answer decoder",      # encode_question, answer_loss, answer_log_likelihoods, generate_answers
}


class Backbone(nn.Module):
    """A dual-encoder vision-language model seen through its tower layouts.

    Subclasses set `spec`, `family`, `weights` (a sentence saying where the weights came
    from, e.g. "random init (seed 0): no pretrained weights"), `towers` and `image_transform`,
    implement `encode_image`, `encode_text` and `tokenize`, and declare in `capabilities` the
    optional parts (CAPABILITIES) they implement. A PET method's own parameters live under the
    submodule `pet`, so `.to(device)` and DDP see them with the backbone's.
    """

    spec: str
    family: str
    weights: str
    towers: dict[str, TowerLayout]
    image_transform: Callable
    seed: int
    capabilities: frozenset[str] = frozenset()

    def __init__(self):
        super().__init__()
        self.pet: Optional[nn.Module] = None
        self.fallback_note: Optional[str] = None   # set when this model stands in for an unreachable one
        self.tasks: tuple[str, ...] = ()            # the tasks it serves: its family's, set by load_backbone

    def has(self, capability: str) -> bool:
        """Whether this backbone implements the optional part `capability` (one of CAPABILITIES)."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown backbone capability '{capability}': one of {', '.join(CAPABILITIES)}")
        return capability in self.capabilities

    def _lacks(self, capability: str) -> BackboneError:
        return BackboneError(f"{self.spec} has no {CAPABILITIES[capability]}")

    @property
    def pretrained(self) -> bool:
        return not self.weights.startswith("random init")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("pet.")}

    def num_backbone_params(self) -> int:
        return sum(p.numel() for p in self.backbone_parameters().values())

    def head_parameters(self) -> list[nn.Parameter]:
        """The task heads a method may tune besides its own parameters (Aurora's `heads`)."""
        return list(self.towers["vision"].output_parameters)

    def patch_grid(self) -> tuple[int, int, int]:
        """(rows, cols, prefix): vision tokens are `prefix` tokens ([CLS]) then rows × cols patches."""
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def cut_by_tokenizer(self, texts: list[str]) -> list[bool]:
        """Whether each text fills the tokenizer's whole context, i.e. was (or may have been) cut to fit."""
        tokens = self.tokenize(texts)
        return ((tokens != self.pad_id).sum(dim=1) >= tokens.shape[1]).tolist()

    def run_towers(self, pixels: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> None:
        """One forward pass through the towers a picture and a text go through (for gate readouts)."""
        if pixels is not None:
            self.encode_image(pixels)
        if tokens is not None:
            self.encode_text(tokens)

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    # --- Optional parts: a backbone without the capability refuses them clearly ---

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, d) vision tokens for heads that attend to them ("image_tokens")."""
        raise self._lacks("image_tokens")

    def embed_image_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """The image embedding from its vision tokens ("matching")."""
        raise self._lacks("matching")

    def text_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unimodal text [CLS] ("matching")."""
        raise self._lacks("matching")

    def embed_text_cls(self, text_cls: torch.Tensor) -> torch.Tensor:
        """The text embedding from its unimodal [CLS] ("matching")."""
        raise self._lacks("matching")

    def fused_cls(self, image_tokens: torch.Tensor, tokens: torch.Tensor,
                  pictures: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The multimodal [CLS] of paired image tokens and texts, of one picture's tokens (1, N, d)
        with every text, or with `pictures` of text i and image_tokens[pictures[i]] ("matching")."""
        raise self._lacks("matching")

    def match_logits(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits (no match, match) from fused [CLS] vectors ("matching")."""
        raise self._lacks("matching")

    def encode_question(self, image_tokens: torch.Tensor, questions: torch.Tensor):
        """(question states, their mask): the questions read against their pictures' tokens, paired
        row by row or one picture's (1, N, d) for every question ("answer_generation")."""
        raise self._lacks("answer_generation")

    def answer_loss(self, image_tokens: torch.Tensor, questions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of the answers ("answer_generation")."""
        raise self._lacks("answer_generation")

    def answer_log_likelihoods(self, image_tokens: torch.Tensor, questions: torch.Tensor,
                               answers: torch.Tensor) -> torch.Tensor:
        """(B,) log-probability of each answer, its image tokens and question paired row by row or
        one of each for every answer ("answer_generation")."""
        raise self._lacks("answer_generation")

    def generate_answers(self, image_tokens: torch.Tensor, questions: torch.Tensor) -> list[str]:
        """The decoder's own answer to each question, its image tokens paired row by row or one
        picture's for every question ("answer_generation")."""
        raise self._lacks("answer_generation")

    def describe(self) -> str:
        return f"{self.spec} — {self.weights}"
