"""Nearest unit vectors by inner product (cosine similarity), through FAISS: exact search up to
`EXACT_UP_TO` items, an inverted-file index (IVF) above it whose number of probed lists is set,
when it is built, to the fewest that reach `RECALL_TARGET` against exact search. The Ask tab's
galleries and `python -m core search` over an indexed folder both search through here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import torch

# Exact search over 100,000 vectors of 512 costs about 12 ms a query on 2 cores; below 50,000 it
# stays under 6 ms, and an approximate index would only add a build and a recall below 1.
EXACT_UP_TO = 50_000
MIN_IVF_ITEMS = 16   # an IVF index clusters into 4·√n lists, which needs at least as many points: n ≥ 16
RECALL_TARGET = 0.95      # recall@10 against exact search
_CALIBRATION_QUERIES = 200
_TRAINING_POINTS_PER_LIST = 40   # k-means on a sample; FAISS wants at least 39 a list


class VectorIndexError(ValueError):
    """Vectors that cannot be searched (not finite, wrong shape), with a message for the user."""


def _as_rows(vectors: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    rows = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else vectors
    rows = np.ascontiguousarray(np.atleast_2d(rows), dtype=np.float32)
    if rows.ndim != 2:
        raise VectorIndexError(f"{what} must be a matrix of vectors, not shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise VectorIndexError(f"{what} are not finite numbers (NaN or infinite): the model that made them is "
                               f"broken, so nothing is ranked")
    return rows


@dataclass
class IndexInfo:
    kind: str                      # "exact" (FAISS flat) or "ivf"
    items: int
    dim: int
    lists: Optional[int] = None    # IVF: how many lists the vectors are clustered into
    probes: Optional[int] = None   # IVF: how many of them a query scans
    recall_at_10: Optional[float] = None   # IVF: measured when it was built, on its own vectors


class VectorIndex:
    def __init__(self, index: faiss.Index, info: IndexInfo):
        self.index, self.info = index, info

    @classmethod
    def build(cls, vectors: np.ndarray | torch.Tensor, exact_up_to: int = EXACT_UP_TO, seed: int = 0) -> "VectorIndex":
        rows = _as_rows(vectors, "the vectors to index")
        items, dim = rows.shape
        if items <= max(exact_up_to, MIN_IVF_ITEMS - 1):
            index = faiss.IndexFlatIP(dim)
            index.add(rows)
            return cls(index, IndexInfo("exact", items, dim))
        lists = int(4 * math.sqrt(items))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        generator = np.random.default_rng(seed)
        sample = rows[generator.choice(items, min(items, lists * _TRAINING_POINTS_PER_LIST), replace=False)]
        index.cp.seed = seed
        index.train(sample)
        index.add(rows)
        probes, recall = _calibrate(index, rows, generator)
        index.nprobe = probes
        return cls(index, IndexInfo("ivf", items, dim, lists, probes, recall))

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (queries, min(k, items)), best first."""
        rows = _as_rows(queries, "the query's embeddings")
        if rows.shape[1] != self.info.dim:
            raise VectorIndexError(f"the query has {rows.shape[1]} dimensions, the index {self.info.dim}")
        scores, ids = self.index.search(rows, min(k, self.info.items))
        return scores, ids

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, info: IndexInfo) -> "VectorIndex":
        index = faiss.read_index(str(path))
        if index.ntotal != info.items or index.d != info.dim:
            raise VectorIndexError(f"{path}: holds {index.ntotal} vectors of {index.d}, its record says "
                                   f"{info.items} of {info.dim}: index the folder again")
        if info.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = info.probes
        return cls(index, info)


def recall_at(k: int, found: np.ndarray, truth: np.ndarray) -> float:
    """The share of each query's true k nearest that were found, averaged over queries."""
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def _calibrate(index: faiss.IndexIVFFlat, rows: np.ndarray, generator: np.random.Generator) -> tuple[int, float]:
    """The fewest probes (doubling) whose recall@10 reaches the target, on indexed vectors used as
    queries (each one's own row left out of both rankings, so it gives nothing away)."""
    picked = generator.choice(len(rows), min(len(rows), _CALIBRATION_QUERIES), replace=False)
    exact = faiss.IndexFlatIP(rows.shape[1])
    exact.add(rows)
    truth = _without_self(exact.search(rows[picked], 11)[1], picked)
    probes = 1
    while True:
        index.nprobe = probes
        recall = recall_at(10, _without_self(index.search(rows[picked], 11)[1], picked), truth)
        if recall >= RECALL_TARGET or probes >= index.nlist:
            return probes, recall
        probes = min(index.nlist, probes * 2)


def _without_self(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
    return np.stack([row[row != me][:10] for row, me in zip(ids, own)])
