"""Sweeps (core/sweep.py) and reports (core/report.py): methods × seeds in one job, zero-shot
scored once, means and stds over seeds, cancel keeping what finished, one self-contained HTML."""
import json
import shutil
import statistics
from pathlib import Path

import pytest
from safetensors.torch import save_file

from core import checkpoint
from core.backbones import load_backbone
from core.cli import main
from core.report import write_report
from core.runs import RunError
from core.sweep import MethodChoice, parse_methods, read_sweep, sweep
from core.tasks import retrieval
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """PETStudio-Tiny's random weights as a local checkpoint: the same backbone whatever the seed."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in load_backbone(TINY).open_clip_state_dict().items()}, str(path))
    return f"{TINY}:{path}"


@pytest.fixture(scope="module")
def swept(shapes, tiny_weights, tmp_path_factory):
    """Two methods × two seeds, counting how often the test split is scored."""
    scored = []
    evaluate = retrieval.evaluate

    def counting(backbone, data, *rest):
        scored.append(len(data))
        return evaluate(backbone, data, *rest)

    retrieval.evaluate = counting
    try:
        out = tmp_path_factory.mktemp("sweep") / "sweep"
        result = sweep(tiny_weights, shapes, parse_methods("lora:rank=4,vlpet:granularity=middleX"), [0, 1], out,
                       shots=4, epochs=2, lr=1e-2)
    finally:
        retrieval.evaluate = evaluate
    return result, scored


def test_means_and_stds_are_the_individual_runs(swept):
    result, _ = swept
    assert [m.label for m in result.methods] == ["lora (rank=4)", "vlpet (granularity=middleX)"]
    assert not result.cancelled and result.seeds == [0, 1]
    for summary in result.methods:
        runs = [checkpoint.read(folder)[0] for folder in summary.runs]
        assert [r.seed for r in runs] == [0, 1] and all(r.config == runs[0].config for r in runs)
        for key, (mean, std) in summary.metrics.items():
            values = [r.tuned[key] for r in runs]
            assert mean == pytest.approx(statistics.fmean(values)) and std == pytest.approx(statistics.stdev(values))
        assert summary.trainable_params == runs[0].trainable_params
        assert summary.seconds == pytest.approx(statistics.fmean(r.seconds for r in runs))
        assert summary.file_bytes == (checkpoint.read(summary.runs[0])[1]).stat().st_size
    assert read_sweep(result.out) == result


def test_zero_shot_is_scored_once(swept):
    result, scored = swept
    assert len(scored) == 1 + 4     # zero-shot once, then each of the four tuned runs
    zero_shots = {json.dumps(checkpoint.read(f)[0].zero_shot) for m in result.methods for f in m.runs}
    assert len(zero_shots) == 1


def test_cancel_keeps_what_finished(shapes, tmp_path):
    asked = {"cancel": False}

    def progress(p):
        if p.run == 2 and p.step is not None:   # the third run has taken a step
            asked["cancel"] = True

    result = sweep(TINY, shapes, [MethodChoice("bitfit"), MethodChoice("linear_probe")], [0, 1], tmp_path / "s",
                   shots=4, epochs=3, lr=1e-2, batch_size=2, progress=progress, cancel=lambda: asked["cancel"])
    assert result.cancelled and [m.label for m in result.methods] == ["bitfit"]
    assert len(result.methods[0].runs) == 2
    interrupted, _ = checkpoint.read(tmp_path / "s" / "linear_probe-seed0")
    assert interrupted.train.cancelled    # kept on disk, marked, outside the means
    assert not (tmp_path / "s" / "linear_probe-seed1").exists()


def test_a_run_that_diverges_past_its_restarts_ends_itself_not_the_sweep(shapes, tmp_path, monkeypatch, capsys):
    """The trainer gives up on a run after two restarts (TrainingDiverged); the sweep counts it, says
    so beside the method's numbers, names a method left with no result, and goes on."""
    import core.sweep
    from core.trainer import TrainingDiverged

    real = core.sweep.tune

    def tune(model, data, method, options, **settings):
        if method == "bitfit" or settings["seed"] == 0:
            raise TrainingDiverged(f"the loss was not finite at step 3 with lr 0.01 (seed {settings['seed']})")
        return real(model, data, method, options, **settings)

    monkeypatch.setattr(core.sweep, "tune", tune)
    code = main(["sweep", "--model", TINY, "--data", str(shapes), "--methods", "linear_probe,bitfit", "--seeds", "0,1",
                 "--shots", "4", "--epochs", "1", "--lr", "0.01", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    result = read_sweep(tmp_path / "s")
    assert code == 0 and [m.label for m in result.methods] == ["linear_probe"]
    probe = result.methods[0]
    message = "the loss was not finite at step 3 with lr 0.01 (seed 0)"
    assert len(probe.runs) == 1 and probe.diverged == [f"seed 0: {message}"]
    assert probe.warning == ("1 of 2 runs diverged after every restart and have no result (the means are of the "
                             f"others): seed 0: {message}")
    assert result.note == f"bitfit: every run diverged after its restarts (seed 0: {message})"
    assert f"⚠ {probe.warning}" in out and f"note: {result.note}" in out
    report = write_report(tmp_path / "s", tmp_path / "report.html").read_text()
    assert f"<b>Note:</b> {result.note}" in report and "linear_probe, seed 1</h2>" in report   # the run it shows
    info = json.loads((tmp_path / "s" / "sweep.json").read_text())
    for method in info["methods"]:
        del method["diverged"]   # a sweep.json from before runs could diverge alone
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(info))
    assert read_sweep(tmp_path / "s").methods[0].diverged == []


def test_a_sweep_in_which_every_run_diverged_still_names_its_data(shapes, tmp_path, monkeypatch):
    import core.sweep
    from core.data import read_dataset
    from core.trainer import TrainingDiverged

    def tune(*arguments, **settings):
        raise TrainingDiverged("the loss was not finite at step 3 with lr 0.01")

    monkeypatch.setattr(core.sweep, "tune", tune)
    result = sweep(TINY, shapes, parse_methods("bitfit"), [0], tmp_path / "s", shots=4, epochs=1, lr=0.01)
    assert result.methods == [] and result.fingerprint == read_dataset(shapes, tmp_path / "w").fingerprint
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.json"]   # its scratch folder is gone


def _tampered(swept, tmp_path, change) -> Path:
    """A copy of the swept folder (its runs too) whose sweep.json has had `change` applied."""
    copy = tmp_path / "copy"
    shutil.copytree(swept[0].out, copy)
    info = json.loads((copy / "sweep.json").read_text())
    text = change(info)
    (copy / "sweep.json").write_text(text if isinstance(text, str) else json.dumps(info))
    return copy


def test_a_sweep_reads_its_runs_inside_its_own_folder_wherever_it_was_started(swept, tmp_path, capsys):
    """sweep.json names runs as the sweep was started (relative to that working folder, perhaps);
    a reader takes each by its name inside the sweep folder, and nothing outside it."""
    elsewhere = "/somewhere/else/"
    copy = _tampered(swept, tmp_path, lambda info: [m.update(runs=[elsewhere + Path(r).name for r in m["runs"]])
                                                    for m in info["methods"]])
    result = read_sweep(copy)
    assert result.out == str(copy) and all(Path(r).parent == copy for m in result.methods for r in m.runs)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html"), "--json"]) == 0
    outside = _tampered(swept, tmp_path / "b", lambda info: info["methods"][0].update(runs=[str(swept[0].out)]))
    assert main(["report", str(outside), "--out", str(tmp_path / "o.html"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] == \
        f"{outside / 'sweep.json'}: its run folder sweep is missing from {outside}, or leads outside it"
    linked = _tampered(swept, tmp_path / "c", lambda info: None)
    run = Path(read_sweep(linked).methods[1].runs[0])
    shutil.rmtree(run)
    run.symlink_to(Path(swept[0].methods[1].runs[0]))   # a run of that name that leads outside the folder
    with pytest.raises(RunError, match=f"its run folder {run.name} is missing from {linked}, or leads outside it"):
        read_sweep(linked)
    run.unlink()
    shutil.copytree(Path(swept[0].methods[1].runs[0]), run)
    (run / "run.json").unlink()
    (run / "run.json").symlink_to(Path(swept[0].methods[1].runs[0]) / "run.json")   # its file, a link out
    with pytest.raises(RunError, match=f"its run folder {run.name} is missing from {linked}, or leads outside it"):
        read_sweep(linked)
    (run / "run.json").unlink()
    (run / "run.json").symlink_to("run.json")   # a loop
    with pytest.raises(RunError, match=f"its run folder {run.name} is missing from {linked}, or leads outside it"):
        read_sweep(linked)


def test_a_sweep_whose_run_is_not_one_of_its_own_is_refused_by_the_report(swept, tmp_path, capsys):
    copy = _tampered(swept, tmp_path, lambda info: None)
    run = Path(read_sweep(copy).methods[0].runs[0])
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "tuned"}))   # never scored
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] == \
        f"{run}: not a scored retrieval run, as the sweep it is in says"


def test_a_method_named_twice_is_refused_before_the_sweep_starts(shapes, tmp_path):
    with pytest.raises(RunError, match="lora is named twice"):
        sweep(TINY, shapes, parse_methods("lora,lora"), [0], tmp_path / "s", shots=4, epochs=1, lr=0.01)
    assert not (tmp_path / "s").exists()


NAN_MEAN = lambda info: json.dumps(info).replace('"metrics": {"i2t_r1": [', '"metrics": {"i2t_r1": [NaN, ', 1)
HOSTILE_SWEEPS = [   # (id, change to sweep.json, what the refusal says)
    ("not an object", lambda info: "[1, 2]", "sweep.json must be a JSON object"),
    ("nested 100000 deep", lambda info: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("NaN literal", NAN_MEAN, "not valid JSON (NaN is not a number)"),
    ("methods a text", lambda info: info.update(methods="x"), "sweep.json['methods'] must be a list"),
    ("no runs", lambda info: info["methods"][0].update(runs=[]), "'methods'[0]['runs'] must name one or more run"),
    ("a run named ..", lambda info: info["methods"][0].update(runs=[".."]), "must name one or more run folders"),
    ("params a text", lambda info: info["methods"][0].update(trainable_params="many"),
     "sweep.json['methods'][0]['trainable_params'] must be a whole number, not 'many'"),
    ("a mean alone", lambda info: info["methods"][0]["metrics"].update(t2i_r1=[5.0]),
     "sweep.json['methods'][0]['metrics']['t2i_r1'] must be a list of 2 entries"),
    ("a mean above 100", lambda info: info["methods"][0]["metrics"].update(t2i_r1=[1e6, 0.0]),
     "'t2i_r1' is a percentage: it must be from 0 to 100, not 1e+06"),
    ("a negative std", lambda info: info["methods"][0]["metrics"].update(t2i_r1=[5.0, -1.0]),
     "sweep.json['methods'][0]['metrics']['t2i_r1'][1] must not be negative"),
    ("zero-shot missing", lambda info: info["methods"][0].update(zero_shot={}),
     "'methods'[0]: its metrics must be the retrieval task's"),
    ("seeds a number", lambda info: info.update(seeds=5), "sweep.json['seeds'] must be a list"),
    ("flagged a text", lambda info: info["methods"][0].update(below_zero_shot="yes"),
     "sweep.json['methods'][0]['below_zero_shot'] must be a whole number, not 'yes'"),
    ("more flagged than runs", lambda info: info["methods"][0].update(collapsed=5),
     "'methods'[0]: more runs flagged or restarted than it has runs"),
    ("unknown method", lambda info: info["methods"][0].update(method="ia3"), "unknown method 'ia3'"),
    ("option out of range", lambda info: info["methods"][0].update(options={"rank": 10**9}),
     "lora option rank must be between 1 and 256"),
    ("unknown task", lambda info: info.update(task="captioning"), "'task' must be one of retrieval, vqa"),
    ("unknown recipe", lambda info: info.update(recipe="mine"), "unknown recipe 'mine'"),
    ("a count past 2**53", lambda info: info["methods"][0].update(trainable_params=2**64),
     "sweep.json['methods'][0]['trainable_params'] must be at most 9007199254740992"),
    ("a number past any float", lambda info: json.dumps(info).replace('"seconds": ', '"seconds": 1' + "0" * 400 + ", \"x\": ", 1),
     "sweep.json['methods'][0]['seconds'] must be at most 9007199254740992"),   # the first "seconds" is a method's
]


@pytest.mark.parametrize("name, change, expected", HOSTILE_SWEEPS, ids=[c[0] for c in HOSTILE_SWEEPS])
def test_a_broken_sweep_json_is_refused_naming_the_file(swept, tmp_path, capsys, name, change, expected):
    copy = _tampered(swept, tmp_path, change)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html"), "--json"]) == 2
    out, err = capsys.readouterr()
    message = json.loads(out.strip().splitlines()[-1])["error"]
    assert message.startswith(f"{copy / 'sweep.json'}: not a sweep written by PET Studio (") and expected in message
    assert "Traceback" not in err and not (tmp_path / "r.html").exists()


def test_methods_are_read_with_their_options():
    choices = parse_methods('aurora, vlpet:granularity=middleX;reduction=4 ,lora:rank=8;towers=["vision", "text"],'
                            'adapter:towers=vision')
    assert [(c.method, c.options) for c in choices] == [
        ("aurora", {}), ("vlpet", {"granularity": "middleX", "reduction": 4}),
        ("lora", {"rank": 8, "towers": ["vision", "text"]}), ("adapter", {"towers": ["vision"]})]
    for text, message in (("ia3", "unknown method 'ia3'"), ("lora:rnak=2", "method lora has no option rnak"),
                          ("lora:rank", "write options as name=value"), ("", "name at least one method")):
        with pytest.raises(ValueError, match=message):
            parse_methods(text)


def test_the_report_is_one_self_contained_file(swept, tmp_path, capsys):
    result, _ = swept
    assert main(["report", result.out, "--out", str(tmp_path / "sweep.html"), "--json"]) == 0
    page = (tmp_path / "sweep.html").read_text()
    assert "src=\"http" not in page and "src='http" not in page and "Plotly" in page    # plotly.js inline
    assert page.count("class=\"plotly-graph-div\"") == 1 + 3 * len(result.methods)   # chart, then each method's
    assert result.command in page.replace("&#x27;", "'").replace("&quot;", '"')
    assert "lora (rank=4)" in page and "± " in page
    run = write_report(result.methods[1].runs[0], tmp_path / "run.html")
    text = run.read_text()
    assert "python -m core tune --model" in text and "--granularity middleX" in text
    with pytest.raises(RunError, match="neither a run folder"):
        write_report(tmp_path, tmp_path / "x.html")


def test_a_report_reads_the_gates_on_one_backbone_and_leaves_it_as_it_was(swept, tmp_path, monkeypatch):
    """A sweep's report loads its backbone once, and only for methods with gates to show; a backbone
    lent to it (the app's shared one) gets each run's weights for its gates and is given back as it was."""
    import re
    from contextlib import contextmanager

    import torch
    import core.report

    result, _ = swept
    loads = []
    real = core.report.load_backbone
    monkeypatch.setattr(core.report, "load_backbone", lambda *args, **kwargs: loads.append(args) or real(*args, **kwargs))
    page = write_report(result.out, tmp_path / "sweep.html").read_text()
    assert loads == [(result.model, 0)]   # VL-PET's gates; LoRA has none to show
    assert "lora has no gates or mode vectors to show" in page and "the gates need the run" not in page
    lent = real(result.model, 0).eval()
    before = {name: t.clone() for name, t in lent.state_dict().items()}
    asked = []

    @contextmanager
    def lend(spec, seed):
        asked.append((spec, seed))
        yield lent

    lent_page = write_report(result.out, tmp_path / "lent.html", backbones=lend).read_text()
    assert asked == [(result.model, 0)] and len(loads) == 1 and lent.pet is None
    after = lent.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    figure_ids = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    assert figure_ids.sub("", lent_page) == figure_ids.sub("", page)   # the same gates, read on either


def test_a_report_escapes_what_a_run_json_says(swept, tmp_path):
    result, _ = swept
    run = tmp_path / "run"
    run.mkdir()
    info = json.loads((Path(result.methods[0].runs[0]) / "run.json").read_text())
    info["train"]["device"] = "<img src=x onerror=alert(1)>"
    info["dataset"]["fingerprint"] = "<script>alert(2)</script>"
    (run / "run.json").write_text(json.dumps(info))
    (run / "pet.safetensors").write_bytes((Path(result.methods[0].runs[0]) / "pet.safetensors").read_bytes())
    page = write_report(run, tmp_path / "report.html", local_paths=False).read_text()
    assert "<img src=x" not in page and "<script>alert" not in page and "&lt;img src=x" in page


def test_unusable_sweep_and_report_paths_are_messages(shapes, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv in (["sweep", "--model", TINY, "--data", str(shapes), "--methods", "lora", "--out", str(tmp_path / "file")],
                 ["report", str(tmp_path), "--out", str(tmp_path / "r.html")]):
        assert main([*argv, "--json"]) == 2
        assert json.loads(capsys.readouterr().out.strip())["error"]


def test_a_sweep_does_not_start_a_run_its_gpu_time_cannot_hold(shapes, tiny_weights, tmp_path, monkeypatch):
    """With the grant's end closer than the longest finished run, the next run is not started
    (ZeroGPU would kill it, and the sweep with it): the finished runs are kept and the note says why."""
    import time
    from types import SimpleNamespace

    import core.sweep

    deadline = time.monotonic() + 10_000   # far: no run is cut inside
    monkeypatch.setattr(core.sweep, "time", SimpleNamespace(monotonic=lambda: deadline - 0.01,
                                                            perf_counter=time.perf_counter))
    result = sweep(tiny_weights, shapes, parse_methods("lora,bitfit"), [0], tmp_path / "sweep", shots=4, epochs=1,
                   deadline=deadline)
    assert result.cancelled and [m.method for m in result.methods] == ["lora"]
    assert "the GPU time ran out before run 2 of 2" in result.note
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["note"] == result.note
