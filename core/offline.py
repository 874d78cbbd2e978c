"""The offline model: a small CLIP (open_clip config PETStudio-World) pretrained contrastively on
the base part of the procedural world, shipped in assets/offline.

    python -m core.offline pretrain --steps 1500 --out assets/offline
    python -m core.offline compare --part novel-colours --shots 16 --seeds 0,1,2 --record assets/offline
    python -m core.offline lr-proof --shots 16,all --record assets/offline   (--task vqa: lr_proof_vqa.json)
    python -m core.offline card

`compare` writes a novel part as a dataset and tunes every method on it K-shot (mean over
seeds); `lr-proof` measures `--lr auto` against fixed rates; `card` writes
assets/offline/MODEL_CARD.md from pretraining.json, compare.json and the proofs' records.

Scenes are drawn on the fly from the seed, one batch per step, through the engine's trainer
(full fine-tuning of a random-init backbone), then the model is scored zero-shot on held-out
base scenes and on every novel part, and written as fp16 safetensors with a model card.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Optional
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from core import world
from core.backbones import load_backbone
from core.pet import attach
from core.result import FLAGS
from core.runs import suggested_lr
from core.tasks import headline_metric, retrieval
from core.trainer import RESTART_FACTOR, TrainSettings, train

ARCHITECTURE = "PETStudio-World"
OFFLINE_DIR = Path(__file__).resolve().parents[1] / "assets" / "offline"
CHECKPOINT = OFFLINE_DIR / f"{ARCHITECTURE}.safetensors"
EVAL_PARTS = ("base", "novel-colours", "novel-compositions", "novel-textures")


class WorldPretraining(nn.Module):
    """Each batch is a seed; forward draws that batch's scenes and returns the contrastive loss."""

    def __init__(self, backbone, steps_per_epoch: int):
        super().__init__()
        self.backbone, self.steps_per_epoch = backbone, steps_per_epoch

    def render(self, seed: int, size: int) -> retrieval.RetrievalSet:
        rng = random.Random(seed)
        pictures, texts = [], []
        for _ in range(size):
            scene = world.sample_scene("base", rng)
            pictures.append(self.backbone.image_transform(world.draw_scene(scene)))
            texts.append(world.captions(scene, rng, n=1)[0])
        return retrieval.RetrievalSet(torch.stack(pictures), self.backbone.tokenize(texts), torch.arange(size))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        seed, size = int(batch[0]), int(batch[1])
        data = self.render(seed, size)
        return retrieval.RetrievalObjective(self.backbone, data)(torch.arange(size))

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        seeds = torch.randint(0, 2**31 - 1, (self.steps_per_epoch,), generator=generator)
        return [torch.tensor([int(s), batch_size]) for s in seeds]


def part_test_set(backbone, part: str, items: int, seed: int) -> retrieval.RetrievalSet:
    """`items` scenes of a part (seeded apart from pretraining) with one caption each."""
    pictures, texts = [], []
    for scene, rng in world.scenes(part, items, seed):
        pictures.append(backbone.image_transform(world.draw_scene(scene)))
        texts.append(world.captions(scene, rng, n=1)[0])
    return retrieval.RetrievalSet(torch.stack(pictures), backbone.tokenize(texts), torch.arange(items))


def zero_shot_table(backbone, items: int = 100, seed: int = 12345) -> dict[str, float]:
    """Text-to-image Recall@1 (percent) per part; chance is 100 / items."""
    return {part: retrieval.evaluate(backbone, part_test_set(backbone, part, items, seed))["t2i_r1"]
            for part in EVAL_PARTS}


def pretrain(out: Path, steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
             epochs: int = 1) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    backbone = load_backbone(f"openclip:{ARCHITECTURE}", seed=seed)
    handle = attach(backbone, "full")
    objective = WorldPretraining(backbone, steps // epochs)

    def progress(p) -> None:
        if p.step % 50 == 0 or p.step == p.total_steps:
            print(f"step {p.step}/{p.total_steps} loss {p.loss:.3f} eta {p.eta:.0f}s", file=sys.stderr, flush=True)

    log = train(objective, handle.trainable_parameters(),
                TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, warmup=0.05), progress)
    handle.detach()
    backbone.eval()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in backbone.open_clip_state_dict().items()}
    save_file(state, str(out / f"{ARCHITECTURE}.safetensors"))
    minutes = (time.perf_counter() - started) / 60
    report = {"architecture": ARCHITECTURE, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "minutes": round(minutes, 1), "threads": torch.get_num_threads(),
              "final_loss": round(sum(log.step_losses[-50:]) / max(1, len(log.step_losses[-50:])), 4),
              "zero_shot_t2i_r1": zero_shot_table(backbone)}
    (out / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# VL-PET in both placements: both towers (the studio's default) and the text tower over frozen
# visual features (the authors' placement); Aurora also with the authors' GQT.
COMPARED = [("zero_shot", {}), ("linear_probe", {}), ("bitfit", {}), ("lora", {}), ("prompt", {}),
            ("adapter", {}), ("aurora", {}), ("aurora", {"gqt": True}),
            *[("vlpet", {"granularity": g, **placement}) for placement in ({}, {"towers": ["text"]})
              for g in ("small", "middleX", "middleY", "large")], ("full", {})]


def compare(out: Path, part: str, shots: int, seeds: list[int], epochs: int = 15, lr: Optional[float] = None,
            items: int = 200, precision: str = "fp32", compared: list[tuple[str, dict]] = COMPARED) -> list[dict]:
    """Tune every method `shots`-shot on a novel part of the world; one row per method, metrics
    averaged over `seeds`, each at `lr` or else at its fixed suggested rate (`suggested_lr`)."""
    from core.runs import tune

    data = world.write_part(out / part, part, items=items)
    rows = []
    for method, options in compared:
        label = "-".join([method, *(",".join(v) if isinstance(v, list) else str(v) for v in options.values())])
        rate = lr if lr is not None and method != "full" else suggested_lr("offline", method)
        runs = [tune("offline", data, method, options, shots=shots, epochs=epochs, lr=rate, precision=precision,
                     seed=seed, out=out / "runs" / f"{label}-{seed}") for seed in seeds]
        mean = lambda key, part_="tuned": sum(getattr(r, part_)[key] for r in runs) / len(runs)  # noqa: E731
        settings = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in options.items())
        rows.append({"method": method + (f" ({settings})" if settings else ""),
                     "trainable_params": runs[0].trainable_params, "trainable_pct": runs[0].trainable_pct,
                     "zero_shot_t2i_r1": mean("t2i_r1", "zero_shot"), "t2i_r1": mean("t2i_r1"),
                     "i2t_r1": mean("i2t_r1"), "lr": rate, "seconds": sum(r.seconds for r in runs) / len(runs)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


PRECISION_METHODS = [(m, o) for m, o in COMPARED if "towers" not in o and o != {"gqt": True}]


def compare_precisions(out: Path, parts: list[str], shots: int, seeds: list[int], epochs: int = 15) -> list[dict]:
    """Every method tuned in fp32 and in bf16 autocast (what `--precision auto` picks on hardware
    with native bf16) on each novel part: one row per method and part, Recall@1 under both."""
    rows = []
    for part in parts:
        by_precision = {precision: compare(out / precision / part, part, shots, seeds, epochs, precision=precision,
                                           compared=PRECISION_METHODS) for precision in ("fp32", "bf16")}
        for fp32, bf16 in zip(by_precision["fp32"], by_precision["bf16"]):
            rows.append({"method": fp32["method"], "part": part, "fp32_t2i_r1": fp32["t2i_r1"],
                         "bf16_t2i_r1": bf16["t2i_r1"], "fp32_i2t_r1": fp32["i2t_r1"], "bf16_i2t_r1": bf16["i2t_r1"]})
    return rows


def precision_table(rows: list[dict]) -> str:
    lines = ["| method | part | t2i R@1 fp32 | t2i R@1 bf16 | i2t R@1 fp32 | i2t R@1 bf16 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['part']} | {r['fp32_t2i_r1']:.1f} | {r['bf16_t2i_r1']:.1f} | "
                     f"{r['fp32_i2t_r1']:.1f} | {r['bf16_i2t_r1']:.1f} |")
    return "\n".join(lines)


FIXED_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PROOF_RATES = ("auto", *FIXED_LRS)   # what a proof measures unless told (--rates); a record without "rates" did
LR_PROOF_METHODS = ("linear_probe", "bitfit", "lora", "prompt", "adapter", "aurora", "vlpet", "full", "prolip")


PROOF_TASKS = ("retrieval", "vqa")
PROOF_RECORDS = {"retrieval": "lr_proof.json", "vqa": "lr_proof_vqa.json"}   # in assets/offline, for the card
PROOF_SCORES = {"retrieval": "text→image Recall@1 (%) on the part's 50 test scenes",
                "vqa": "VQA accuracy (%) on the questions about the part's 50 test scenes (answers ranked)"}


def _metric(row: dict) -> str:
    """The row's task's headline score: a row keeps it under this name, and its zero-shot value under
    "zero_shot_" + this name (rows without a task are retrieval's)."""
    return headline_metric(row.get("task", "retrieval"))


def proof_rates(text: str) -> list:
    """`--rates`: "auto" and fixed rates of FIXED_LRS, comma-separated, each once, in order."""
    rates = []
    for item in (part.strip() for part in text.split(",")):
        try:
            rate = item if item == "auto" else float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither auto nor a number") from None
        if rate != "auto" and rate not in FIXED_LRS:
            raise argparse.ArgumentTypeError(f"{item}: a fixed rate must be one of {', '.join(map(str, FIXED_LRS))}")
        if rate not in rates:
            rates.append(rate)
    if "auto" not in rates:
        raise argparse.ArgumentTypeError("the proof measures auto against fixed rates: include auto")
    return rates


def lr_proof(out: Path, parts: list[str], shots: list[Optional[int]], seeds: list[int], epochs: int = 15,
             methods: tuple[str, ...] = LR_PROOF_METHODS, items: int = 200, task: str = "retrieval",
             rates: tuple = PROOF_RATES) -> list[dict]:
    """Every method at every rate of `rates` (`--lr auto` and FIXED_LRS unless told) on each part, K-shot
    and with the whole training split, per seed, for `task`: one row per run (kept in out/runs.jsonl, so an
    interrupted proof resumes where it stopped); what it returns is this grid's rows, whenever measured."""
    from core.runs import tune
    from core.trainer import TrainingDiverged

    record = out / "runs.jsonl"
    done = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()] if record.is_file() else []
    seen = {_row_key(r) for r in done}
    metric = headline_metric(task)
    zero_shot: dict = {}
    for part in parts:
        data = out / "data" / part
        if not (data / "data.jsonl").is_file():
            world.write_part(data, part, items=items)
        for k in shots:
            for method in methods:
                for rate in rates:
                    for seed in seeds:
                        if (task, part, k, method, rate, seed) in seen:
                            continue
                        row = {"task": task, "part": part, "shots": k, "method": method, "lr": rate, "seed": seed}
                        try:
                            run = tune("offline", data, method, shots=k, epochs=epochs, lr=rate, seed=seed, task=task,
                                       out=out / "runs" / f"{task}-{part}-{k or 'all'}-{method}-{rate}-{seed}",
                                       zero_shot_cache=zero_shot)
                        except TrainingDiverged as error:   # it ended with its message: no result to show
                            row.update({metric: None}, diverged=str(error), restarts=TrainSettings.restarts,
                                       below_zero_shot=False, collapsed=False)
                        else:
                            choice = run.train.lr_choice
                            row.update({metric: run.tuned[metric], f"zero_shot_{metric}": run.zero_shot[metric]},
                                       trained_lr=run.train.lr, restarts=len(run.train.restarts),
                                       below_zero_shot=run.below_zero_shot, collapsed=run.collapsed,
                                       seconds=run.seconds,
                                       range_test_seconds=choice.seconds if choice else 0.0,
                                       why=choice.why if choice else None)
                        done.append(row)
                        with record.open("a", encoding="utf-8") as stream:
                            stream.write(json.dumps(row) + "\n")
                        print(json.dumps(row), file=sys.stderr, flush=True)
    return [r for r in done if r.get("task", "retrieval") == task and r["part"] in parts and r["shots"] in shots
            and r["method"] in methods and r["lr"] in rates and r["seed"] in seeds]


def _row_key(row: dict) -> tuple:
    return row.get("task", "retrieval"), row["part"], row["shots"], row["method"], row["lr"], row["seed"]


def merged_record(old: Optional[dict], new: dict, provenance: Optional[str] = None) -> dict:
    """The record `old` (None: none yet) with the runs of `new` (a proof's record of one command): a run
    measured again replaces its row where it stands (the record's diff shows only what changed), new
    runs follow, the others stay; the parts, shots, seeds (in order) and rates are
    those of both, and `provenance`, a sentence on these runs, is added to the record's (with the
    threads they ran on where those differ from the record's). Records of different epochs are not
    one table (ValueError: `check_mergeable`)."""
    if old is None:
        return {**new, "seeds": sorted(new["seeds"]), **({"provenance": provenance} if provenance else {})}
    check_mergeable(old, new["epochs"])
    measured, recorded = {_row_key(r): r for r in new["rows"]}, {_row_key(r) for r in old["rows"]}

    def union(key: str) -> list:
        return list(dict.fromkeys([*old.get(key, PROOF_RATES if key == "rates" else []), *new[key]]))

    record = {**old, **{key: union(key) for key in ("parts", "shots", "rates")},
              "seeds": sorted(set(old["seeds"]) | set(new["seeds"])), "threads": old.get("threads", new["threads"]),
              "rows": [measured.get(_row_key(r), r) for r in old["rows"]] +
                      [r for key, r in measured.items() if key not in recorded]}
    if record["threads"] != new["threads"]:
        provenance = f"{provenance or 'Runs added later.'} (On {new['threads']} CPU threads.)"
    if provenance:
        record["provenance"] = " ".join(filter(None, [old.get("provenance"), provenance]))
    return record


def check_mergeable(old: dict, epochs: int) -> None:
    """ValueError unless runs of `epochs` epochs can join the record `old` (a record as the card reads it)."""
    if not isinstance(old, dict) or not all(isinstance(old.get(key), list) for key in ("parts", "shots", "seeds", "rows")):
        raise ValueError("not a proof record (parts, shots, seeds and rows lists)")
    if old.get("epochs") != epochs:
        raise ValueError(f"its runs trained {old.get('epochs')} epochs, these {epochs}: not one table")


def _by_rate(rows: list[dict]) -> dict[tuple, dict]:
    """(part, shots, method) -> rate -> its runs, in the order parts and methods were measured (the
    rows of one task)."""
    parts = list(dict.fromkeys(r["part"] for r in rows))
    order = {m: i for i, m in enumerate(LR_PROOF_METHODS)}
    groups: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: (parts.index(r["part"]), r["shots"] or 0, order.get(r["method"], 99))):
        groups.setdefault((r["part"], r["shots"], r["method"]), {}).setdefault(r["lr"], []).append(r)
    return groups


def _flagged(run: dict) -> bool:
    """Ended below zero-shot, or collapsed the embeddings of its test media (rows recorded before that
    flag existed do not say)."""
    return any(run.get(field, False) for _, field in FLAGS)


def _collapse_checked(rows: list[dict]) -> str:
    """How many of the runs were checked for a collapse (the check came after the first records)."""
    checked = sum("collapsed" in r for r in rows if not r.get("diverged"))
    scored = sum(not r.get("diverged") for r in rows)
    return "every run was checked for a collapse" if checked == scored else \
        f"{checked} of the {scored} scored runs were checked for a collapse, the others recorded before the " \
        f"check existed"


def _scores(runs: list[dict]) -> list[float]:
    """The runs' headline scores (t2i R@1, VQA accuracy), leaving out those that diverged (they have none)."""
    return [r[_metric(r)] for r in runs if r[_metric(r)] is not None]


MISS_MARGIN = 3.0      # points: the proof's "within 3 points of the best fixed rate"
NOISE_DRAWS = 20000


def noise_miss_chance(scores: dict[float, list[float]], best: float, seeds: int, margin: float = MISS_MARGIN,
                      shared: float = 0.0, draws: int = NOISE_DRAWS) -> float:
    """How often a rule that always trained at the best fixed rate (`best`, on `seeds` of the same
    seeds) would still end more than `margin` points below the best fixed mean, from the seeds' spread
    alone. Each rate's seed scores are drawn as normal around its recorded mean, with its recorded
    spread taken as the true one, as many as recorded: the highest of several noisy means lies above
    its own rate's mean (the winner's curse). The share `shared` of every spread is the seed's own
    (its shots, its draws), common to every rate and to the rule on that seed, and leaves their
    differences alone; the rest is drawn afresh for each. A fixed seed, so a card reads the same
    every time it is written."""
    generator = torch.Generator().manual_seed(0)
    own = (1.0 - shared) ** 0.5

    def drawn_means(values: list[float], count: int) -> torch.Tensor:
        spread = torch.tensor(own * _std(values) if len(values) > 1 else 0.0, dtype=torch.float64)
        noise = torch.randn(draws, count, generator=generator, dtype=torch.float64)
        return (sum(values) / len(values) + spread * noise).mean(dim=1)

    best_seen = torch.stack([drawn_means(scores[rate], len(scores[rate])) for rate in sorted(scores)]).amax(dim=0)
    rule = drawn_means(scores[best], seeds)
    return float((rule < best_seen - margin).double().mean())


def seed_correlation(rows: list[dict]) -> dict[bool, float]:
    """Per size (True: the whole split), how much a seed's score moves alike at two fixed rates of one
    method and part: the correlation of each seed's deviation from its rate's mean, pooled over every
    pair of fixed rates measured on the same seeds (0 where it comes out below)."""
    sums: dict[bool, list[float]] = {}
    for (_, k, _), by_rate in _by_rate(rows).items():
        deviations = {}
        for rate in (r for r in FIXED_LRS if r in by_rate):
            runs = by_rate[rate]
            if len(_scores(runs)) == len(runs) > 1:
                mean = sum(_scores(runs)) / len(runs)
                deviations[rate] = {r["seed"]: r[_metric(r)] - mean for r in runs}
        total = sums.setdefault(k is None, [0.0, 0.0, 0.0])
        rates = list(deviations)
        for i, first in enumerate(rates):
            for second in rates[i + 1:]:
                for seed in deviations[first].keys() & deviations[second].keys():
                    a, b = deviations[first][seed], deviations[second][seed]
                    total[0] += a * b
                    total[1] += a * a
                    total[2] += b * b
    return {whole: max(0.0, ab / (aa * bb) ** 0.5) if aa and bb else 0.0 for whole, (ab, aa, bb) in sums.items()}


def lr_proof_summary(rows: list[dict]) -> list[dict]:
    """Per part, shots and method: zero-shot, the best fixed rate (among those where no seed
    diverged) and its mean, --lr auto's mean and the rates it chose, and what happened at the next
    fixed rate above the best (three times too high): seeds the guard restarted, seeds flagged below
    zero-shot, seeds that ended with the divergence message, and its mean over the others."""
    summary, correlation = [], seed_correlation(rows)
    for (part, k, method), by_rate in _by_rate(rows).items():
        means = {rate: sum(_scores(runs)) / len(runs) for rate, runs in by_rate.items()
                 if len(_scores(runs)) == len(runs)}
        fixed = [rate for rate in FIXED_LRS if rate in means]
        auto = by_rate.get("auto", [])
        if not auto or not fixed:
            continue
        best = max(fixed, key=means.get)
        higher = next((rate for rate in FIXED_LRS if rate > best and rate in by_rate), None)
        too_high = by_rate.get(higher, [])
        finished = [r for r in auto if r[_metric(r)] is not None]
        scored = next(r for runs in by_rate.values() for r in runs if r[_metric(r)] is not None)
        # a seed of auto's that ended with the divergence message has no score: the row counts as a miss
        fixed_scores = {rate: _scores(by_rate[rate]) for rate in fixed}
        auto_mean = sum(_scores(auto)) / len(finished) if finished else None
        shared = correlation.get(k is None, 0.0)
        noise = noise_miss_chance(fixed_scores, best, len(auto), shared=shared)
        # as far below as auto ended: how well noise explains auto's own gap (a miss's p-value)
        noise_as_far = noise_miss_chance(fixed_scores, best, len(auto), means[best] - auto_mean, shared) \
            if finished and auto_mean < means[best] else None
        summary.append({"part": part, "shots": k, "method": method,
                        "zero_shot": scored[f"zero_shot_{_metric(scored)}"],
                        "best_lr": best, "best": means[best],
                        "auto": auto_mean,
                        "auto_lrs": [r["trained_lr"] for r in finished],
                        "auto_scores": _scores(auto), "auto_diverged": len(auto) - len(_scores(auto)),
                        "noise_miss": noise, "noise_as_far": noise_as_far, "seed_correlation": shared,
                        "too_high_lr": higher,
                        "too_high": sum(_scores(too_high)) / len(_scores(too_high)) if _scores(too_high) else None,
                        "too_high_restarted": sum(bool(r["restarts"]) for r in too_high),
                        "too_high_flagged": sum(_flagged(r) for r in too_high),
                        "too_high_diverged": len(too_high) - len(_scores(too_high)), "seeds": len(too_high),
                        "range_test_seconds": sum(r["range_test_seconds"] for r in finished) / len(finished)
                        if finished else None,
                        "run_seconds": sum(r["seconds"] for r in finished) / len(finished) if finished else None})
    return summary


def _mean_std(values: list[float]) -> str:
    """"mean ± std", or the one value alone (one seed has no spread)."""
    mean = f"{sum(values) / len(values):.1f}"
    return f"{mean} ± {_std(values):.1f}" if len(values) > 1 else mean


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def lr_proof_table(rows: list[dict]) -> str:
    """method × (fixed rates, auto) per part and shots: the headline score's mean ± std over seeds; a ⚠ marks a
    rate where a seed ended below zero-shot or collapsed (flagged), a ↺ where the guard restarted one, ✗N the
    seeds that diverged after every restart (they end with a message, no result)."""
    measured = {r["lr"] for r in rows}
    rates = [*(rate for rate in FIXED_LRS if rate in measured), "auto"]
    lines = [f"| part | shots | method | zero-shot | {' | '.join(f'{r:g}' if r != 'auto' else 'auto' for r in rates)} |",
             f"|---|---|---|---:|{'---:|' * len(rates)}"]
    for (part, k, method), by_rate in _by_rate(rows).items():
        zero_shot = next((f'{r[f"zero_shot_{_metric(r)}"]:.1f}' for runs in by_rate.values() for r in runs
                          if r[_metric(r)] is not None), "—")   # every run diverged: none was scored
        cells = []
        for rate in rates:
            runs = by_rate.get(rate, [])
            marks = ("⚠" if any(_flagged(r) for r in runs) else "") + \
                ("↺" if any(r["restarts"] for r in runs) else "")
            scores = _scores(runs)
            diverged = len(runs) - len(scores)
            shown = f"{_mean_std(scores)}{marks}" if scores else ""
            cells.append(" ".join(filter(None, [shown, f"✗{diverged}" if diverged else ""])) or "—")
        lines.append(f"| {part} | {k or 'all'} | {method} | {zero_shot} | {' | '.join(cells)} |")
    return "\n".join(lines)


def lr_proof_verdicts(summary: list[dict]) -> str:
    """Per part, shots and method: auto against the best fixed rate, and the rate three times too high."""
    lines = ["| part | shots | method | zero-shot | best fixed (lr) | auto (chosen lrs) | auto − best | "
             "noise alone misses | 3× too high (lr): mean, restarted, flagged | range test s / run s |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for s in summary:
        chosen = ", ".join(f"{lr:.2g}" for lr in s["auto_lrs"])
        auto = f"{_mean_std(s['auto_scores'])} ({chosen})" if chosen else "no result"
        seconds = f"{s['range_test_seconds']:.1f} / {s['run_seconds']:.1f}" if chosen else "—"
        mean = f"{s['too_high']:.1f}" if s["too_high"] is not None else "no result"
        high = (f"{mean} ({s['too_high_lr']:g}): {s['too_high_restarted']}/{s['seeds']} restarted, "
                f"{s['too_high_flagged']}/{s['seeds']} flagged, {s['too_high_diverged']}/{s['seeds']} ended with "
                f"the divergence message") if s["too_high_lr"] is not None else "—"
        lines.append(f"| {s['part']} | {s['shots'] or 'all'} | {s['method']} | {s['zero_shot']:.1f} | "
                     f"{s['best']:.1f} ({s['best_lr']:g}) | {auto} | {_auto_gap(s)} | {_chance(s['noise_miss'])} | "
                     f"{high} | {seconds} |")
    return "\n".join(lines)


def _chance(p: Optional[float]) -> str:
    return "—" if p is None else f"{100 * p:.1f}%"


def _missed(s: dict) -> bool:
    return bool(s["auto_diverged"]) or s["auto"] < s["best"] - MISS_MARGIN


BEYOND_NOISE = 0.05   # a gap such a rule reaches less often than this is not put down to noise


def noise_verdict(summary: list[dict]) -> str:
    """What seed noise alone would cost a rule that always trained at each row's best fixed rate, and
    which of auto's misses noise hardly explains: a seed that ended with the divergence message, or a
    gap that such a rule would reach less than one time in twenty."""
    expected = sum(s["noise_miss"] or 0.0 for s in summary)
    missed = [s for s in summary if _missed(s)]
    beyond = [f"{s['part']} {s['shots'] or 'all'} {s['method']} ({_auto_gap(s)}"
              + (f", noise {_chance(s['noise_as_far'])})" if s["noise_as_far"] is not None else ")")
              for s in missed if s["auto_diverged"] or s["noise_as_far"] < BEYOND_NOISE]
    within = [f"{s['part']} {s['shots'] or 'all'} {s['method']} ({_chance(s['noise_as_far'])})"
              for s in missed if not (s["auto_diverged"] or s["noise_as_far"] < BEYOND_NOISE)]
    shared = sorted({(s["shots"] is None, s["seed_correlation"]) for s in summary})
    correlation = ", ".join(f"{value:.2f} {'on the whole split' if whole else 'at few shots'}"
                            for whole, value in shared)
    return (f"Seed noise alone would cost a rule that always trained at each row's best fixed rate, on the same "
            f"seeds, about {expected:.1f} of these {len(summary)} rows (the column \"noise alone misses\": how often "
            f"such a rule would end more than {MISS_MARGIN:g} points below the best fixed mean, the highest of several "
            f"noisy means lying above its own rate's mean; each rate's seeds drawn as normal around its recorded mean "
            f"with its recorded spread taken as the true one, less the part a seed shares across rates, which leaves "
            f"the gap alone: the correlation of a seed's deviations at two fixed rates, {correlation}). Of `auto`'s "
            f"{len(missed)} misses, {len(beyond)} {'is' if len(beyond) == 1 else 'are'} a gap such a rule would reach "
            f"less than one time in {1 / BEYOND_NOISE:.0f}, or a seed that ended with the divergence message"
            + (f": {'; '.join(beyond)}" if beyond else "")
            + (f"; the others are within that reach: {'; '.join(within)}." if within else "."))


def _auto_gap(s: dict) -> str:
    """auto − best, and auto's seeds that ended with the divergence message (a miss, whatever the
    others scored)."""
    gap = f"{s['auto'] - s['best']:+.1f}" if s["auto"] is not None else "no result"
    return f"{gap}; {s['auto_diverged']} seed(s) ended with the divergence message" if s["auto_diverged"] else gap


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | trainable | % | learning rate | t2i R@1 | i2t R@1 | tuning time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lr = f"{r['lr']:g}" if r["trainable_params"] else "—"   # the untuned row trains nothing
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | {lr} | "
                     f"{r['t2i_r1']:.1f} | {r['i2t_r1']:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _precision_section(folder: Path) -> str:
    path = folder / "precision.json"
    if not path.is_file():
        return ""
    record = json.loads(path.read_text(encoding="utf-8"))
    worst = max(abs(r[f"bf16_{k}"] - r[f"fp32_{k}"]) for r in record["rows"] for k in ("t2i_r1", "i2t_r1"))
    return f"""## bf16 against fp32 (what `--precision auto` gives on hardware with native bf16)

    python -m core.offline precision --parts {','.join(record['parts'])} --shots {record['shots']} --seeds {','.join(map(str, record['seeds']))} --epochs {record['epochs']}

The same runs as above in fp32 and with bf16 autocast (PET parameters and optimiser state fp32,
training's attention fp32 on a CPU, scores in fp32), mean over seeds {', '.join(map(str, record['seeds']))};
measured on {record['machine']}. The largest difference in any Recall@1 is {worst:.1f} points.

{precision_table(record['rows'])}

"""


def _unmeasured(record: dict) -> list[str]:
    """"part, K shots: methods" for each part and shots the record lacks some method's runs of,
    naming the seeds measured where some were."""
    rates: dict[tuple, set] = {}
    for r in record["rows"]:
        rates.setdefault((r["part"], r["shots"], r["method"], r["seed"]), set()).add(r["lr"])
    wanted = set(record.get("rates", PROOF_RATES))
    lacking = []
    for part in record["parts"]:
        for k in record["shots"]:
            said = []
            for method in LR_PROOF_METHODS:
                measured = [s for s in record["seeds"] if rates.get((part, k, method, s), set()) >= wanted]
                if len(measured) < len(record["seeds"]):
                    said.append(f"{method} (seed {', '.join(map(str, measured))} only)" if measured else method)
            if said:
                lacking.append(f"{part}, {k or 'all'} shots: {', '.join(said)}")
    return lacking


def _lr_proof_section(folder: Path, task: str = "retrieval") -> str:
    path = folder / PROOF_RECORDS[task]
    if not path.is_file():
        return ""
    record = json.loads(path.read_text(encoding="utf-8"))
    summary = lr_proof_summary(record["rows"])
    within = sum(not _missed(s) for s in summary)
    above = sum(not s["auto_diverged"] and s["auto"] > s["zero_shot"] for s in summary)
    shots = ",".join("all" if k is None else str(k) for k in record["shots"])
    missing = _unmeasured(record)
    # a record whose rows were measured at different commits says so in 'provenance'
    unfinished = (f"Not measured yet (the command above measures what is missing, resuming where a proof stopped): "
                  f"{'; '.join(missing)}.\n\n") if missing else ""
    seeds = f"seed{'s' if len(record['seeds']) > 1 else ''} {', '.join(map(str, record['seeds']))}"
    rates = record.get("rates", PROOF_RATES)
    options = (f" --task {task}" if task != "retrieval" else "") + \
        (f" --rates {','.join(map(str, rates))}" if set(rates) != set(PROOF_RATES) else "")
    return f"""## The learning rate found (`--lr auto`) against fixed rates{": VQA" if task == "vqa" else ""}

    python -m core.offline lr-proof{options} --parts {','.join(record['parts'])} --shots {shots} --seeds {','.join(map(str, record['seeds']))} --epochs {record['epochs']}

Each method at every fixed rate of {', '.join(f'{r:g}' for r in rates if r != "auto")} and at `--lr auto` (a range test
on the run's own training data, core/lr_range.py), {record['epochs']} epochs, batch 32, {seeds}:
{PROOF_SCORES[task]}{", mean ± std over seeds" if len(record['seeds']) > 1 else " (one seed: no spread)"}. No validation set is used anywhere: the fixed-rate columns are what a grid search would see
on the test split, which `auto` never does. ⚠ marks a rate where a seed ended below zero-shot or
collapsed the embeddings of its test media (the run says so wherever it is shown; {_collapse_checked(record['rows'])}), ↺ one where the divergence guard restarted a seed at 1/{RESTART_FACTOR:g} of
the rate, ✗N the seeds that still diverged after {TrainSettings.restarts} restarts and ended with the guard's message
(no result to show). On {record['threads']} CPU threads.{f" {record['provenance']}" if record.get('provenance') else ""}

{lr_proof_table(record['rows'])}

`auto` against the best fixed rate, and the next fixed rate above the best (three times too high,
or more): {within} of {len(summary)} method × part rows end within {MISS_MARGIN:g} points of their best fixed rate, and
{above} of {len(summary)} above zero-shot. {noise_verdict(summary)} The last column is the mean over the `auto` seeds of
the range test's seconds and the whole run's, each as measured when that row was (the provenance
above says on which machine and how many runs shared it): compare a row's two numbers, not rows.

{lr_proof_verdicts(summary)}

{unfinished}"""


def write_model_card(folder: Path = OFFLINE_DIR) -> Path:
    report = json.loads((folder / "pretraining.json").read_text(encoding="utf-8"))
    comparison = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    zero_shot = "\n".join(f"| {part} | {r1:.1f} |" for part, r1 in report["zero_shot_t2i_r1"].items())
    card = f"""# PETStudio-World: the offline model

A small CLIP (open_clip config `{report['architecture']}`: ViT 4 layers × 128 wide on 64×64 pictures with
8×8 patches, text transformer 4 layers × 128 wide, joint space 128) trained from scratch by this
project on the **base** part of its procedural world (`core/world.py`), so that PET Studio works
with no network. Weights: `{report['architecture']}.safetensors` (fp16), loaded with the spec `offline`.

## Training

    python -m core.offline pretrain --steps {report['steps']} --batch-size {report['batch_size']} --lr {report['lr']} --seed {report['seed']}

Contrastive (symmetric InfoNCE) through the engine's trainer, AdamW, 5% warm-up then cosine;
one batch of {report['batch_size']} freshly drawn base scenes (one caption each) per step. It took
{report['minutes']} minutes on {report['threads']} CPU threads; mean loss over the last 50 steps
{report['final_loss']}.

## Zero-shot text-to-image Recall@1 (%), 100 scenes per part (chance 1%)

| part | R@1 |
|---|---:|
{zero_shot}

## {comparison['shots']}-shot tuning on `{comparison['part']}` (mean over seeds {', '.join(map(str, comparison['seeds']))})

    python -m core.offline compare --part {comparison['part']} --shots {comparison['shots']} --seeds {','.join(map(str, comparison['seeds']))} --epochs {comparison['epochs']}

{comparison['items']} scenes, the last quarter ({comparison['items'] // 4}) as the test split; {comparison['shots']} training
scenes with 2 captions each, {comparison['epochs']} epochs of one batch; each method at its fixed suggested rate
for this model (`suggested_lr`, what `--lr auto` keeps when its range test says nothing; the rate
found on the data is measured below). Recall@1 (%) on the test split; the zero_shot row is
the untuned model. Tuning time is per run, on {report['threads']} CPU threads. VL-PET runs in two placements:
both towers (PET Studio's default) and `towers=text`, the text tower over frozen visual features (the
authors' placement, `--recipe authors`); Aurora also with the authors' gated query transformation.

{markdown_table(comparison['rows'])}

{_precision_section(folder)}{_lr_proof_section(folder)}{_lr_proof_section(folder, "vqa")}## Limits

It knows only the world's vocabulary (shapes, colours, sizes, positions, counts, textures); it
is a teaching and testing model, not a general one.
"""
    (folder / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return folder / "MODEL_CARD.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.offline")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("pretrain", help="pretrain the offline CLIP on the base part of the world")
    run.add_argument("--steps", type=int, default=3000)
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=str(OFFLINE_DIR))
    table = commands.add_parser("compare", help="tune every method K-shot on a novel part, for the model card")
    table.add_argument("--part", default="novel-colours", choices=[p for p in world.PARTS if p != "base"])
    table.add_argument("--shots", type=int, default=16)
    table.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    table.add_argument("--epochs", type=int, default=15)
    table.add_argument("--lr", type=float, help="one rate for every PET method (default: each method's suggested "
                                                "rate; full fine-tuning always keeps its own)")
    table.add_argument("--items", type=int, default=200)
    table.add_argument("--out", default="runs/compare")
    table.add_argument("--record", help="folder to write compare.json into (for the model card)")
    commands.add_parser("card", help="write assets/offline/MODEL_CARD.md from pretraining.json and compare.json")
    precision = commands.add_parser("precision", help="every method in fp32 and bf16 on novel parts, for the card")
    precision.add_argument("--parts", type=lambda s: s.split(","), default=["novel-colours", "novel-compositions"])
    precision.add_argument("--shots", type=int, default=16)
    precision.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    precision.add_argument("--epochs", type=int, default=15)
    precision.add_argument("--out", default="runs/precision")
    precision.add_argument("--record", help="folder to write precision.json into (for the model card)")
    proof = commands.add_parser("lr-proof", help="every method at fixed rates and at --lr auto on novel parts, "
                                                 "per seed (resumable), for the card")
    proof.add_argument("--parts", type=lambda s: s.split(","),
                       default=["novel-colours", "novel-compositions", "novel-textures"])
    proof.add_argument("--shots", type=lambda s: [None if k == "all" else int(k) for k in s.split(",")], default=[16],
                       help="comma-separated; all: the whole training split")
    proof.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    proof.add_argument("--epochs", type=int, default=15)
    proof.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=LR_PROOF_METHODS)
    proof.add_argument("--task", choices=PROOF_TASKS, default="retrieval")
    proof.add_argument("--rates", type=proof_rates, default=list(PROOF_RATES),
                       help=f"comma-separated: auto and fixed rates of {', '.join(map(str, FIXED_LRS))} (default: all)")
    proof.add_argument("--out", default="runs/lr-proof")
    proof.add_argument("--record", help="folder whose lr_proof.json (lr_proof_vqa.json with --task vqa) takes "
                                        "these runs, for the model card: rows measured again replace theirs, the "
                                        "others stay")
    proof.add_argument("--provenance", help="with --record: a sentence on where these runs were measured (the "
                                            "commit, the machine), added to the record's")
    args = parser.parse_args(argv)
    if args.command == "lr-proof":
        if args.provenance and not args.record:
            parser.error("--provenance describes the runs --record adds to a record: give --record too")
        path = Path(args.record) / PROOF_RECORDS[args.task] if args.record else None
        old = None
        if path is not None and path.is_file():   # checked before hours of runs, not after
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                check_mergeable(old, args.epochs)
            except ValueError as error:
                parser.error(f"{path}: {error}")
        rows = lr_proof(Path(args.out), args.parts, args.shots, args.seeds, args.epochs, args.methods, task=args.task,
                        rates=tuple(args.rates))
        if path is not None:
            measured = {"parts": args.parts, "shots": args.shots, "seeds": args.seeds, "epochs": args.epochs,
                        "rates": args.rates, "threads": torch.get_num_threads(), "rows": rows}
            path.write_text(json.dumps(merged_record(old, measured, args.provenance), indent=2) + "\n",
                            encoding="utf-8")
        print(lr_proof_verdicts(lr_proof_summary(rows)))
        return 0
    if args.command == "card":
        print(write_model_card())
        return 0
    if args.command == "pretrain":
        print(json.dumps(pretrain(Path(args.out), args.steps, args.batch_size, args.lr, args.seed)))
        return 0
    if args.command == "precision":
        rows = compare_precisions(Path(args.out), args.parts, args.shots, args.seeds, args.epochs)
        if args.record:
            from core.trainer import bf16_supported

            machine = (f"{torch.get_num_threads()} CPU threads, bf16 "
                       f"{'native' if bf16_supported(torch.device('cpu')) else 'emulated (no avx512_bf16/AMX)'}")
            record = {"parts": args.parts, "shots": args.shots, "seeds": args.seeds, "epochs": args.epochs,
                      "machine": machine, "rows": rows}
            (Path(args.record) / "precision.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(precision_table(rows))
        return 0
    rows = compare(Path(args.out), args.part, args.shots, args.seeds, args.epochs, args.lr, args.items)
    if args.record:
        record = {"part": args.part, "shots": args.shots, "seeds": args.seeds, "epochs": args.epochs,
                  "lr": args.lr, "items": args.items, "rows": rows}
        (Path(args.record) / "compare.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(markdown_table(rows))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
