"""Hostile and broken run folders: every one is refused through the CLI with exit 2, one
{"error"} line naming the file (and the tensor or key), no traceback, and nothing written
outside the run folder; a broken model can never score well."""
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from core import checkpoint
from core.backbones import BackboneError, load_backbone, parse_spec
from core.cli import main
from core.data import read_dataset
from core.pet import PetError, attach
from core.runs import RunError, tune
from core.tasks import get_task
from tests.conftest import TINY


@pytest.fixture(scope="module")
def good_run(shapes, tmp_path_factory):
    """A LoRA run on the tiny model: (its run.json, its weights)."""
    out = tmp_path_factory.mktemp("good") / "run"
    tune(TINY, shapes, "lora", shots=2, epochs=1, out=out)
    return json.loads((out / "run.json").read_text()), (out / "pet.safetensors").read_bytes()


def _tree(root):
    """Every path under `root` with a hash of its bytes (None for folders)."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None) for p in root.rglob("*")}


def _with(info, **changes):
    return json.dumps({**info, **changes})


def _tensors(weights: bytes, change):
    """The run's weights with `change(state)` applied, as safetensors bytes."""
    from safetensors.torch import load

    state = load(weights)
    change(state)
    return state


FIRST = "pet.text.0.q.down"   # one of a LoRA run's tensors
WEIGHTS = "pet.safetensors"


def _set_first(value):
    def change(state):
        state[FIRST] = state[FIRST].clone()
        state[FIRST].view(-1)[0] = value
    return change

# (id, run.json text or a function of the good info, weights: bytes, a function of the state, or None for the
# good ones, the substring the error must contain)
CASES = [
    ("null", lambda i: "null", None, "run.json: must be a JSON object, not NoneType"),
    ("number", lambda i: "3.5", None, "run.json: must be a JSON object, not float"),
    ("list", lambda i: "[1, 2]", None, "run.json: must be a JSON object, not list"),
    ("string", lambda i: '"lora"', None, "run.json: must be a JSON object, not str"),
    ("empty object", lambda i: "{}", None, "run.json: has no 'method'"),
    ("not json", lambda i: "{'method': 'lora'", None, "run.json: not valid JSON"),
    ("not utf-8", lambda i: b"\xff\xfe{}", None, "run.json: not valid JSON"),
    ("NaN literal", lambda i: json.dumps(i).replace('"seconds": ', '"seconds": NaN, "x": '), None,
     "run.json: not valid JSON (NaN is not a number)"),
    ("infinite number", lambda i: json.dumps(i).replace('"seconds": ', '"seconds": 1e999, "x": '), None,
     "run.json: 'train'['seconds'] must be a finite number, not inf"),   # the first "seconds" is train's
    ("5000-digit number", lambda i: _with(i, seed=0).replace('"seed": 0', '"seed": ' + "9" * 5000), None,
     "run.json: not valid JSON"),
    ("nested 100000 deep", lambda i: '{"method": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
     "run.json: not valid JSON"),
    ("rank abc", lambda i: _with(i, config={"rank": "abc"}), None,
     "run.json: lora option rank must be a whole number, not 'abc'"),
    ("rank huge", lambda i: _with(i, config={"rank": 10**9}), None,
     "run.json: lora option rank must be between 1 and 256"),
    ("unknown option", lambda i: _with(i, config={"rnak": 2}), None, "run.json: method lora has no option rnak"),
    ("config a list", lambda i: _with(i, config=[1]), None, "run.json: 'config' must be a JSON object"),
    ("method a list", lambda i: _with(i, method=["lora"]), None, "run.json: 'method' must be a text"),
    ("unknown method", lambda i: _with(i, method="ia3"), None, "run.json: unknown method 'ia3'"),
    ("tuned a string", lambda i: _with(i, tuned="great"), None, "run.json: 'tuned' must be a JSON object"),
    ("tuned metric a string", lambda i: _with(i, tuned={"t2i_r1": "100"}), None,
     "run.json: 'tuned'['t2i_r1'] must be a number"),
    ("scored run missing its dataset", lambda i: json.dumps({k: v for k, v in i.items() if k != "dataset"}), None,
     "run.json: a scored run (one with 'tuned') has no 'dataset'"),
    ("tuned without its headline metric", lambda i: _with(i, tuned={}), None,
     "run.json: 'tuned' has no 't2i_r1', the retrieval task's headline metric"),
    ("no backbone parameters", lambda i: _with(i, backbone_params=0), None,
     "run.json: 'backbone_params' must be at least 1"),
    ("seed a string", lambda i: _with(i, seed="0"), None, "run.json: 'seed' must be a whole number"),
    ("seed negative", lambda i: _with(i, seed=-1), None, "run.json: 'seed' must not be negative"),
    ("seed too big", lambda i: _with(i, seed=2**40), None, "run.json: 'seed' must be between 0 and"),
    ("frames zero", lambda i: _with(i, frames=0), None, "run.json: 'frames' must be between 1 and 64"),
    ("unknown task", lambda i: _with(i, task="captioning"), None, "run.json: 'task' must be one of retrieval, vqa"),
    ("newer schema", lambda i: _with(i, schema_version=99), None,
     "run.json: 'schema_version' 99 is not one this PET Studio reads (1 to 2)"),
    ("train a list", lambda i: _with(i, train=[]), None, "run.json: 'train' must be a JSON object"),
    ("bf16 a number", lambda i: _with(i, train={**i["train"], "bf16": 1}), None,
     "run.json: 'train'['bf16'] must be true or false"),
    ("backbone a number", lambda i: _with(i, backbone=7), None, "run.json: 'backbone' must be a text"),
    ("found lr zero", lambda i: _with(i, train={**i["train"], "lr_choice": {"lr": 0.0, "why": "x"}}), None,
     "run.json: 'train'['lr_choice']: a learning-rate choice needs a rate from 1e-08 to 10"),
    ("found curve uneven", lambda i: _with(i, train={**i["train"], "lr_choice": {"lr": 0.1, "why": "x", "lrs": [0.1],
                                                                                 "losses": []}}), None,
     "as many losses as rates as it has steps"),
    ("found steps a lie", lambda i: _with(i, train={**i["train"], "lr_choice": {**i["train"]["lr_choice"],
                                                                                "steps": 10**15}}), None,
     "run.json: 'train'['lr_choice']: a learning-rate choice needs"),
    ("found lr not the one trained", lambda i: _with(i, train={**i["train"], "lr_choice": {**i["train"]["lr_choice"],
                                                                                           "lr": 9.0}}), None,
     "run.json: 'train'['lr_choice']['lr'] 9 is not the rate the run started at"),
    ("found seconds negative", lambda i: _with(i, train={**i["train"], "lr_choice": {**i["train"]["lr_choice"],
                                                                                     "seconds": -100.0}}), None,
     "run.json: 'train'['lr_choice']['seconds'] must not be negative"),
    ("lr negative", lambda i: _with(i, train={**i["train"], "lr": -1.0}), None,
     "run.json: 'train'['lr'] must not be negative"),
    ("lr huge", lambda i: _with(i, train={**i["train"], "lr": 1e9, "lr_choice": None}), None,
     "run.json: 'train'['lr'] must be at most 10"),
    ("restart upwards", lambda i: _with(i, train={**i["train"], "lr_choice": None, "restarts": [
        {"lr": 0.01, "step": 3, "reason": "x", "restarted_at": 0.1, "from_epoch": 0}]}), None,
     "run.json: 'train'['restarts'][0]: a restart goes from a rate above 0 and at most 10 to a lower one"),
    ("restart from an epoch it never had", lambda i: _with(i, train={**i["train"], "lr_choice": None, "restarts": [
        {"lr": 0.01, "step": 3, "reason": "x", "restarted_at": 0.001, "from_epoch": 99}]}), None,
     "from an epoch the run had"),
    ("tuned metric above 100", lambda i: _with(i, tuned={**i["tuned"], "t2i_r1": 1e300}), None,
     "run.json: 'tuned': 't2i_r1' is a percentage: it must be from 0 to 100, not 1e+300"),
    ("zero-shot rank below 1", lambda i: _with(i, zero_shot={**i["zero_shot"], "t2i_medr": 0.5}), None,
     "run.json: 'zero_shot': 't2i_medr' is a rank: it must be at least 1, not 0.5"),
    ("tuned metric unknown", lambda i: _with(i, tuned={**i["tuned"], "bogus": 5.0}), None,
     "run.json: 'tuned': 'bogus' is not a metric of the retrieval task"),
    ("zero-shot metric missing", lambda i: _with(i, zero_shot={k: v for k, v in i["zero_shot"].items() if k != "i2t_r1"}),
     None, "run.json: 'zero_shot' and 'tuned' must hold the same metrics"),
    ("epoch metric unknown", lambda i: _with(i, train={**i["train"], "epoch_metrics": [{**i["tuned"], "bogus": 5.0}]}),
     None, "run.json: 'train.epoch_metrics[0]': 'bogus' is not a metric of the retrieval task"),
    ("a number past any float", lambda i: json.dumps(i).replace('"seconds": ', '"seconds": 1' + "0" * 400 + ', "x": ', 1),
     None, "run.json: 'train'['seconds'] must be at most 9007199254740992"),
    ("an option past any float", lambda i: _with(i, config={"dropout": 10**400}), None,
     "run.json: lora option dropout must be a finite number"),
    ("a count past 2**53", lambda i: _with(i, trainable_params=2**64), None,
     "run.json: 'trainable_params' must be at most 9007199254740992"),
    ("restarted at one rate, finished at another", lambda i: _with(i, train={**i["train"], "lr_choice": None,
                                                                             "lr": 0.005, "restarts": [
        {"lr": 0.03, "step": 3, "reason": "x", "restarted_at": 0.01, "from_epoch": 0}]}), None,
     "a restart goes from a rate above 0 and at most 10 to a lower one, the rate the run goes on at"),
    ("found lr a string", lambda i: _with(i, train={**i["train"], "lr_choice": {"lr": "fast", "why": "x"}}), None,
     "run.json: 'train'['lr_choice']['lr'] must be a number"),
    ("other backbone", lambda i: _with(i, backbone="openclip:ViT-B-32"), None,
     "these weights were tuned on openclip:ViT-B-32, not openclip:PETStudio-Tiny"),
    ("weights garbage", None, b"garbage that is not safetensors", "pet.safetensors: not a readable safetensors file"),
    ("weights header lies", None, struct.pack("<Q", 10**12) + b"{}", f"{WEIGHTS}: not a readable safetensors file"),
    ("weights empty", None, b"", f"{WEIGHTS}: not a readable safetensors file"),
    ("NaN tensor", None, _set_first(float("nan")), f"{WEIGHTS}: lora weight {FIRST} holds NaN or infinite values"),
    ("Inf tensor", None, _set_first(float("inf")), f"{WEIGHTS}: lora weight {FIRST} holds NaN or infinite values"),
    ("fp16 tensor", None, lambda s: s.update({FIRST: s[FIRST].half()}),
     f"pet.safetensors: lora weight {FIRST} has dtype float16, expected float32"),
    ("int tensor", None, lambda s: s.update({FIRST: s[FIRST].long()}),
     f"pet.safetensors: lora weight {FIRST} has dtype int64, expected float32"),
    ("wrong shape", None, lambda s: s.update({FIRST: torch.zeros(3, 3)}),
     f"pet.safetensors: lora weight {FIRST} has shape (3, 3), expected"),
    ("extra tensor", None, lambda s: s.update({"pet.evil": torch.zeros(10)}),
     "pet.safetensors: lora weights do not match: missing [], unexpected ['pet.evil']"),
    ("missing tensor", None, lambda s: s.pop(FIRST), f"lora weights do not match: missing ['{FIRST}']"),
    # the budget a card, a comparison and a report show is the method's, not what run.json claims
    ("trainable count a lie", lambda i: _with(i, trainable_params=12), None,
     "run.json: 'trainable_params' says 12, but lora with these options on openclip:PETStudio-Tiny has"),
    ("groups a lie", lambda i: _with(i, groups={"vision": 1}), None,
     "run.json: 'groups' says {'vision': 1}, but lora with these options on openclip:PETStudio-Tiny has {"),
    ("backbone count a lie", lambda i: _with(i, backbone_params=10**9), None,
     "run.json: 'backbone_params' says 1000000000, but lora"),
    ("share a lie", lambda i: _with(i, trainable_pct=50.0), None,
     "run.json: 'trainable_pct' says 50, but"),
]


@pytest.mark.parametrize("name, info, weights, expected", CASES, ids=[c[0] for c in CASES])
def test_broken_run_folders_are_refused_by_eval(good_run, shapes, tmp_path, capsys, name, info, weights, expected):
    good_info, good_weights = good_run
    run = tmp_path / "run"
    run.mkdir()
    text = info(good_info) if info else json.dumps(good_info)
    (run / "run.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    if callable(weights):
        save_file(_tensors(good_weights, weights), str(run / "pet.safetensors"))
    else:
        (run / "pet.safetensors").write_bytes(good_weights if weights is None else weights)
    before, data_before = _tree(tmp_path), _tree(shapes)
    code = main(["eval", "--model", TINY, "--pet", str(run), "--data", str(shapes), "--json"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, (out, err)
    message = json.loads(lines[0])["error"]
    assert expected in message and "Traceback" not in err
    assert _tree(tmp_path) == before and _tree(shapes) == data_before


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20


def test_saving_refuses_non_finite_parameters(tiny, tmp_path):
    handle = attach(tiny, "lora")
    with torch.no_grad():
        handle.trainable_parameters()["pet.vision.1.v.up"][0, 0] = float("inf")
    with pytest.raises(PetError, match=r"lora parameter pet\.vision\.1\.v\.up holds NaN or infinite values"):
        checkpoint.save(tmp_path / "run", handle, {"method": "lora"})
    assert not any((tmp_path / "run").iterdir())


def test_a_broken_model_scores_zero_not_a_hundred(shapes, tmp_path):
    dataset = read_dataset(shapes, tmp_path)
    backbone = load_backbone(TINY)
    task = get_task("retrieval", dataset)
    test_set = task.prepare(backbone, dataset.split("test"))
    healthy = task.evaluate(backbone, test_set)
    assert 0 < healthy["t2i_r10"] < 100
    with torch.no_grad():
        backbone.model.visual.proj.fill_(float("nan"))     # every image embedding becomes NaN
    broken = task.evaluate(backbone, test_set)
    assert {k: v for k, v in broken.items() if "_r" in k} == dict.fromkeys(
        ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"), 0.0)
    n_images, n_captions = len(test_set.pixels), len(test_set)
    assert broken["t2i_medr"] == n_images and broken["i2t_medr"] == n_captions - 1


def test_a_broken_model_answers_nothing_right(tmp_path):
    from core.data.shapes import write_shapes_vqa_dataset

    dataset = read_dataset(write_shapes_vqa_dataset(tmp_path / "vqa", train_per_pair=0), tmp_path)
    backbone = load_backbone(TINY)
    task = get_task("vqa", dataset)
    test_set = task.prepare(backbone, dataset.items)
    with torch.no_grad():
        backbone.text.text_projection.fill_(float("nan"))
    assert task.evaluate(backbone, test_set) == {"vqa_acc": 0.0}


def test_a_failed_tune_leaves_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.csv").write_text("file,caption\ngone.png,x\n")
    with pytest.raises(Exception, match="gone.png, row 2: file not found"):
        tune(TINY, tmp_path / "data", "lora", out=tmp_path / "made")
    assert not (tmp_path / "made").exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(Exception, match="file not found"):
        tune(TINY, tmp_path / "data", "lora", out=given)
    assert given.is_dir() and not any(given.iterdir())


def test_leftovers_of_a_killed_save_do_not_block_the_folder(shapes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("pet.safetensors", "run.json"):     # what a run killed while saving leaves
        checkpoint.partial(out / name).write_bytes(b"half")
    tune(TINY, shapes, "bitfit", shots=2, epochs=1, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["pet.safetensors", "run.json"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".keep").write_text("mine")
    with pytest.raises(RunError, match="already exists and is not empty"):
        tune(TINY, shapes, "bitfit", out=tmp_path / "busy")
    assert (tmp_path / "busy" / ".keep").read_text() == "mine"


@pytest.mark.parametrize("spec, weights", [
    ("offline", "bundled"), ("openclip:ViT-B-32", "random"), ("openclip:ViT-B-32:openai", "tag"),
    ("openclip:ViT-B-32:/srv/x.pt", "path"), ("openclip:ViT-B-32:ckpt.safetensors", "path"),
    ("blip:base", "random"), ("blip:Salesforce/blip-itm-base-coco", "hub"), ("blip:/etc", "path"),
    ("blip:./local", "path"), ("blip:../up/one", "path"), ("blip-vqa:a/b/c", "path"), ("blip:~/m", "path"),
])
def test_specs_are_read_by_their_form(spec, weights):
    assert parse_spec(spec).weights == weights


@pytest.mark.parametrize("spec", ["blip:/etc", "blip:/does/not/exist", "openclip:ViT-B-32:/etc/passwd",
                                  "openclip:ViT-B-32:/nope.pt", "blip:../x"])
def test_a_remote_spec_may_not_name_a_server_path_and_learns_nothing_of_it(spec):
    with pytest.raises(BackboneError) as refused:
        load_backbone(spec, local_paths=False)
    assert str(refused.value) == (f"'{spec}' names a file or folder on the server, which is not allowed here: use the "
                                  f"bundled model (offline), an open_clip name with or without a pretrained tag, "
                                  f"or a Hugging Face hub id")


@pytest.mark.parametrize("flag, value, expected", [
    ("--shots", "0", "shots must be a whole number from 1 to 1000000, not 0"),
    ("--epochs", "-1", "epochs must be a whole number from 0 to 10000, not -1"),
    ("--lr", "nan", "lr must be a number from 1e-08 to 10.0, not nan"),
    ("--lr", "0", "lr must be a number from 1e-08 to 10.0, not 0.0"),
    ("--batch-size", "0", "batch-size must be a whole number from 1 to 4096, not 0"),
    ("--frames", "999", "frames must be a whole number from 1 to 64, not 999"),
    ("--out", "a\0b", "cannot be used as a run folder (embedded null byte)"),
    ("--out", "x" * 5000, "cannot be used as a run folder ([Errno 36] File name too long"),
])
def test_bad_settings_are_refused_before_anything_is_written(shapes, tmp_path, capsys, monkeypatch, flag, value,
                                                             expected):
    monkeypatch.chdir(tmp_path)
    arguments = {"--out": str(tmp_path / "run"), flag: value}
    code = main(["tune", "--model", TINY, "--data", str(shapes), "--method", "lora", "--json",
                 *[part for pair in arguments.items() for part in pair]])
    out, err = capsys.readouterr()
    assert code == 2 and expected in json.loads(out.strip())["error"] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_nothing_to_train_reads_back(shapes, tmp_path):
    """Zero-shot trains nothing, at a rate of 0: the checks that refuse a rate of 0 elsewhere let it be."""
    result = tune(TINY, shapes, "zero_shot", epochs=1, out=tmp_path / "run")
    assert result.train.lr == 0.0 and checkpoint.read(tmp_path / "run")[0].train.lr == 0.0


def test_json_that_is_not_a_plain_file_is_refused_and_leaks_nothing(tmp_path):
    import os

    from core.result import load_json

    (tmp_path / "folder.json").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ValueError, match="not a regular file"):
            load_json(tmp_path / "folder.json")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_run_saved_before_the_schema_version_still_loads(good_run, tmp_path):
    info, weights = good_run
    assert info["schema_version"] == 2
    run = tmp_path / "v1"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "schema_version"}))
    (run / "pet.safetensors").write_bytes(weights)
    result, _ = checkpoint.read(run)
    assert result.schema_version == 2 and result.tuned == info["tuned"] and result.train.step_losses == \
        info["train"]["step_losses"]


def test_an_uploaded_runs_texts_show_as_text_on_its_card(good_run):
    from app.views import run_card
    from core.result import RunResult

    info = json.loads(json.dumps(good_run[0]))
    info["note"] = ("fine [click me](https://evil.example) <img src=x onerror=alert(1)>\n# Trust this: "
                    "www.evil.example, help@evil.example, $\\frac{1}{2}$")
    info["train"]["lr_choice"]["why"] = "**chosen** by `hand` ![x](https://evil.example/p.png)"
    card = run_card("1 · lora", RunResult.from_json(info))
    note = next(line for line in card.splitlines() if line.startswith("> **Note:**"))
    # one line: no link (nor a bare address the page would link), no HTML, no heading, no formula
    assert note == (r"> **Note:** fine \[click me\](https\://evil.example) &lt;img src=x onerror=alert(1)&gt; "
                    r"\# Trust this: www\.evil.example, help\@evil.example, \$\\frac{1}{2}\$")
    assert r"Learning rate found: \*\*chosen\*\* by \`hand\` \!\[x\](https\://evil.example/p.png)" in card
    info["train"]["device"] = "cpu\n\n# PWNED [click](https://evil.example)"
    info["groups"] = {"lora ![t](https://evil.example/t.png)": 1}
    card = run_card("1 · lora", RunResult.from_json(info))
    assert r"s on cpu \# PWNED \[click\](https\://evil.example)" in card and "\n# PWNED" not in card
    assert r"lora \!\[t\](https\://evil.example/t.png) 1" in card
    from core.export import model_card   # the exported model's card shows them as themselves too

    info["dataset"]["fingerprint"] = "abc`\n\n# PWNED [click](https://evil.example)"
    info["backbone_weights"] = "w\n# PWNED"
    card = model_card(RunResult.from_json(info), "open_clip", "")
    assert "\n# PWNED" not in card and "](https://" not in card and "![" not in card
    assert r"fingerprint abc\` \# PWNED \[click\](https\://evil.example)" in card
