"""Few-shot sampling of training items."""
from __future__ import annotations

import random
from typing import Optional

from core.data.reader import Item


def few_shot(items: list[Item], shots: Optional[int], seed: int) -> list[Item]:
    """K items (each with all its captions) drawn by seed, in dataset order; all when shots is None."""
    if shots is None or shots >= len(items):
        return list(items)
    if shots < 1:
        raise ValueError(f"--shots must be at least 1, got {shots}")
    chosen = set(random.Random(seed).sample(range(len(items)), shots))
    return [item for i, item in enumerate(items) if i in chosen]
