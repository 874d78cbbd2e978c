"""A tuned run in its library's own format, for use without PET Studio: the method's deltas
folded into the backbone's weights (LoRA, Aurora without GQT) or the tuned backbone weights
themselves (BitFit, linear probe, full fine-tuning), written as an open_clip checkpoint that
`open_clip.create_model_and_transforms(NAME, pretrained=FILE)` loads, or as a transformers
`save_pretrained` folder that `BlipForImageTextRetrieval` / `BlipForQuestionAnswering` load,
with a model card (README.md in the Hub's format)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import open_clip
import torch
from safetensors.torch import save_file

from core.backbones import WeightsBudget
from core.backbones.openclip import CONFIGS
from core.checkpoint import package_versions
from core.markdown import plain
from core.result import RunResult
from core.runs import RunError, load_run
from core.tasks import metric_label

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class ExportError(RunError):
    """A run that cannot be exported as asked, with what to do instead."""


def export(model: str, pet: str | Path, out: str | Path, local_paths: bool = True,
           budget: Optional[WeightsBudget] = None) -> dict:
    """Fold the run at `pet` into `model`'s weights and write them into the new folder `out`
    (without `local_paths` the run's backbone may not name a server path: an uploaded run; with a
    `budget`, its weights may take no more memory than that)."""
    out = Path(out)
    backbone, handle, info = load_run(model, pet, local_paths=local_paths, device=torch.device("cpu"), budget=budget)
    if not handle.foldable:
        raise ExportError(f"{info.method}{' with gated query transformation' if info.config.get('gqt') else ''} "
                          f"adds computation that is not a weight of {info.backbone} (gates, adapters, prompts), so "
                          f"it cannot be folded into the backbone: load the run with PET Studio instead — "
                          f"core.runs.load_run('{info.backbone}', RUN) in Python, or python -m core eval")
    if handle.mergeable:
        handle.merge()
    # finite weights can fold into infinite ones (a huge scale times huge factors): a broken model is not exported
    broken = next((name for name, p in backbone.backbone_parameters().items() if not torch.isfinite(p).all()), None)
    if broken:
        raise ExportError(f"{info.method} folded into {info.backbone} gives non-finite weights ({broken}); "
                          f"nothing was written")
    try:
        out.mkdir(parents=True, exist_ok=False)
    except OSError as error:
        raise ExportError(f"{str(out)[:200]}: choose a new folder to export into ({error})") from error
    if backbone.family == "openclip":
        name = backbone.name
        save_file({k: v.detach().contiguous() for k, v in backbone.open_clip_state_dict().items()},
                  str(out / OPEN_CLIP_WEIGHTS))
        files = [OPEN_CLIP_WEIGHTS]
        if name not in _library_models():   # PET Studio's own architectures: their config beside the weights
            shutil.copyfile(CONFIGS / f"{name}.json", out / f"{name}.json")
            files.append(f"{name}.json")
        library, usage = "open_clip", _open_clip_usage(name, name not in _library_models())
    else:
        backbone.model.save_pretrained(out)
        backbone.processor.save_pretrained(out)
        files = sorted(p.name for p in out.iterdir())
        loader = type(backbone.model).__name__
        library, usage = "transformers", f"from transformers import {loader}, BlipProcessor\n" \
                                         f"model = {loader}.from_pretrained(\"FOLDER\")\n" \
                                         f"processor = BlipProcessor.from_pretrained(\"FOLDER\")"
    (out / "README.md").write_text(model_card(info, library, usage), encoding="utf-8")
    return {"out": str(out), "library": library, "files": [*files, "README.md"], "method": info.method,
            "backbone": info.backbone}


def _library_models() -> set[str]:
    """The architectures open_clip knows without PET Studio's configs."""
    return {m for m in open_clip.list_models() if not (CONFIGS / f"{m}.json").is_file()}


def _open_clip_usage(name: str, own_config: bool) -> str:
    config = f"open_clip.add_model_config(\"FOLDER/{name}.json\")   # PET Studio's architecture\n" if own_config else ""
    return (f"import open_clip\n{config}model, _, preprocess = open_clip.create_model_and_transforms(\n"
            f"    \"{name}\", pretrained=\"FOLDER/{OPEN_CLIP_WEIGHTS}\")\ntokenizer = open_clip.get_tokenizer(\"{name}\")")


def model_card(info: RunResult, library: str, usage: str) -> str:
    """The exported model's README.md: Hub metadata, then base model, method, budget, data, metrics."""
    rows = "\n".join(f"| {metric_label(k)} | {info.zero_shot[k]:.1f} | {v:.1f} |" for k, v in (info.tuned or {}).items())
    # every text run.json held shows as itself, on one line (core.markdown)
    options = plain(", ".join(f"{k}={v}" for k, v in info.config.items()) or "defaults")
    dataset = info.dataset
    # what the run's own card says beside its numbers (a restart, a result below zero-shot) goes with it
    said = [f"**⚠ {info.unsaid_warning}**" if info.unsaid_warning else "",
            f"**{info.note_label}** {plain(info.note)}" if info.note else ""]
    warning = "".join(f"\n{line}\n" for line in said if line)
    return f"""---
library_name: {library}
tags:
- pet-studio
- {info.method}
- parameter-efficient-fine-tuning
---

# {info.method} on {info.backbone}, folded

Made with PET Studio: the run's PET parameters were folded into the backbone's weights, so this
model runs with {library} alone, at the backbone's own cost.

- **Base model**: {plain(info.backbone)} — {plain(info.backbone_weights)}
- **Method**: {info.method} ({options}); trained {info.trainable_params:,} of {info.backbone_params:,} parameters
  ({info.trainable_pct:.4g}%), groups {plain(json.dumps(info.groups))}
- **Data**: dataset fingerprint {plain(dataset.fingerprint) if dataset else 'unknown'}, {dataset.train_used if dataset else '?'}
  training items; task {info.task}; seed {info.seed}
- **Made by**: PET Studio with {json.dumps(package_versions())}

## Metrics (the run's test split)
{warning}
| metric | zero-shot | tuned |
|---|---:|---:|
{rows}

## Use

```python
{usage}
```
"""
