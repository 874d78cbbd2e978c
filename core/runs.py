"""A tuning run end to end — data, backbone, zero-shot score, tuning, tuned score, checkpoint —
and re-evaluating a saved run. The CLI and the app both go through here."""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, MutableMapping, Optional

import numpy as np
import torch

from core import checkpoint, lr_range
from core.backbones import OFFLINE, Backbone, BackboneError, WeightsBudget, load_backbone
from core.data import DEFAULT_LIMITS, Dataset, DatasetError, few_shot, read_dataset
from core.data.media import DEFAULT_FRAMES
from core.distributed import is_main_process, rank_and_world
from core.pet import PetError, PetHandle, attach, config_to_dict, default_lr, get_method, make_config
from core.pet.recipes import Setting, check_recipe, recipe_for
from core.result import (BELOW_ZERO_SHOT, COLLAPSED, LR_RANGE, MAX_FRAMES, MAX_SEED, DatasetSummary, LrChoice,
                         MediaSpread, Restart, RunResult, TrainSummary, ends_below_zero_shot)
from core.tasks import Task, TaskError, check_metrics, get_task, headline_metric, metric_label
from core.tasks.encoding import encode_test_media, media_spread
from core.trainer import (PRECISIONS, Progress, TrainingDiverged, TrainSettings, autocast_for, pick_device,
                          restart_note, train)


class RunError(ValueError):
    """A run that cannot start as asked, with a message meant for the user."""


# Failures whose message is meant for the user as it is (the CLI prints it, the app shows it).
USER_ERRORS = (BackboneError, checkpoint.CheckpointError, DatasetError, PetError, RunError, TaskError,
               TrainingDiverged)


# The small offline model barely moves in a few steps at the per-method rates, which suit large
# pretrained models. Its model card measures every method at these rates (16 shots, 15 epochs):
# BitFit sits at zero-shot at 1e-2 and a linear probe learns best at 3e-3.
OFFLINE_LR = 1e-2
OFFLINE_LRS = {"full": 1e-4, "bitfit": 2e-2, "linear_probe": 3e-3}


AUTO = "auto"   # the learning rate found by a range test on the training data (core.lr_range)


def suggested_lr(model: str, method: str) -> float:
    """A fixed learning rate for `method` on `model`: what `--lr auto` keeps when its range test
    says nothing (the loss never fell, or a cancel or the deadline stopped it); a model that starts
    worse than chance and whose loss never fell 10% below chance's takes three times it instead, unless
    that rate blew up in the test (core.lr_range.above_suggested)."""
    if model == OFFLINE:
        return OFFLINE_LRS.get(method, OFFLINE_LR)
    return default_lr(method)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_run_folder(method: str) -> Path:
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{method}"


def _items(task: Task, dataset: Dataset, split: str) -> list:
    return [item for item in dataset.split(split) if task.usable(item)]


def _test_set(task: Task, backbone: Backbone, dataset: Dataset):
    test = _items(task, dataset, "test")
    if not test:
        raise RunError(f"{dataset.manifest}: the dataset has no test items for {task.name} to evaluate on "
                       f"(it needs at least two media files, or rows with split=test)")
    return task.prepare(backbone, test)


@contextmanager
def _merged(handle: PetHandle) -> Iterator[None]:
    """Methods linear in the weights merged for the block, so inference costs nothing extra."""
    if not handle.mergeable:
        yield
        return
    handle.merge()
    try:
        yield
    finally:
        handle.unmerge()


def _kept_scores(cache: MutableMapping[tuple, dict], key: tuple, task: Task) -> Optional[dict[str, float]]:
    """The zero-shot scores kept for `key`; None where none are, or the ones kept are not the task's
    metrics with values a score takes (they are scored again)."""
    kept = cache.get(key)
    try:
        if not isinstance(kept, dict) or set(kept) != set(task.metric_keys):
            return None
        check_metrics(task.name, kept)
    except (TaskError, TypeError):
        return None
    return kept


def _kept_spread(cache: MutableMapping[tuple, dict], key: tuple) -> Optional[float]:
    """The untuned model's `_spread`, kept in the zero-shot cache beside its scores; None where none
    is, or the one kept is out of media_spread's range (it is measured again)."""
    kept = (cache.get(key) or {}).get("spread")
    return float(kept) if isinstance(kept, (int, float)) and not isinstance(kept, bool) and 0 <= kept <= 2 else None


def score(task: Task, handle: PetHandle, test_set) -> dict[str, float]:
    """Test metrics, through the merged weights where the method merges."""
    with _merged(handle):
        return task.evaluate(handle.backbone, test_set)


def _spread(embeddings: torch.Tensor) -> Optional[float]:
    """The media_spread of the test media's `EncodedMedia.embeddings`; None where it is not finite
    (a broken model says so by its scores)."""
    spread = media_spread(embeddings)
    return spread if math.isfinite(spread) else None


def tune(model: str, data: str | Path, method: str, options: Optional[dict[str, Any]] = None,
         shots: Optional[int] = None, epochs: int = 5, lr: float | str = AUTO, batch_size: int = 32,
         seed: int = 0, out: Optional[str | Path] = None, precision: str = "auto", task: str = "retrieval",
         extra_answers: tuple[str, ...] = (), frames: int = DEFAULT_FRAMES,
         progress: Optional[Callable[[Progress], None]] = None,
         cancel: Optional[Callable[[], bool]] = None, epoch_metrics: bool = False,
         local_paths: bool = True, zero_shot_cache: Optional[MutableMapping[tuple, dict]] = None,
         recipe: str = "studio", deadline: Optional[float] = None,
         lr_cache: Optional[MutableMapping[tuple, LrChoice]] = None,
         budget: Optional[WeightsBudget] = None) -> RunResult:
    """Tune `method` on `model` with the training split of `data`; score the test split before and after.

    `lr` is a number, used as given, or "auto": the authors' recipe's rate where it names one,
    else a range test on the training data (core.lr_range) chooses it, sized to 15% of the run's
    training where a useful test fits in that (`lr_cache` keeps choices across runs: a run on the same backbone, method, options,
    data, seed and training shape reuses one); run.json's train.lr_choice says what it chose and why.

    `recipe` (core.pet.recipes) is whose settings the run starts from: `studio` (the method's
    defaults) or `authors` (what the method's authors ran for this backbone, task and media);
    `options` and `lr` given here win over the recipe's.

    `precision` is the training's: auto (bf16 autocast where the hardware computes bf16 natively,
    fp32 elsewhere), fp32 or bf16; scores are computed in fp32. `task` is retrieval or vqa;
    `extra_answers` adds VQA candidate answers to the dataset's own; video datasets are read at `frames` uniformly sampled frames per clip. With `epoch_metrics`
    the test split is also scored after every epoch (result.train.epoch_metrics). Without
    `local_paths` the model may not name a file or folder (a spec from a remote client), and
    with a `budget` its weights may take no more memory than that (checked as it loads).
    A run that fails leaves nothing behind: the run folder is removed if it made it, emptied if
    it was given an empty one. `zero_shot_cache` keeps zero-shot scores across runs: a run on the
    same backbone weights, dataset, task, frames and answers reuses them instead of scoring again.
    Under torchrun / accelerate every process runs this; only the first writes the run folder (the
    others read the data in a scratch folder of their own). At `deadline` (a time.monotonic()
    value: a GPU grant's end less the time to score and save) training stops, and the run is
    scored and saved as far as it got, its note saying so."""
    started = time.perf_counter()
    make_config(method, options)   # the user's options, checked before anything is read
    check_recipe(recipe)
    check_settings(shots=shots, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, frames=frames,
                   extra_answers=extra_answers)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise RunError(f"precision must be one of {', '.join(PRECISIONS)}, not {str(precision)[:20]!r}")
    out = Path(out) if out is not None else default_run_folder(method)
    arguments = (started, model, data, method, options or {}, recipe, shots, epochs, lr, batch_size, seed, precision, task, extra_answers,
                 frames, progress, cancel, epoch_metrics, local_paths, zero_shot_cache, deadline, lr_cache, budget)
    if not is_main_process():
        with tempfile.TemporaryDirectory(prefix="petstudio-process-") as scratch:
            return _tune(*arguments, workdir=Path(scratch), out=out, save=False)
    created = _claim_run_folder(out)
    try:
        return _tune(*arguments, workdir=out, out=out, save=True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for entry in out.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise


# The training settings a run accepts: (type, lowest, highest); None for shots means all, AUTO for lr a range test.
SETTINGS = {"shots": (int, 1, 1_000_000), "epochs": (int, 0, 10_000), "lr": (float, *LR_RANGE),
            "batch_size": (int, 1, 4096), "seed": (int, 0, MAX_SEED), "frames": (int, 1, MAX_FRAMES)}


def check_settings(extra_answers=(), **settings) -> None:
    """Refuse a training setting out of SETTINGS' range (a RunError naming it): for tune, and for a
    caller that must refuse before it claims folders or a device (a sweep, the app)."""
    for name, value in settings.items():
        kind, low, high = SETTINGS[name]
        if (name == "shots" and value is None) or (name == "lr" and value == AUTO):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                or not low <= value <= high:   # a learning rate of 0 would train nothing and say it had
            raise RunError(f"{name.replace('_', '-')} must be a {'number' if kind is float else 'whole number'} "
                           f"from {low} to {high}, not {value!r:.40}")
    if not isinstance(extra_answers, (list, tuple)) or len(extra_answers) > 1000 or not all(
            isinstance(a, str) and len(a) <= 200 for a in extra_answers):
        raise RunError("extra answers must be at most 1000 texts of at most 200 characters")


def _claim_run_folder(out: Path) -> bool:
    """Make `out`, or accept an empty one (leftovers of a killed save count as empty and go);
    True when this run made it."""
    try:
        return _claim(out)
    except (OSError, ValueError) as error:   # a name the file system refuses (too long, a NUL byte)
        if isinstance(error, RunError):
            raise
        raise RunError(f"{str(out)[:200]}: cannot be used as a run folder ({error})") from error


def _claim(out: Path) -> bool:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunError(f"{out}: not a folder; choose another --out")
    if not out.exists():
        out.mkdir(parents=True)
        return True
    leftovers = {checkpoint.partial(out / name) for name in (checkpoint.WEIGHTS, checkpoint.RUN_INFO)}
    entries = set(out.iterdir())
    if entries - leftovers:
        raise RunError(f"{out}: the run folder already exists and is not empty; choose another --out")
    for leftover in entries:
        leftover.unlink()
    return False


def _tune(started, model, data, method, options, recipe, shots, epochs, lr, batch_size, seed, precision, task, extra_answers,
          frames, progress, cancel, epoch_metrics, local_paths, zero_shot_cache, deadline, lr_cache, budget, *,
          workdir: Path, out: Path, save: bool) -> RunResult:
    seed_everything(seed)
    dataset = read_dataset(data, workdir, DEFAULT_LIMITS)
    task_def = get_task(task, dataset, tuple(extra_answers), frames)
    device = pick_device()
    amp = autocast_for(precision, device)
    backbone = load_backbone(model, seed, fallback_offline=True, local_paths=local_paths, budget=budget).to(device)
    model = backbone.spec   # "offline" when the requested weights could not be fetched
    video = any(item.kind == "video" for item in dataset.items)
    chosen = recipe_for(recipe, get_method(method), Setting.of(backbone, task, video))
    config = make_config(method, {**chosen.options, **options})
    lr_choice = None
    lr_given = lr != AUTO
    if lr == AUTO and chosen.lr is not None:   # their recipe is what they ran
        lr, lr_choice = chosen.lr, LrChoice(lr=chosen.lr, why=f"the {chosen.name} recipe's rate ({chosen.source})")
    warmup = chosen.warmup if chosen.warmup is not None else TrainSettings.warmup
    if task not in backbone.tasks:
        raise RunError(f"{model} serves {', '.join(backbone.tasks)}, not {task}")
    test_set = _test_set(task_def, backbone, dataset)
    train_items = few_shot(_items(task_def, dataset, "train"), shots, seed)
    if not train_items:
        raise RunError(f"{dataset.manifest}: the dataset has no training items for {task}")
    if len(train_items) < (world := rank_and_world()[1]):   # each process trains on its share of every batch
        raise RunError(f"{dataset.manifest}: {len(train_items)} training item(s) cannot be shared among {world} "
                       f"processes; run fewer processes (torchrun --nproc-per-node) or use more shots")
    # The weights text names the seed of a random init, so seeds of an untrained backbone stay apart.
    scored_as = (backbone.spec, backbone.weights, dataset.fingerprint, task, frames, tuple(extra_answers))
    cache = zero_shot_cache if zero_shot_cache is not None else {}
    spread_key = (*scored_as, "media spread")
    zero_shot, untuned_spread = _kept_scores(cache, scored_as, task_def), _kept_spread(cache, spread_key)
    if zero_shot is None or untuned_spread is None:   # a cache may decline to keep them (core.cache: local files)
        media = encode_test_media(backbone, test_set.pixels)   # encoded once, for the scores and the spread
        if zero_shot is None:
            zero_shot = task_def.evaluate(backbone, test_set, media)
            cache[scored_as] = zero_shot
        if untuned_spread is None and (untuned_spread := _spread(media.embeddings)) is not None:
            cache[spread_key] = {"spread": untuned_spread}
        del media   # its vision tokens would stay on the device through training
    zero_shot = dict(zero_shot)

    seed_everything(seed)
    handle = attach(backbone, method, config)
    fixed_lr = lr if lr != AUTO else suggested_lr(model, method)
    # A pull toward the pretrained weights stands in for weight decay (toward W₀ rather than toward 0).
    settings = TrainSettings(epochs=epochs, lr=fixed_lr, batch_size=batch_size, seed=seed, autocast=amp, warmup=warmup,
                             weight_decay=0.0 if handle.pull else TrainSettings.weight_decay)
    log, per_epoch = None, []
    if handle.num_trainable() and epochs > 0:
        objective = handle.pulled(task_def.objective(backbone, task_def.prepare(backbone, train_items), handle),
                                  len(train_items))
        if lr == AUTO:
            key = lr_range.cache_key(backbone, method, get_method(method).revision, config_to_dict(config),
                                     dataset.fingerprint, task, frames, tuple(extra_answers), shots, seed, amp)

            def stop() -> bool:   # a cancel or the deadline ends the range test too
                return (cancel is not None and cancel()) or (deadline is not None and time.monotonic() >= deadline)

            lr_choice = lr_range.choose_lr(objective, handle.trainable_parameters(), settings, fixed_lr, lr_cache, key,
                                           stop)
            settings.lr = lr_choice.lr

        def epoch_end(epoch: int) -> None:   # a restarted run scores again from the epoch it went back to
            per_epoch[epoch - 1:] = [task_def.evaluate(backbone, test_set)]
        log = train(objective, handle.trainable_parameters(), settings, progress, cancel,
                    epoch_end if epoch_metrics else None, deadline)
        del per_epoch[len(log.epoch_losses):]   # a restart stopped early leaves no epoch it went back on
    with _merged(handle):
        media = encode_test_media(backbone, test_set.pixels)
        tuned, tuned_spread = task_def.evaluate(backbone, test_set, media), _spread(media.embeddings)
    spread = MediaSpread(untuned_spread, tuned_spread) if None not in (untuned_spread, tuned_spread) else None
    notes = [backbone.fallback_note] if backbone.fallback_note else []
    if log is not None and log.restarts:
        notes.append(restart_note(log.restarts))
    headline = headline_metric(task)
    if ends_below_zero_shot(task, zero_shot, tuned):   # trained or not (prompt tuning's random prompts alone can be)
        advice = "try a lower learning rate or fewer epochs" if log is not None else \
            "it was not trained: the method's parameters as they start changed the scores"
        notes.append(f"{BELOW_ZERO_SHOT} ({metric_label(headline)} {tuned[headline]:.1f} against "
                     f"{zero_shot[headline]:.1f} untuned): this run made the model worse; {advice}")
    if spread is not None and spread.collapsed:
        notes.append(f"{COLLAPSED} (they sit {spread.tuned / spread.zero_shot:.2g}× as far apart as untuned, a mean "
                     f"cosine of {1 - spread.tuned:.2f} against {1 - spread.zero_shot:.2f}): its score may hide a "
                     f"partial collapse, though some sound runs end this close too; compare it with a run at a third "
                     f"of the learning rate")
    if log is not None and log.out_of_time:
        notes.append(f"stopped at the GPU time limit after {log.steps} of {log.total_steps} steps; "
                     f"scored and saved as far as it got")

    result = RunResult(
        method=method, config=config_to_dict(config), method_revision=get_method(method).revision, recipe=chosen, backbone=model, seed=seed, task=task,
        extra_answers=list(extra_answers), frames=frames, note="; ".join(notes) or None,
        backbone_weights=backbone.weights, backbone_params=backbone.num_backbone_params(),
        trainable_params=handle.num_trainable(),
        trainable_pct=100.0 * handle.num_trainable() / backbone.num_backbone_params(), groups=handle.budget(),
        dataset=DatasetSummary(fingerprint=dataset.fingerprint, manifest=dataset.manifest, **dataset.stats(),
                               train_used=len(train_items)),
        train=TrainSummary(epochs=epochs, lr=log.lr if log else settings.lr, lr_choice=lr_choice, lr_given=lr_given,
                           warmup=warmup, weight_decay=settings.weight_decay,
                           batch_size=batch_size, shots=shots, bf16=amp == "bf16", precision=precision,
                           autocast=amp or "fp32", device=device.type,
                           epoch_losses=log.epoch_losses if log else [], step_losses=log.step_losses if log else [],
                           epoch_metrics=per_epoch, cancelled=bool(log and log.cancelled),
                           out_of_time=bool(log and log.out_of_time), seconds=log.seconds if log else None,
                           steps_run=log.steps_run if log else 0,
                           restarts=[Restart(**r) for r in log.restarts] if log else []),
        zero_shot=zero_shot, tuned=tuned, media_spread=spread, seconds=time.perf_counter() - started, out=str(out))
    if save:
        checkpoint.save(out, handle, result)
    return result


def load_run(model: str, pet: str | Path, local_paths: bool = True, device: Optional[torch.device] = None,
             budget: Optional[WeightsBudget] = None) -> tuple[Backbone, PetHandle, RunResult]:
    """The backbone (re-drawn from the run's seed when it has no weights) with the run's PET weights,
    on `device` (default: the GPU when there is one). Without `local_paths` the run's backbone may
    not name a file or folder (an uploaded run); with a `budget` its weights may take no more memory."""
    info = read_run_info(model, pet)
    backbone = load_backbone(model, info.seed, local_paths=local_paths, budget=budget).to(device or pick_device())
    handle, info = attach_run(backbone, pet)
    return backbone, handle, info


def read_run_info(model: str, pet: str | Path) -> RunResult:
    """A run's run.json, checked to be this PET Studio's version of its method on `model`."""
    info, weights = checkpoint.read(pet)
    method = get_method(info.method)
    if info.method_revision != method.revision:
        raise checkpoint.CheckpointError(
            f"{weights.parent / checkpoint.RUN_INFO}: tuned by another version of {info.method} (revision "
            f"{info.method_revision}, this PET Studio has {method.revision}: {method.revised}); its weights would "
            f"compute something else here, so tune it again")
    if model != info.backbone:
        raise checkpoint.CheckpointError(f"{weights.parent / checkpoint.RUN_INFO}: these weights were tuned on "
                                         f"{info.backbone[:200]}, not {model}")
    return info


def attach_run(backbone: Backbone, pet: str | Path, restorable: bool = False) -> tuple[PetHandle, RunResult]:
    """Attach a run's method to `backbone` (its spec and seed) and load its PET weights, every
    name, shape, dtype and value checked, and a scored run's parameter counts too. With
    `restorable`, detaching also puts back the backbone weights the run tunes in place (BitFit,
    linear probe, full), so that the backbone can serve other runs after it (the app's shared
    backbones)."""
    info = read_run_info(backbone.spec, pet)
    weights = checkpoint.read(pet)[1]
    handle = attach(backbone, info.method, info.config)
    if restorable:
        frozen = {n: p.detach().to("cpu", copy=True) for n, p in handle.trainable_parameters().items()
                  if not n.startswith("pet.")}

        @torch.no_grad()
        def restore() -> None:
            parameters = dict(backbone.named_parameters())
            for name, value in frozen.items():
                parameters[name].copy_(value)

        handle.on_detach(restore)
    try:
        checkpoint.load_into(handle, weights)
        _check_budget(info, handle, backbone, weights.parent / checkpoint.RUN_INFO)
    except BaseException:
        handle.detach()
        raise
    return handle, info


def _check_budget(info: RunResult, handle: PetHandle, backbone: Backbone, run_json: Path) -> None:
    """A scored run's parameter counts, which its card, the comparison and the report show, must be
    the method's on this backbone: a run.json written by hand could claim any budget."""
    if not info.scored:
        return
    held = {"backbone_params": backbone.num_backbone_params(), "trainable_params": handle.num_trainable(),
            "groups": handle.budget()}
    for key, value in held.items():
        if getattr(info, key) != value:
            raise checkpoint.CheckpointError(f"{run_json}: '{key}' says {getattr(info, key)!r:.200}, but {info.method} "
                                             f"with these options on {backbone.spec[:200]} has {value!r:.200}")
    share = 100.0 * held["trainable_params"] / held["backbone_params"]
    if not math.isclose(info.trainable_pct, share, rel_tol=1e-9):
        raise checkpoint.CheckpointError(f"{run_json}: 'trainable_pct' says {info.trainable_pct:.6g}, but "
                                         f"{held['trainable_params']} of {held['backbone_params']} is {share:.6g}")


def evaluate(model: str, pet: str | Path, data: str | Path) -> dict[str, Any]:
    """Score a saved run on the test split of `data` (a .zip is unpacked inside the run folder, then
    removed), with the run's flags as it was tuned (run.json's scores: its numbers are shown again)."""
    backbone, handle, info = load_run(model, pet)
    run_folder = Path(pet) if Path(pet).is_dir() else Path(pet).parent
    with tempfile.TemporaryDirectory(dir=run_folder, prefix="eval-") as workdir:
        dataset = read_dataset(data, workdir, DEFAULT_LIMITS)
        task = get_task(info.task, dataset, tuple(info.extra_answers), info.frames)
        metrics = score(task, handle, _test_set(task, backbone, dataset))
    same = info.dataset is not None and dataset.fingerprint == info.dataset.fingerprint
    return {"method": info.method, "task": task.name, "backbone": model, "metrics": metrics,
            "same_data_as_tuning": same, **info.flag_values}
