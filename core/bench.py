"""`python -m core bench`: what users feel, on one batch in one process. The reference is the
naive open_clip forward (the library's own model, fp32, text padded to its context length); then
our frozen forward and one training step of every method at the chosen precision (auto: bf16
where the hardware computes it natively), PEFT's LoRA as an independent peer, and an end-to-end
16-shot `tune`. Medians after warm-up.

Times are measured first, with the allocator as users have it. Peak memory is measured after,
in a second pass: the rise of the process's peak resident set (Linux VmHWM, reset before each
measurement) with glibc's mmap threshold then fixed so freed tensors go back to the system, and
the heap's free pages given back before each measurement (which slows steps, hence the separate
pass); on CUDA, torch's peak allocation.
"""
from __future__ import annotations

import gc
import random
import tempfile
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from core import heap
from core.backbones import BackboneError, load_backbone
from core.data.shapes import COLOURS, SHAPES, draw_shape
from core.pet import METHODS, attach, default_lr
from core.tasks import retrieval
from core.trainer import (LowPrecisionWeights, TrainSettings, autocast, autocast_for, make_optimizer, optimizer_step,
                          pick_device)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_mb(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Median seconds per call over `steps` calls after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(step: Callable[[], None], device: torch.device) -> Optional[float]:
    """The memory one call adds at its peak, after a warm-up call; None on a CPU where it cannot be
    read (no /proc, or a C library other than glibc, which would keep the freed blocks that hide it)."""
    if device.type != "cuda" and (heap.glibc() is None or not _CLEAR_REFS.exists()):
        return None
    step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        heap.trim()
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        base = _rss_mb("VmRSS")
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return max((torch.cuda.max_memory_allocated() - base) / 2**20, 0.0)
    return max(_rss_mb("VmHWM") - base, 0.0)


def _batch(backbone, size: int) -> retrieval.RetrievalSet:
    rng = random.Random(0)
    pairs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(size)]
    pixels = torch.stack([backbone.image_transform(draw_shape(c, s, rng)) for c, s in pairs])
    tokens = backbone.tokenize([f"a picture of a {c} {s}" for c, s in pairs])
    return retrieval.RetrievalSet(pixels, tokens, torch.arange(size))


def _training_step(objective, params, lr: float, amp: Optional[str]) -> Callable[[], None]:
    optimizer = make_optimizer(params, TrainSettings(lr=lr))
    ids = torch.arange(len(objective.data))
    device = next(iter(params.values())).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    low_precision = LowPrecisionWeights(objective, amp)   # as training has it: frozen weights cast once

    def step() -> None:
        with low_precision:
            with autocast(device, amp):
                loss = objective(ids)
            optimizer_step(loss, optimizer, scaler, params, TrainSettings.grad_clip)   # training's own step

    return step


def _naive_model(backbone, device: torch.device):
    """open_clip's own model for the backbone's architecture (random init: only its speed matters)."""
    import open_clip

    return open_clip.create_model(backbone.name).to(device).eval()


def _naive_forward(model, data: retrieval.RetrievalSet, device: torch.device) -> Callable[[], None]:
    """The library's forward as users call it: fp32, text padded to the full context length."""
    def forward() -> None:
        with torch.no_grad():
            model.encode_image(data.pixels.to(device))
            model.encode_text(data.tokens.to(device))

    return forward


def _peft_lora_step(model, data: retrieval.RetrievalSet, device: torch.device, lr: float, amp: Optional[str]):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["attn"]))
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(params, TrainSettings(lr=lr))
    peft_model.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step() -> None:
        with autocast(device, amp):
            image = model.encode_image(data.pixels.to(device))
            text = model.encode_text(data.tokens.to(device))
            loss = retrieval.contrastive_loss(retrieval.cosine_matrix(image, text), data.caption_image.to(device),
                                              model.logit_scale)
        optimizer_step(loss, optimizer, scaler, params, TrainSettings.grad_clip)   # as ours: clipped alike

    return step, sum(p.numel() for p in params.values())


def _variants(methods: list[str]) -> list[tuple[str, str, dict]]:
    """(label, method, options): VL-PET is measured at each of its four granularities."""
    from core.pet.vlpet import GRANULARITIES

    variants = []
    for method in methods:
        if method == "vlpet":
            variants += [(f"vlpet_{g}", "vlpet", {"granularity": g}) for g in GRANULARITIES]
        else:
            variants.append((method, method, {}))
    return variants


def _method_steps(backbone, data, variants, amp: Optional[str]) -> Iterator[tuple[str, Any, Callable[[], None]]]:
    """(label, handle, training step) for each variant, attached in turn; afterwards the backbone is
    as it was (what BitFit, the linear probe and full fine-tuning changed is put back, gradients too)."""
    frozen = {n: p.detach().clone() for n, p in backbone.backbone_parameters().items()}
    for label, method, options in variants:
        torch.manual_seed(0)
        handle = attach(backbone, method, options)
        objective = retrieval.RetrievalObjective(backbone, data).train()
        yield label, handle, _training_step(objective, handle.trainable_parameters(), default_lr(method), amp)
        handle.detach()
        backbone.eval()
        with torch.no_grad():
            for name, p in backbone.backbone_parameters().items():
                p.copy_(frozen[name])
                p.grad = None
        gc.collect()


def _e2e_seconds(model: str, precision: str) -> tuple[float, float]:
    """(seconds, of which the range test's) of an end-to-end 16-shot Aurora `tune` (32 captions, 10
    epochs of batch 16, `--lr auto`'s range test, zero-shot and tuned scoring of 16 test scenes
    included), as a user runs it."""
    from core import world
    from core.runs import tune

    with tempfile.TemporaryDirectory(prefix="petstudio-bench-") as folder:
        data = world.write_part(Path(folder) / "data", "novel-colours", items=64)
        started = time.perf_counter()
        result = tune(model, data, "aurora", shots=16, epochs=10, batch_size=16, precision=precision,
                      out=Path(folder) / "run")
        return time.perf_counter() - started, result.train.lr_choice.seconds


def bench(model: str, batch: int = 32, steps: int = 5, methods: list[str] | None = None, precision: str = "auto",
          e2e: bool = True) -> dict[str, Any]:
    device = pick_device()
    amp = autocast_for(precision, device)
    backbone = load_backbone(model, seed=0).to(device)
    if "retrieval" not in backbone.tasks:
        raise BackboneError(f"bench times retrieval training steps; {model} serves {', '.join(backbone.tasks)} only")
    data = _batch(backbone, batch)
    variants = _variants(methods or [m for m in METHODS if m != "zero_shot"])

    def forward() -> None:
        with torch.no_grad(), autocast(device, amp):
            backbone.encode_image(data.pixels.to(device))
            backbone.encode_text(data.tokens.to(device))

    naive = _naive_model(backbone, device) if backbone.family == "openclip" else None
    naive_s = _time(_naive_forward(naive, data, device), steps, device) if naive is not None else None
    forward_s = _time(forward, steps, device)
    results: dict[str, Any] = {}
    for label, handle, step in _method_steps(backbone, data, variants, amp):
        step_s = _time(step, steps, device)
        results[label] = {"step_s": step_s, "step_over_forward": step_s / forward_s,
                          "step_over_naive": step_s / naive_s if naive_s else None,
                          "trainable_params": handle.num_trainable()}
    peers, peer_step = {}, None
    if naive is not None:
        peer_step, n_params = _peft_lora_step(naive, data, device, default_lr("lora"), amp)
        step_s = _time(peer_step, steps, device)
        peers["peft_lora"] = {"step_s": step_s, "step_over_forward": step_s / forward_s,
                              "step_over_naive": step_s / naive_s, "trainable_params": n_params}
    e2e_s, range_test_s = _e2e_seconds(model, precision) if e2e else (None, None)
    # Memory last: returning freed memory to the system slows every step after it.
    if device.type == "cpu":
        heap.return_large_blocks_on_free()
    for label, _, step in _method_steps(backbone, data, variants, amp):
        results[label]["peak_mem_mb"] = _peak_mb(step, device)
    if peer_step is not None:
        peers["peft_lora"]["peak_mem_mb"] = _peak_mb(peer_step, device)
    return {"model": model, "batch": batch, "device": device.type, "threads": torch.get_num_threads(),
            "precision": amp or "fp32", "asked_precision": precision,
            "naive_forward_s": naive_s, "forward_s": forward_s,
            "forward_over_naive": forward_s / naive_s if naive_s else None, "methods": results, "peers": peers,
            "e2e_s": e2e_s, "e2e_over_naive": e2e_s / naive_s if e2e_s and naive_s else None,
            "e2e_range_test_s": range_test_s, "range_test_share_of_e2e": range_test_s / e2e_s if e2e_s else None}


def _clustered_unit_vectors(generator: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """Unit vectors drawn around `centres` (cosine ≈ 0.6 to their centre), as embeddings of a real
    collection crowd around its subjects; uniform random vectors have no neighbours worth finding."""
    picked = centres[generator.integers(0, len(centres), count)]
    vectors = picked + generator.standard_normal(picked.shape).astype(np.float32) * (1.3 / np.sqrt(centres.shape[1]))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bench_index(items: int = 100_000, dim: int = 512, queries: int = 200, subjects: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """One query at a time against `items` unit vectors: exact search (FAISS flat, and a torch
    matmul with top-k as the check) and the approximate index `python -m core index` builds above
    its exact size, with its recall@10 against exact search. Milliseconds are medians."""
    from core.vector_index import VectorIndex, recall_at

    generator = np.random.default_rng(seed)
    centres = generator.standard_normal((subjects, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = _clustered_unit_vectors(generator, centres, items)
    asked = _clustered_unit_vectors(generator, centres, queries)

    def p50_ms(search: Callable[[np.ndarray], Any]) -> float:
        search(asked[:1])
        times = []
        for row in range(queries):
            start = time.perf_counter()
            search(asked[row:row + 1])
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    exact = VectorIndex.build(vectors, exact_up_to=items)
    matrix = torch.from_numpy(vectors)
    started = time.perf_counter()
    approximate = VectorIndex.build(vectors, exact_up_to=0, seed=seed)
    build_s = time.perf_counter() - started
    truth = exact.search(asked, 10)[1]
    return {"items": items, "dim": dim, "queries": queries, "threads": torch.get_num_threads(),
            "vectors": f"unit vectors around {subjects} random subjects (cosine about 0.6 to their subject)",
            "exact": {"index": "faiss flat (inner product)", "p50_ms": p50_ms(lambda q: exact.search(q, 10))},
            "torch_matmul_p50_ms": p50_ms(lambda q: (matrix @ torch.from_numpy(q)[0]).topk(10)),
            "approximate": {"index": f"faiss IVF, {approximate.info.lists} lists, {approximate.info.probes} probed",
                            "lists": approximate.info.lists, "probes": approximate.info.probes,
                            "build_s": build_s, "p50_ms": p50_ms(lambda q: approximate.search(q, 10)),
                            "recall_at_10": recall_at(10, approximate.search(asked, 10)[1], truth)}}
