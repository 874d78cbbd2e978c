"""`python -m core bench`: the frozen forward and one training step of every method, side by side
on the same batch in one process, with PEFT's LoRA as an independent peer. Medians after warm-up.

Peak memory is the rise of the process's peak resident set during the steps (Linux VmHWM,
reset before each measurement) on CPU, and torch's peak allocation on CUDA.
"""
from __future__ import annotations

import gc
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from core.backbones import BackboneError, load_backbone
from core.data.shapes import COLOURS, SHAPES, draw_shape
from core.pet import METHODS, attach, default_lr
from core.tasks import retrieval
from core.trainer import TrainSettings, make_optimizer, pick_device

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_mb(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per call, peak extra MB) over `steps` calls after two warm-up calls."""
    for _ in range(2):
        step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        base = _rss_mb("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb("VmHWM") - base
    return statistics.median(times), max(peak, 0.0)


def _batch(backbone, size: int) -> retrieval.RetrievalSet:
    rng = random.Random(0)
    pairs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(size)]
    pixels = torch.stack([backbone.image_transform(draw_shape(c, s, rng)) for c, s in pairs])
    tokens = backbone.tokenize([f"a picture of a {c} {s}" for c, s in pairs])
    return retrieval.RetrievalSet(pixels, tokens, torch.arange(size))


def _training_step(objective, params, lr: float) -> Callable[[], None]:
    optimizer = make_optimizer(params, TrainSettings(lr=lr))
    ids = torch.arange(len(objective.data))

    def step() -> None:
        loss = objective(ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _peft_lora_step(model_name: str, data: retrieval.RetrievalSet, device: torch.device, lr: float):
    import open_clip
    from peft import LoraConfig, get_peft_model

    model = open_clip.create_model(model_name).to(device)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["attn"]))
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(params, TrainSettings(lr=lr))
    peft_model.train()

    def step() -> None:
        image = model.encode_image(data.pixels.to(device))
        text = model.encode_text(data.tokens.to(device))
        loss = retrieval.contrastive_loss(image, text, data.caption_image.to(device), model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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


def bench(model: str, batch: int = 32, steps: int = 5, methods: list[str] | None = None) -> dict[str, Any]:
    device = pick_device()
    backbone = load_backbone(model, seed=0).to(device)
    if "retrieval" not in backbone.tasks:
        raise BackboneError(f"bench times retrieval training steps; {model} serves {', '.join(backbone.tasks)} only")
    frozen = {n: p.detach().clone() for n, p in backbone.backbone_parameters().items()}
    data = _batch(backbone, batch)

    def forward() -> None:
        with torch.no_grad():
            backbone.encode_image(data.pixels.to(device))
            backbone.encode_text(data.tokens.to(device))

    forward_s, _ = _measure(forward, steps, device)
    results: dict[str, Any] = {}
    for label, method, options in _variants(methods or [m for m in METHODS if m != "zero_shot"]):
        torch.manual_seed(0)
        handle = attach(backbone, method, options)
        objective = retrieval.RetrievalObjective(backbone, data).train()
        step_s, peak = _measure(_training_step(objective, handle.trainable_parameters(), default_lr(method)),
                                steps, device)
        results[label] = {"step_s": step_s, "step_over_forward": step_s / forward_s,
                           "peak_mem_mb": peak, "trainable_params": handle.num_trainable()}
        handle.detach()
        backbone.eval()
        with torch.no_grad():  # undo what BitFit / linear probe / full fine-tuning changed, gradients too
            for name, p in backbone.backbone_parameters().items():
                p.copy_(frozen[name])
                p.grad = None
        gc.collect()
    peers = {}
    if backbone.family == "openclip":
        step, n_params = _peft_lora_step(backbone.name, data, device, default_lr("lora"))
        step_s, peak = _measure(step, steps, device)
        peers["peft_lora"] = {"step_s": step_s, "step_over_forward": step_s / forward_s,
                              "peak_mem_mb": peak, "trainable_params": n_params}
    return {"model": model, "batch": batch, "device": device.type, "threads": torch.get_num_threads(),
            "forward_s": forward_s, "methods": results, "peers": peers}
