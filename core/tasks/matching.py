"""Re-ranking by a matching head (BLIP's ITM), as BLIP evaluates retrieval: a query's top
candidates by embedding similarity are re-scored by match logit + similarity, and every other
candidate is placed below them. Retrieval's evaluation and the Ask tab's searches share it."""
from __future__ import annotations

from typing import Callable

import torch

from core.backbones import Backbone

RERANK_TOP = 16     # candidates per query that a matching head re-scores
BELOW = -100.0     # the score of the candidates it does not re-score: below every re-scored one


def match_scores(backbone: Backbone, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Match logits (float, on CPU) of paired rows of vision tokens and tokenized texts, or of one
    picture's vision tokens (1, N, d) with every text."""
    fused = backbone.fused_cls(image_tokens, tokens.to(backbone.device))
    return backbone.match_logits(fused)[:, 1].float().cpu()


def rerank(scores: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One query's `scores` (its similarity to each candidate) with the top k re-scored as
    `score_pairs(top)` (the match logits of those candidates, in that order) + similarity."""
    top = scores.topk(min(k, len(scores))).indices
    rescored = torch.full_like(scores, BELOW)
    rescored[top] = score_pairs(top) + scores[top]
    return rescored
