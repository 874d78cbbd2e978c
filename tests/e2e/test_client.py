"""The app through gradio_client, the real client, against `python app.py` on a local port."""
import base64
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import load_file

from core.data.samples import SAMPLES_ROOT
from core.result import RunResult
from core.tasks.vqa import normalize_answer
from core.world import write_part
from tests.e2e.conftest import PHOTOS, WORLD

TUNE_DEFAULTS = dict(model="offline", task="retrieval", method="aurora", options={}, shots=16, epochs=3, lr=None,
                     batch_size=8, precision="auto", answers="", frames=8)

# 16 shots × 2 captions in batches of 2, 50 epochs: 800 steps, far more than the tests wait for (they cancel it).
LONG_TUNING = {**TUNE_DEFAULTS, "method": "adapter", "epochs": 50, "batch_size": 2, "lr": 1e-3}


def tune(client, **changes):
    return client.predict(**{**TUNE_DEFAULTS, **changes}, api_name="/tune")


def choice_value(update):
    return update["value"] if isinstance(update, dict) else update


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The same world part the app writes (same part, size and seed), to know what it holds."""
    folder = write_part(tmp_path_factory.mktemp("world") / "part", "novel-colours", 64)
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    return folder, rows


def plot_array(value):
    """A plotly JSON array: a list, or a typed array (dtype, base64 bytes, shape)."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in value.get("shape", str(flat.size)).split(",")])
    return np.asarray(value)


def test_load_tune_ask_inspect_download(client, world, tmp_path):
    folder, rows = world
    names = sorted({r["image"] for r in rows})
    preview, stats, report, ask_pick, inspect_pick = client.predict(WORLD, api_name="/load_sample")
    assert "64 images" in stats and f"{sum('caption' in r for r in rows)} captions" in stats
    assert report.startswith("✓")
    assert len(preview) == 48 and all(p["caption"] for p in preview)
    assert [c[1] for c in ask_pick["choices"]] == names and ask_pick["value"] == names[0]

    card, loss_plot, weights, ask_run, _, status = tune(client)
    assert status.startswith("done in")
    run = choice_value(ask_run)
    assert run == "1 · aurora · offline" and run in card
    files = {Path(f).name: Path(f) for f in weights}
    info = json.loads(files["run.json"].read_text())
    state = load_file(str(files["pet.safetensors"]))
    assert sum(t.numel() for t in state.values()) == info["trainable_params"] > 0
    assert all(name.startswith("pet.") for name in state)
    # 16 shots × 2 captions in batches of 8: 4 steps an epoch, 3 epochs, the test split scored after each.
    assert len(info["train"]["step_losses"]) == 12 and len(info["train"]["epoch_metrics"]) == 3
    assert info["train"]["epoch_metrics"][-1] == info["tuned"]
    assert f"**{info['tuned']['t2i_r1']:.1f}%**" in card and f"| {info['zero_shot']['t2i_r1']:.1f}% |" in card
    assert f"{info['trainable_params']:,} trainable" in card
    assert len(plot_array(json.loads(loss_plot["plot"])["data"][0]["y"])) == 12

    frozen, tuned = client.predict("a small pink circle", run, "offline", api_name="/search_text")
    for hits in (frozen, tuned):
        assert len(hits) == 5
        scores = [float(h["caption"].split(" · ")[0]) for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h["caption"].split(" · ")[1] in names for h in hits)
    assert [h["caption"] for h in frozen] != [h["caption"] for h in tuned]   # the tuned model differs

    frozen, tuned = client.predict(None, names[0], run, "offline", api_name="/search_media")
    captions = {r["caption"] for r in rows if "caption" in r}
    for table in (frozen, tuned):
        assert [row[0] for row in table["data"]] == [1, 2, 3, 4, 5]
        assert all(row[3] in captions and row[2] in names for row in table["data"])
        assert [row[1] for row in table["data"]] == sorted((row[1] for row in table["data"]), reverse=True)

    answers = {normalize_answer(a) for r in rows if "answer" in r for a in [r["answer"]]}
    frozen, tuned, generated = client.predict(None, names[0], "what colour is the shape?", "", run, "offline",
                                              api_name="/answer")
    assert generated == ""   # CLIP ranks answers; it does not generate them
    for label in (frozen, tuned):
        confidences = [c["confidence"] for c in label["confidences"]]
        assert len(confidences) == 5 and confidences == sorted(confidences, reverse=True)
        assert 0 < sum(confidences) <= 1 + 1e-6
        assert label["label"] == label["confidences"][0]["label"]
        assert {c["label"] for c in label["confidences"]} <= answers

    budget, gates, overlay, curves = client.predict(run, names[0], api_name="/inspect")
    budget = json.loads(budget["plot"])
    assert f"Trainable {info['trainable_params']:,} of {info['backbone_params']:,}" in budget["layout"]["title"]["text"]
    bars = dict(zip(budget["data"][0]["y"], budget["data"][0]["x"]))
    assert bars["shared"] == info["groups"]["shared"] and bars["modes"] == info["groups"]["modes"]
    assert "Aurora" in json.loads(gates["plot"])["layout"]["title"]["text"]
    # step losses, epoch losses, metric per epoch, and the range test that found the learning rate
    assert [t["name"] for t in json.loads(curves["plot"])["data"]] == [
        "loss per step", "mean loss per epoch", "test t2i_r1 per epoch", "range test loss"]

    downloaded = client.predict(run, api_name="/download_weights")
    assert {Path(f).name for f in downloaded} == {"pet.safetensors", "run.json"}
    assert json.loads(Path(next(f for f in downloaded if f.endswith(".json"))).read_text())["tuned"] == info["tuned"]

    table, chart = client.predict(api_name="/compare")
    row = table["data"][0]
    # 16 test pictures after 12 steps: a run can end a picture below zero-shot, and is then flagged
    flags = RunResult.from_json(info).flags
    assert ("ends below its own zero-shot score" in flags) == (info["tuned"]["t2i_r1"] < info["zero_shot"]["t2i_r1"])
    shown = f"{run} ⚠ {'; '.join(flags)}" if flags else run
    assert row[:4] == [shown, "aurora", "offline", info["trainable_params"]]
    assert row[7] == round(info["tuned"]["t2i_r1"], 1)
    assert json.loads(chart["plot"])["data"][0]["x"] == [info["trainable_params"]]


def test_vlpet_gates_over_the_picture(client):
    client.predict(PHOTOS, api_name="/load_sample")
    _, _, _, ask_run, _, _ = tune(client, method="vlpet", options={"granularity": "middleX"}, epochs=1, shots=0)
    _, gates, overlay, _ = client.predict(choice_value(ask_run), "astronaut.png", api_name="/inspect")
    heatmaps = [t for t in json.loads(gates["plot"])["data"] if t["type"] == "heatmap"]
    assert len(heatmaps) == 2   # vision and text towers
    layers = json.loads(gates["plot"])["data"][0]["y"]
    assert len(layers) == 4   # the offline model's 4 layers
    overlay = json.loads(overlay["plot"])
    assert [t["type"] for t in overlay["data"]] == ["image", "heatmap"]
    patches = plot_array(overlay["data"][1]["z"])
    assert patches.shape == (8, 8)   # 64-pixel pictures, 8-pixel patches
    assert ((patches > 0) & (patches < 2)).all() and patches.std() > 0   # G = 2σ(·), per patch


def test_the_authors_recipe_sets_options_and_learning_rate(client, tmp_path):
    """Under the authors' recipe the app sends no knobs: the recipe's options and lr are used,
    the card says whose recipe it was, and run.json records it."""
    client.predict(PHOTOS, api_name="/load_sample")
    card, _, weights, _, _, _ = tune(client, method="aurora", recipe="authors", epochs=1, shots=4)
    assert "Recipe **authors**: WillDreamer/Aurora" in card and "lr 0.0001" in card and "gqt " in card
    assert "Learning rate found: the authors recipe's rate" in card   # the empty field: auto, which takes theirs
    info = json.loads(Path(next(w for w in weights if w.endswith("run.json"))).read_text())
    assert info["recipe"]["name"] == "authors" and info["config"]["gqt"] is True and info["train"]["warmup"] == 0.0


def test_an_empty_learning_rate_is_found_on_the_data_and_shown(client):
    """The Tune tab's learning rate starts empty: the run's range test chooses it, the card says how,
    and the training figure plots the test's loss against the learning rate, the chosen one marked."""
    client.predict(WORLD, api_name="/load_sample")
    card, loss_plot, weights, _, _, _ = tune(client, method="lora", epochs=2)
    info = json.loads(Path(next(w for w in weights if w.endswith("run.json"))).read_text())
    choice = info["train"]["lr_choice"]
    assert choice["why"].startswith("range test") and info["train"]["lr"] == choice["lr"]
    assert f"Learning rate found: {choice['why']}" in card and f"lr {choice['lr']:g}" in card
    curve = next(t for t in json.loads(loss_plot["plot"])["data"] if t["name"] == "range test loss")
    assert plot_array(curve["y"]).tolist() == pytest.approx(choice["losses"])
    again, *_ = tune(client, method="lora", epochs=2)   # the same run again: the test is not measured twice
    assert "measured by an earlier run on this data, reused" in again
    zero, *_ = tune(client, method="lora", epochs=2, lr=0)   # what the browser sends for an emptied field
    assert "measured by an earlier run on this data, reused" in zero
    with pytest.raises(AppError, match=r"Learning rate \(empty or 0: found on your data\) must be at least 0, "
                                       r"not -0\.1"):   # refused by the field itself, by its name
        tune(client, method="lora", epochs=2, lr=-0.1)


def test_validation_report_names_file_and_row(client, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(
        '{"image": "red.png", "caption": "a red square"}\n{"image": "missing.png", "caption": "gone"}\n'
        '{"image": "red.png", "caption": ""}\n', encoding="utf-8")
    preview, stats, report, ask_pick, _ = client.predict(
        [handle_file(str(tmp_path / "data.jsonl")), handle_file(str(tmp_path / "red.png"))], api_name="/upload_data")
    assert preview == [] and stats == "" and ask_pick["choices"] == []
    assert report.startswith("✗ **Validation: 2 problem(s)**")
    assert "data.jsonl → missing.png, row 2" in report and "data.jsonl, row 3: empty caption" in report


def test_zip_upload(client, tmp_path, world):
    folder, rows = world
    archive = tmp_path / "colours.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in folder.iterdir():
            z.write(path, f"colours/{path.name}")
    preview, stats, report, _, _ = client.predict([handle_file(str(archive))], api_name="/upload_data")
    assert "**colours** — 64 images" in stats and report.startswith("✓") and len(preview) == 48


def test_weights_round_trip_into_another_session(app_server, client):
    from gradio_client import Client

    client.predict(WORLD, api_name="/load_sample")
    _, _, weights, ask_run, _, _ = tune(client, method="lora", epochs=1)
    other = Client(app_server[0], verbose=False)
    other.predict(WORLD, api_name="/load_sample")
    card, other_run, _ = other.predict([handle_file(f) for f in weights], api_name="/load_weights")
    name = choice_value(other_run)
    assert name == "1 · lora · offline (uploaded)" and name in card
    info = json.loads(Path(next(f for f in weights if f.endswith(".json"))).read_text())
    table, _ = other.predict(api_name="/compare")
    assert table["data"][0][3] == info["trainable_params"]
    # The loaded run answers as the tuned one did.
    original = client.predict("a pink square", choice_value(ask_run), "offline", api_name="/search_text")[1]
    loaded = other.predict("a pink square", name, "offline", api_name="/search_text")[1]
    assert [h["caption"] for h in loaded] == [h["caption"] for h in original]


def test_only_safetensors_weights_load(client, tmp_path):
    (tmp_path / "pet.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(AppError, match=r"\.safetensors"):   # refused by the upload component itself
        client.predict([handle_file(str(tmp_path / "pet.pt")), handle_file(str(tmp_path / "run.json"))],
                       api_name="/load_weights")
    (tmp_path / "pet.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    scores = {"t2i_r1": 1.0}   # listable in Compare, were it loaded
    (tmp_path / "run.json").write_text(json.dumps({"method": "lora", "config": {}, "backbone": "offline",
                                                   "trainable_params": 1, "trainable_pct": 0.1,
                                                   "zero_shot": scores, "tuned": scores}))
    with pytest.raises(AppError, match="a scored run .one with 'tuned'. has no 'dataset'"):   # all its card shows
        client.predict([handle_file(str(tmp_path / "pet.safetensors")), handle_file(str(tmp_path / "run.json"))],
                       api_name="/load_weights")
    table, _ = client.predict(api_name="/compare")   # nothing half-loaded is listed
    assert not table["data"] or table["data"] == [[""] * len(table["headers"])]


def test_two_sessions_do_not_see_each_other(app_server):
    from gradio_client import Client

    url, sessions = app_server
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    before = set(sessions.iterdir()) if sessions.exists() else set()
    alice.predict(WORLD, api_name="/load_sample")
    _, _, _, alice_run, _, _ = tune(alice, method="linear_probe", epochs=1)
    run = choice_value(alice_run)
    bob.predict(PHOTOS, api_name="/load_sample")
    table, _ = bob.predict(api_name="/compare")
    assert not table["data"] or table["data"] == [[""] * len(table["headers"])]
    for api_name, arguments in (("/download_weights", (run,)), ("/inspect", (run, "astronaut.png"))):
        # Refused by Bob's own run list (Gradio checks choices per session), before the handler's own check.
        with pytest.raises(AppError, match="not in the list of choices|choose one of this session's runs"):
            bob.predict(*arguments, api_name=api_name)
    # Bob's gallery is his photos, not Alice's world.
    frozen, _ = bob.predict("a cat", "frozen model only", "offline", api_name="/search_text")
    assert all(not h["caption"].split(" · ")[1].startswith("novel-colours") for h in frozen)
    folders = set(sessions.iterdir()) - before
    assert len(folders) == 2
    runs = {f: list((f / "runs").glob("*")) if (f / "runs").exists() else [] for f in folders}
    assert sorted(len(r) for r in runs.values()) == [0, 1]


def test_live_loss_curve_then_cancel(client):
    client.predict(WORLD, api_name="/load_sample")
    job = client.submit(**LONG_TUNING, api_name="/tune")
    live = []
    for _ in range(600):   # the curve grows while the tuning runs (the page polls this every second)
        plot, status = client.predict(api_name="/live_progress")
        live = plot_array(json.loads(plot["plot"])["data"][0]["y"])
        if len(live) >= 3:
            break
        time.sleep(0.1)
    assert len(live) >= 3 and status.startswith("step ") and "/800 · epoch" in status and "ETA" in status
    assert "(live)" in json.loads(plot["plot"])["layout"]["title"]["text"]
    assert client.predict(api_name="/cancel") == "cancelling after the current step…"
    card, _, weights, _, _, status = job.result()
    info = json.loads(Path(next(f for f in weights if f.endswith(".json"))).read_text())
    assert info["train"]["cancelled"] and 3 <= len(info["train"]["step_losses"]) < 800
    assert "(cancelled early)" in card and status.endswith("(cancelled early)")


def test_unreachable_weights_fall_back_to_the_offline_model_and_say_so(client, world, tmp_path):
    from PIL import Image

    client.predict(WORLD, api_name="/load_sample")
    card, _, _, run, _, _ = tune(client, model="openclip:ViT-B-32:openai", method="bitfit", epochs=1)
    assert choice_value(run) == "1 · bitfit · offline"
    assert "**Note:** openclip:ViT-B-32:openai could not be fetched" in card and "bundled offline model" in card
    # A question about an uploaded picture, not one of the dataset's.
    Image.new("RGB", (64, 64), (236, 236, 236)).save(tmp_path / "blank.png")
    arguments = ("how many shapes are there?", "none", choice_value(run), "offline")
    blank, _, _ = client.predict(handle_file(str(tmp_path / "blank.png")), None, *arguments, api_name="/answer")
    picked, _, _ = client.predict(None, "novel-colours-00000.png", *arguments, api_name="/answer")
    answers = {normalize_answer(r["answer"]) for r in world[1] if "answer" in r}
    assert {c["label"] for c in blank["confidences"]} <= answers | {"none"}
    assert blank["confidences"] != picked["confidences"]


def test_a_video_set_without_tuning(client):
    _, stats, _, ask_pick, _ = client.predict(
        "Clips: 6 short videos with captions and questions (video-text, VQA)", api_name="/load_sample")
    assert "6 videos" in stats
    frozen, tuned = client.predict("an astronaut", "frozen model only", "offline", api_name="/search_text")
    assert tuned == [] and len(frozen) == 5
    assert all(set(h) == {"video", "caption"} and h["video"].endswith(".mp4") for h in frozen)
    frozen_answers, tuned_answers, _ = client.predict(None, ask_pick["value"], "what is in the picture?", "",
                                                      "frozen model only", "offline", api_name="/answer")
    assert not tuned_answers and frozen_answers["label"] == frozen_answers["confidences"][0]["label"]
    clip_answers = {normalize_answer(json.loads(line)["answer"]) for line in
                    (SAMPLES_ROOT / "clips" / "data.jsonl").read_text().splitlines() if "answer" in line}
    assert {c["label"] for c in frozen_answers["confidences"]} <= clip_answers


def test_uploads_over_the_size_limit_are_refused(client, tmp_path):
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (6 * 2**20))   # the test app's limit is 5 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size of 5242880 bytes"):
        client.predict([handle_file(str(big))], api_name="/upload_data")


def test_blip_vqa_typed_as_a_local_folder(client, tmp_path):
    from tests.conftest import write_tiny_blip_vqa

    model = f"blip-vqa:{write_tiny_blip_vqa(tmp_path / 'tiny-blip-vqa')}"
    client.predict(PHOTOS, api_name="/load_sample")
    card, _, _, run, _, _ = tune(client, model=model, task="vqa", method="vlpet", options={"granularity": "middleX"}, epochs=1,
                                 shots=0, lr=1e-3)
    run = choice_value(run)
    assert run == f"1 · vlpet · {model}" and "VQA accuracy" in card
    frozen, tuned, generated = client.predict(None, "astronaut.png", "what colour is the spacesuit?", "orange, red",
                                              run, model, api_name="/answer")
    assert generated.startswith("**frozen** generates: “") and f"**tuned ({run})** generates: “" in generated
    for label in (frozen, tuned):   # candidates ranked by the answer decoder's likelihood
        confidences = [c["confidence"] for c in label["confidences"]]
        assert confidences == sorted(confidences, reverse=True) and sum(confidences) <= 1 + 1e-6
    _, gates, overlay, _ = client.predict(run, "astronaut.png", api_name="/inspect")
    titles = [a["text"] for a in json.loads(gates["plot"])["layout"]["annotations"]]
    # the authors' design: the answer decoder has value-parallel adapters (a budget group), no gates
    assert titles == ["vision tower", "text tower"] and ", decoder " in card
    patches = plot_array(json.loads(overlay["plot"])["data"][1]["z"])
    assert patches.shape == (4, 4)   # 32-pixel pictures, 8-pixel patches


def test_tunings_wait_in_the_queue_for_each_other(app_server):
    from gradio_client import Client
    from gradio_client.utils import Status

    alice, bob = Client(app_server[0], verbose=False), Client(app_server[0], verbose=False)
    for client in (alice, bob):
        client.predict(WORLD, api_name="/load_sample")
    long = alice.submit(**LONG_TUNING, api_name="/tune")
    for _ in range(600):
        if alice.predict(api_name="/live_progress")[1].startswith("step "):
            break
        time.sleep(0.1)
    waiting = bob.submit(**{**TUNE_DEFAULTS, "method": "bitfit", "epochs": 1}, api_name="/tune")
    time.sleep(2)
    # One tuning at a time (PETSTUDIO_TUNING_CONCURRENCY=1): Bob's waits in the queue, not started.
    assert waiting.status().code == Status.IN_QUEUE and bob.predict(api_name="/live_progress")[1] == ""
    alice.predict(api_name="/cancel")
    assert "(cancelled early)" in long.result()[0]
    assert choice_value(waiting.result()[3]) == "1 · bitfit · offline"


def test_compare_methods_in_one_click(app_server, tmp_path):
    """Two methods × two seeds through /compare_methods: the table's mean ± std is the runs' own,
    every run is listed for Ask and Inspect, and the report comes with it."""
    import statistics

    from gradio_client import Client

    url, sessions = app_server
    client = Client(url, verbose=False)
    client.predict(WORLD, api_name="/load_sample")
    table, plot, report, status, ask_run, _ = client.predict(
        "offline", "retrieval", ["linear_probe", "lora"], {"lora": {"rank": 4}}, "0,1", 4, 1, 8, 8, "auto", "studio",
        api_name="/compare_methods")
    assert status.startswith("4 runs in ")
    rows = {row[0].split(" ⚠ ")[0]: row for row in table["data"]}   # a warning may follow the label
    assert set(rows) == {"linear_probe", "lora (rank=4)"}
    column = table["headers"].index("text→image R@1 (mean ± std)")
    runs = [c[1] for c in ask_run["choices"] if c[1] != "frozen model only"]
    assert len(runs) == 4 and all(" · seed " in r for r in runs)
    sweep = json.loads(next(sessions.glob("*/sweeps/*/runs/sweep.json")).read_text())
    for method in sweep["methods"]:
        infos = [json.loads((Path(folder) / "run.json").read_text()) for folder in method["runs"]]
        assert all(info["config"].get("rank", 4) == 4 for info in infos)   # the options sent for lora were used
        t2i = [info["tuned"]["t2i_r1"] for info in infos]
        assert rows[method["label"]][column] == f"{statistics.fmean(t2i):.1f} ± {statistics.stdev(t2i):.1f}"
        below = sum(info["tuned"]["t2i_r1"] < info["zero_shot"]["t2i_r1"] for info in infos)
        assert method["below_zero_shot"] == below   # and the table says so beside the method
        assert method["collapsed"] == sum(RunResult.from_json(info).collapsed for info in infos)
        said = {1: "ends below its own zero-shot score", 2: "end below their own zero-shot score"}.get(below)
        assert (f" ⚠ {below} of 2 runs {said}" in rows[method["label"]][0]) == (below > 0)
    page = Path(report).read_text()
    assert "plotly-graph-div" in page and "src=\"http" not in page
    assert len(json.loads(plot["plot"])["data"][0]["x"]) == 2
    # the comparison's runs are the session's like any other: in the run table, downloadable
    listed, _ = client.predict(api_name="/compare")
    assert sorted(row[0].split(" ⚠ ")[0] for row in listed["data"]) == sorted(runs)
    assert sorted(Path(f).name for f in client.predict(runs[0], api_name="/download_weights")) == \
        ["pet.safetensors", "run.json"]
    client.close()


def test_export_a_run_for_open_clip(app_server, client, tmp_path):
    client.predict(WORLD, api_name="/load_sample")
    _, _, _, run, _, _ = tune(client, method="lora", epochs=1)
    for _ in range(2):   # a session keeps only its latest export and report, and only what was sent
        archive = client.predict(choice_value(run), api_name="/export")
        report = client.predict(choice_value(run), api_name="/run_report")
    kept = sorted(f"{p.parts[-3]}/{p.name}" for p in app_server[1].glob("*/*/*/*")
                  if p.parts[-3] in ("exports", "reports"))
    assert kept == ["exports/exported.zip", "reports/report.html"], kept
    assert "<html" in Path(report).read_text()[:200].lower()
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["PETStudio-World.json", "README.md", "open_clip_model.safetensors"]
        z.extractall(tmp_path)
    import open_clip

    open_clip.add_model_config(tmp_path / "PETStudio-World.json")
    model, _, _ = open_clip.create_model_and_transforms("PETStudio-World",
                                                        pretrained=str(tmp_path / "open_clip_model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert "library_name: open_clip" in (tmp_path / "README.md").read_text()
