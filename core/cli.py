"""`python -m core COMMAND`: info, tune, eval, bench, sweep, export, index, search, bench-index, report, demo.

With --json, the last line of stdout is one JSON object (on failure: {"error": "..."}, exit 2);
progress and notes go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from core.data.media import DEFAULT_FRAMES
from core.distributed import join_launched_group, leave_group, rank_and_world
from core.media_index import MediaIndexError
from core.pet import METHODS
from core.pet.recipes import RECIPES, Setting, recipe_for
from core.query import QueryError
from core.result import FLAGS
from core.runs import USER_ERRORS, RunError
from core.tasks import TASKS
from core.trainer import PRECISIONS, Progress
from core.vector_index import EXACT_UP_TO, MIN_IVF_ITEMS


def _method_options() -> dict[str, dict[str, Any]]:
    """Every option every method declares (core.pet.options); each becomes one --flag."""
    options: dict[str, dict[str, Any]] = {}
    for name, method in METHODS.items():
        for spec in method.options():
            options.setdefault(spec["name"], {**spec, "methods": []})["methods"].append(name)
    return options


def _add_method_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--method", required=required, choices=list(METHODS),
                        help=None if required else "a method's budget (without it: every method, with its options)")
    group = parser.add_argument_group("method options (each method takes its own)")
    for name, spec in _method_options().items():
        flag, dest = "--" + name.replace("_", "-"), f"option_{name}"
        bounds = f", {spec['low']:g}–{spec['high']:g}" if spec["low"] is not None else ""
        where = f" [{', '.join(spec['methods'])}]"
        if spec["type"] == "names":
            group.add_argument(flag, dest=dest, type=lambda s: tuple(x for x in s.split(",") if x), metavar="A,B",
                               help=f"{spec['help']}, comma-separated{where}")
        elif spec["type"] == "bool":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=f"{spec['help']}{where}")
        else:
            group.add_argument(flag, dest=dest, type={"int": int, "float": float}.get(spec["type"], str),
                               choices=spec["choices"], help=f"{spec['help']}{bounds}{where}")


def _add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", help="folder for zero-shot scores and range tests reused across runs (default "
                                        "$PETSTUDIO_CACHE, else ~/.cache/petstudio)")
    parser.add_argument("--no-cache", action="store_true", help="score the untuned model and run the range test again")


def _learning_rate(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, not {text[:40]!r}") from None


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number, `low` or more."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number, not {text[:40]!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"at least {low}, not {value}")
        return value
    return whole


def _caches(args) -> dict[str, Any]:
    """The zero-shot score and range-test caches (none with --no-cache), as tune's arguments."""
    from core.cache import ScoreCache, default_cache_folder
    from core.lr_range import ChoiceCache

    if args.no_cache:
        return {}
    folder = Path(args.cache) if args.cache else default_cache_folder()
    return {"zero_shot_cache": ScoreCache(folder / "zero-shot"), "lr_cache": ChoiceCache(folder / "lr-range")}


def _add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="training precision: auto is bf16 autocast where the hardware computes bf16 natively "
                             "(CPUs with avx512_bf16/AMX, GPUs from Ampere), fp32 elsewhere")


def _add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, default="studio",
                        help="whose settings to start from: PET Studio's defaults, or what the method's authors ran "
                             "for this backbone, task and media (your own options and --lr win)")


def _collect_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("option_"):]: v for k, v in vars(args).items() if k.startswith("option_") and v is not None}


class _Refused(Exception):
    """A command line the parser refuses, with argparse's message."""


class _Helped(Exception):
    """A command line that asked for help (-h, --help), with argparse's text."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), whose refusals come back to `main`, so that with
    --json they keep the contract: {"error": ...} as the last line, exit 2. No flag may be
    abbreviated: `--js` read as --json would print JSON where a refusal could not tell it was asked for."""

    def __init__(self, *arguments, **settings):
        super().__init__(*arguments, **{"allow_abbrev": False, **settings})

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise _Refused(f"{self.prog}: error: {message}")

    def print_help(self, file=None):   # argparse's help action: `main` prints it, as JSON under --json
        raise _Helped(self.format_help())


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m core", description="PET Studio's tuning engine")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="the methods and their options, or a method's budget on a backbone")
    info.add_argument("--model", help="backbone spec, e.g. openclip:ViT-B-32:openai (needed with --method)")
    _add_method_arguments(info, required=False)
    _add_recipe_argument(info)
    info.add_argument("--task", choices=TASKS, help="the task the recipe is for (default: the backbone's first)")
    info.add_argument("--video", action="store_true", help="the recipe for a video dataset")

    tune = commands.add_parser("tune", help="tune a method on a dataset and score it before and after")
    tune.add_argument("--model", required=True)
    tune.add_argument("--data", required=True, help="dataset folder or .zip")
    _add_method_arguments(tune)
    _add_recipe_argument(tune)
    tune.add_argument("--task", choices=TASKS, default="retrieval")
    tune.add_argument("--answers", type=lambda s: tuple(a for a in s.split(",") if a), default=(),
                      help="VQA: extra candidate answers, comma-separated")
    tune.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="video: frames sampled uniformly per clip")
    tune.add_argument("--shots", type=int, help="keep K training items (each with all its captions)")
    tune.add_argument("--epochs", type=int, default=5)
    tune.add_argument("--lr", type=_learning_rate, default="auto",
                      help="learning rate, or auto (default): found by a range test on the training data, kept in "
                           "the cache folder")
    tune.add_argument("--batch-size", type=int, default=32)
    tune.add_argument("--seed", type=int, default=0)
    _add_precision_argument(tune)
    _add_cache_argument(tune)
    tune.add_argument("--out", help="run folder (default runs/DATE-METHOD)")
    tune.add_argument("--epoch-metrics", action="store_true", help="also score the test split after every epoch")

    evaluate = commands.add_parser("eval", help="score a saved run on a dataset's test split")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--pet", required=True, help="run folder or its pet.safetensors")
    evaluate.add_argument("--data", required=True)

    bench = commands.add_parser("bench", help="time the forward and a training step of every method")
    bench.add_argument("--model", required=True)
    bench.add_argument("--batch", type=int, default=32)
    bench.add_argument("--steps", type=int, default=5)
    bench.add_argument("--methods", type=lambda s: s.split(","), help="comma-separated (default: all)")
    _add_precision_argument(bench)
    bench.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                       help="also time an end-to-end 16-shot Aurora tune (e2e_s)")

    sweep = commands.add_parser("sweep", help="several methods × several seeds on one dataset, compared")
    sweep.add_argument("--model", required=True)
    sweep.add_argument("--data", required=True, help="dataset folder or .zip")
    sweep.add_argument("--methods", required=True,
                       help="comma-separated, each with its options after a colon: aurora,vlpet:granularity=middleX")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    sweep.add_argument("--task", choices=TASKS, default="retrieval")
    sweep.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    sweep.add_argument("--shots", type=int, default=16, help="training items per run (0: all)")
    sweep.add_argument("--epochs", type=int, default=10)
    sweep.add_argument("--lr", type=_learning_rate, default="auto",
                       help="one learning rate for all, or auto (default): each run's found by a range test")
    sweep.add_argument("--batch-size", type=int, default=16)
    _add_precision_argument(sweep)
    _add_cache_argument(sweep)
    _add_recipe_argument(sweep)
    sweep.add_argument("--out", help="sweep folder (default runs/sweep-DATE)")

    export = commands.add_parser("export", help="a tuned run folded into its library's own format")
    export.add_argument("--model", required=True, help="the run's backbone spec")
    export.add_argument("--pet", required=True, help="run folder or its pet.safetensors")
    export.add_argument("--out", required=True, help="a new folder for the exported model")

    index = commands.add_parser("index", help="embed every picture and clip under a folder for `search` (resumable)")
    index.add_argument("--model", required=True, help="backbone spec (the run's, with --pet)")
    index.add_argument("--pet", help="a tuned run folder or its pet.safetensors (default: the untuned backbone)")
    index.add_argument("--media", required=True, help="the folder to index (searched recursively; links not followed)")
    index.add_argument("--out", required=True, help="the index folder: new or empty, or one this model started")
    index.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="video: frames sampled uniformly per clip")
    index.add_argument("--batch-size", type=_at_least(1), default=32)
    index.add_argument("--exact-up-to", type=_at_least(0), default=EXACT_UP_TO,
                       help="exact search up to this many files, an approximate (IVF) index above")

    search = commands.add_parser("search", help="the indexed files nearest a text or a picture/clip")
    search.add_argument("--index", required=True, help="an index folder written by `index`")
    search.add_argument("text", nargs="?", help="the text to search with")
    search.add_argument("--media", help="a picture or clip to search with instead")
    search.add_argument("--k", type=_at_least(1), default=10)
    search.add_argument("--model", help="default: the model that built the index (it must be the same)")
    search.add_argument("--pet", help="default: the run that built the index")

    bench_index = commands.add_parser("bench-index", help="time exact and approximate search over unit vectors")
    bench_index.add_argument("--items", type=_at_least(MIN_IVF_ITEMS), default=100_000)
    bench_index.add_argument("--dim", type=_at_least(1), default=512)
    bench_index.add_argument("--queries", type=_at_least(1), default=200)

    report = commands.add_parser("report", help="one self-contained HTML file of a run or a sweep")
    report.add_argument("source", help="a run folder or a sweep folder")
    report.add_argument("--out", required=True, help="the HTML file to write")

    demo = commands.add_parser("demo", help="16-shot tuning of the offline model on a novel part of its world")
    demo.add_argument("--out", help="folder for the dataset and the runs (default runs/demo-DATE)")

    for sub in (info, tune, evaluate, bench, sweep, export, index, search, bench_index, report, demo):
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress_printer():
    last = [-1.0]

    def show(p: Progress) -> None:
        if p.step == p.total_steps or not 0 <= p.elapsed - last[0] < 2.0:   # (a restart's attempt starts its clock again)
            last[0] = p.elapsed
            _note(f"step {p.step}/{p.total_steps}  epoch {p.epoch}  loss {p.loss:.4f}  eta {p.eta:.0f}s")

    return show


def _format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def run_info(args) -> dict[str, Any]:
    from core.backbones import load_backbone
    from core.pet import attach
    from core.runs import suggested_lr

    if args.method is None:
        return {"methods": [{"name": m.name, "label": m.label, "trains": m.trains, "default_lr": m.default_lr,
                             "options": m.options()}
                            for m in METHODS.values()]}
    if args.model is None:
        raise RunError("info --method needs --model: the budget is counted on a backbone")
    backbone = load_backbone(args.model, fallback_offline=True)
    task = args.task or backbone.tasks[0]
    if task not in backbone.tasks:
        raise RunError(f"{backbone.spec} serves {', '.join(backbone.tasks)}, not {task}")
    recipe = recipe_for(args.recipe, METHODS[args.method], Setting.of(backbone, task, args.video))
    handle = attach(backbone, args.method, {**recipe.options, **_collect_options(args)})
    total = backbone.num_backbone_params()
    if backbone.fallback_note:
        _note(f"note: {backbone.fallback_note}")
    if not backbone.pretrained:
        _note(f"note: {backbone.describe()}")
    return {"backbone": backbone.spec, "backbone_weights": backbone.weights, "backbone_params": total,
            "trainable_params": handle.num_trainable(),
            "trainable_pct": 100.0 * handle.num_trainable() / total, "groups": handle.budget(),
            "recipe": asdict(recipe),
            "lr": recipe.lr if recipe.lr is not None else "auto",
            "suggested_lr": suggested_lr(backbone.spec, args.method)}


def run_tune(args) -> dict[str, Any]:
    from core.runs import tune

    result = tune(args.model, args.data, args.method, _collect_options(args), shots=args.shots,
                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                  out=args.out, precision=args.precision, task=args.task, extra_answers=args.answers,
                  frames=args.frames, progress=_progress_printer(), epoch_metrics=args.epoch_metrics,
                  recipe=args.recipe, **_caches(args))
    if result.note:
        _note(f"note: {result.note}")
    _note(f"backbone: {result.backbone} — {result.backbone_weights}")
    summary = {k: getattr(result, k) for k in ("task", "method", "backbone", "trainable_params", "trainable_pct",
                                               "zero_shot", "tuned", "seconds", "out", "backbone_weights", "note")}
    choice = result.train.lr_choice
    return {**summary, **result.flag_values,
            "media_spread": asdict(result.media_spread) if result.media_spread else None, "lr": result.train.lr,
            "lr_given": result.train.lr_given,
            "lr_choice": {k: v for k, v in asdict(choice).items() if k not in ("lrs", "losses")} if choice else None,
            "restarts": [asdict(r) for r in result.train.restarts],
            "epoch_metrics": result.train.epoch_metrics}


def run_eval(args) -> dict[str, Any]:
    from core.runs import evaluate

    result = evaluate(args.model, args.pet, args.data)
    if not result["same_data_as_tuning"]:
        _note("note: this dataset differs from the one the run was tuned on")
    return result


def run_bench(args) -> dict[str, Any]:
    from core.bench import bench

    return bench(args.model, batch=args.batch, steps=args.steps, methods=args.methods, precision=args.precision,
                 e2e=args.e2e)


def run_sweep(args) -> dict[str, Any]:
    from core.sweep import parse_methods, sweep

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as error:
        raise RunError(f"--seeds must be whole numbers separated by commas, not {args.seeds!r}") from error
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}"

    def show(p) -> None:
        if p.step is None:
            _note(f"run {p.run + 1}/{p.runs}: {p.label}, seed {p.seed}")

    result = sweep(args.model, args.data, parse_methods(args.methods), seeds, out, shots=args.shots or None,
                   epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, task=args.task, frames=args.frames,
                   precision=args.precision, progress=show, recipe=args.recipe, **_caches(args))
    return result.to_json()


def run_export(args) -> dict[str, Any]:
    from core.export import export

    return export(args.model, args.pet, args.out)


def _embedding_model(model: str, pet: Optional[str]):
    """The backbone (with the run's PET weights, given a run) that embeds for an index."""
    from core.backbones import load_backbone
    from core.runs import load_run
    from core.trainer import pick_device

    if pet:
        backbone, handle, _ = load_run(model, pet)
        return backbone, handle
    return load_backbone(model).to(pick_device()), None


def run_index(args) -> dict[str, Any]:
    from core.media_index import build_index

    backbone, handle = _embedding_model(args.model, args.pet)
    pet = str(Path(args.pet).resolve()) if args.pet else None
    report = build_index(backbone, args.media, args.out, args.model, pet, handle, frames=args.frames,
                         batch_size=args.batch_size, exact_up_to=args.exact_up_to, progress=not args.json)
    if report.skipped:
        _note(f"skipped {len(report.skipped)} file(s), listed in {Path(report.index) / 'skipped.json'}:")
        for skipped in report.skipped[:10]:
            _note(f"  {skipped['path']}: {skipped['problem']}")
    return asdict(report)


def run_search(args) -> dict[str, Any]:
    from core.media_index import MediaIndex, MediaIndexError
    from core.query import media_query, text_query
    from core.tasks.encoding import evaluating

    if (args.text is None) == (args.media is None):
        raise MediaIndexError("search with a text or with --media FILE (one of them)")
    if args.k < 1:
        raise MediaIndexError("--k must be at least 1")
    index = MediaIndex(args.index)
    backbone, handle = _embedding_model(args.model or index.record.model,
                                        args.pet if args.model else (args.pet or index.record.pet))
    index.check_model(backbone, handle)
    note = None
    with torch.no_grad(), evaluating(backbone):
        if args.text is not None:
            _, query, note = text_query(backbone, args.text)
        else:
            _, query = media_query(backbone, args.media, index.record.frames)
    if note:
        _note(f"note: {note}")
    return {"index": str(index.folder), "model": index.record.model, "query": args.text or args.media, "note": note,
            "results": [asdict(found) for found in index.search(query, args.k)]}


def run_bench_index(args) -> dict[str, Any]:
    from core.bench import bench_index

    return bench_index(args.items, args.dim, args.queries)


def run_report(args) -> dict[str, Any]:
    from core.report import write_report

    return {"report": str(write_report(args.source, args.out))}


def run_demo(args) -> dict[str, Any]:
    from core import world
    from core.runs import tune

    out = Path(args.out) if args.out else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    data = world.write_part(out / "novel-colours", "novel-colours", items=200)
    _note(f"dataset: {data} (scenes in colours the offline model never saw; 50 test scenes)")
    rows = {}
    for method, options in (("zero_shot", {}), ("linear_probe", {}), ("lora", {}), ("aurora", {}),
                            ("vlpet", {"granularity": "middleY"})):
        result = tune("offline", data, method, options, shots=16, epochs=15, out=out / method)   # --lr auto
        rows[method] = {"trainable_params": result.trainable_params, "t2i_r1": result.tuned["t2i_r1"],
                        "i2t_r1": result.tuned["i2t_r1"], "seconds": result.seconds, "lr": result.train.lr,
                        **result.flag_values, "note": result.note}
        _note(f"{method:>13}: {result.trainable_params:>7,} params  t2i R@1 {result.tuned['t2i_r1']:5.1f}  "
              f"i2t R@1 {result.tuned['i2t_r1']:5.1f}  lr {result.train.lr:.2g}  ({result.seconds:.1f}s)"
              + (f"\n{'':>15}note: {result.note}" if result.note else ""))
    return {"model": "offline", "data": str(data), "shots": 16, "methods": rows}


def _learning_rate_line(result: dict[str, Any]) -> str:
    """How the run's learning rate came to be: found (and why, or reused), or given; restarts are in the note."""
    choice, finished = result["lr_choice"], f"{result['lr']:.2g}"
    if choice is None:
        return f"learning rate {finished}, as given" if result["lr_given"] else \
            f"learning rate {finished}: nothing was trained, so no range test ran"
    restarted = f"; it finished at {finished}" if result["restarts"] else ""
    reused = " (reused: measured by an earlier run on this data)" if choice["reused"] else ""
    return f"learning rate {choice['lr']:.2g}{restarted}; {choice['why']}{reused}"


def _human(command: str, result: dict[str, Any]) -> str:
    if command == "tune":
        return (f"{result['method']}: {result['trainable_params']:,} trainable ({result['trainable_pct']:.3f}%)\n"
                f"zero-shot: {_format_metrics(result['zero_shot'])}\n"
                f"tuned:     {_format_metrics(result['tuned'])}"
                f"{''.join(f'  ⚠ {flag}' for flag, key in FLAGS if result[key])}\n"
                f"{_learning_rate_line(result)}\n"
                f"saved to {result['out']} in {result['seconds']:.1f}s")
    if command == "eval":
        return _format_metrics(result["metrics"]) + "".join(f"  ⚠ when tuned, the run {flag}"
                                                            for flag, key in FLAGS if result[key])
    if command == "sweep":
        from core.sweep import MethodSummary
        from core.tasks import headline_metric

        key = headline_metric(result["task"])
        rows = [f"{m['label']:<32} {m['trainable_params']:>12,} {m['metrics'][key][0]:6.1f} ± {m['metrics'][key][1]:.1f}"
                + (f"  ⚠ {warning}" if (warning := MethodSummary(**m).warning) else "") for m in result["methods"]]
        if result["note"]:
            rows.append(f"note: {result['note']}")
        return "\n".join([f"{'method':<32} {'trainable':>12} {key}", *rows, f"saved under {result['out']}"])
    if command == "search":
        return "\n".join(f"{found['score']:.4f}  {found['path']}" for found in result["results"])
    if command == "index":
        return (f"{result['items']} files indexed ({result['embedded']} embedded now, {result['reused']} kept), "
                f"{len(result['skipped'])} skipped; {result['kind']} search; saved in {result['index']}")
    if command == "demo":
        return f"dataset and runs saved under {Path(result['data']).parent}"
    return json.dumps(result, indent=2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = any(argument == "--json" or argument.startswith("--json=") for argument in argv)
    try:
        args = _parser().parse_args(argv)
    except _Refused as refusal:
        if as_json:
            print(json.dumps({"error": str(refusal)}))
        print(refusal, file=sys.stderr)
        return 2
    except _Helped as helped:
        print(json.dumps({"help": str(helped)}) if as_json else str(helped), end="\n" if as_json else "")
        return 0
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every random init; we say it once
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # read by transformers at import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    joined = join_launched_group()   # under torchrun / accelerate launch: one process of several
    rank, world = rank_and_world()
    if world > 1:
        _note(f"process {rank} of {world} (torch.distributed, {dist.get_backend()})")
    try:
        return _run(args, rank)
    finally:
        if joined:
            leave_group()


def _run(args, rank: int) -> int:
    """The command's result on stdout (the first process's only), or its error and status 2."""
    handlers = {"info": run_info, "tune": run_tune, "eval": run_eval, "bench": run_bench, "sweep": run_sweep,
                "export": run_export, "index": run_index, "search": run_search, "bench-index": run_bench_index,
                "report": run_report, "demo": run_demo}
    try:
        result = handlers[args.command](args)
    except (*USER_ERRORS, MediaIndexError, QueryError) as error:
        if args.json and rank == 0:
            print(json.dumps({"error": str(error)}))
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result) if args.json else _human(args.command, result))
    return 0
