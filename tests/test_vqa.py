import json

import pytest

from core.data.shapes import write_shapes_vqa_dataset
from core.tasks import TaskError, get_task
from core.tasks.vqa import candidate_answers, normalize_answer, vqa_accuracy
from core.data import read_dataset
from tests.test_cli import cli


def test_normalisation_and_accuracy_on_hand_worked_answers():
    assert normalize_answer("  The Red, square! ") == "red square"
    assert normalize_answer("an apple") == "apple"
    assert vqa_accuracy("red", ["red"]) == 1.0 and vqa_accuracy("Red.", ["the red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    ten = ["two"] * 2 + ["2"] * 7 + ["three"]
    assert vqa_accuracy("two", ten) == pytest.approx(2 / 3)      # 2 annotators of 10
    assert vqa_accuracy("2", ten) == 1.0                          # 7 ≥ 3
    assert vqa_accuracy("three", ten) == pytest.approx(1 / 3)
    assert vqa_accuracy("four", ten) == 0.0


def test_candidates_are_the_datasets_answers_then_the_users(tmp_path):
    dataset = read_dataset(write_shapes_vqa_dataset(tmp_path / "d", train_per_pair=1, colours=("red", "blue"),
                                                    shapes=("circle",)), tmp_path / "w")
    assert candidate_answers(dataset.items, ("Green", "red")) == ["red", "circle", "blue", "green"]


def test_vqa_needs_questions_and_retrieval_needs_captions(shapes, tmp_path):
    with pytest.raises(TaskError, match="captions.csv: VQA needs rows with a question and an answer"):
        get_task("vqa", read_dataset(shapes, tmp_path / "a"))
    vqa_only = read_dataset(write_shapes_vqa_dataset(tmp_path / "v", train_per_pair=1), tmp_path / "b")
    with pytest.raises(TaskError, match="data.jsonl: retrieval needs captions"):
        get_task("retrieval", vqa_only)


def test_answer_ranking_learns_and_eval_reproduces(tmp_path):
    data = write_shapes_vqa_dataset(tmp_path / "vqa")
    code, tuned, stderr = cli("tune", "--task", "vqa", "--model", "openclip:PETStudio-Tiny", "--data", str(data),
                              "--method", "linear_probe", "--epochs", "10", "--lr", "1e-2",
                              "--answers", "black,hexagon", "--out", str(tmp_path / "run"))
    assert code == 0, stderr
    assert set(tuned["zero_shot"]) == set(tuned["tuned"]) == {"vqa_acc"}
    chance = 100 / 12   # 6 colours + 4 shapes + 2 extra answers
    assert tuned["tuned"]["vqa_acc"] >= 3 * chance and tuned["tuned"]["vqa_acc"] > tuned["zero_shot"]["vqa_acc"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["task"] == "vqa" and run["extra_answers"] == ["black", "hexagon"]
    assert run["train"]["epoch_losses"][-1] < 0.8 * run["train"]["epoch_losses"][0]
    code, evaluated, stderr = cli("eval", "--model", "openclip:PETStudio-Tiny", "--pet", str(tmp_path / "run"),
                                  "--data", str(data))
    assert code == 0, stderr
    assert evaluated["task"] == "vqa" and evaluated["metrics"] == tuned["tuned"]


def test_the_vqa_objective_keeps_its_answer_similarity_spread_for_the_guard(tmp_path):
    import torch

    from core.backbones import load_backbone
    from core.tasks import vqa
    from core.tasks.encoding import encode_media, media_spread
    from tests.conftest import TINY

    backbone = load_backbone(TINY, seed=0)
    dataset = read_dataset(write_shapes_vqa_dataset(tmp_path / "v", train_per_pair=1), tmp_path / "w")
    candidates = candidate_answers(dataset.items, ())
    data = vqa.prepare(backbone, dataset, dataset.split("train")[:4], candidates)
    objective = vqa.VqaObjective(backbone, data).eval()
    with torch.no_grad():
        objective(torch.arange(len(data)))
        images = encode_media(backbone, data.pixels[data.question_image])   # made apart from the objective
        logits = vqa.answer_scores(backbone, images, data.questions, candidates)
    assert float(objective.last_spread) == pytest.approx(float(logits.std(dim=1).mean()), rel=1e-4)
    assert float(objective.last_spread) > 1e-3
    # and its distinct pictures' spread (each picture once, however many questions it has)
    pictures = data.question_image.unique()
    assert len(pictures) < len(data)
    with torch.no_grad():
        expected = media_spread(torch.nn.functional.normalize(encode_media(backbone, data.pixels[pictures]), dim=-1))
    assert float(objective.last_media_spread) == pytest.approx(expected, rel=1e-4) and expected > 1e-3
    # chance's loss: what the batch would cost with every answer scored alike
    alike = torch.nn.functional.cross_entropy(torch.zeros(len(data), len(candidates)), data.targets)
    assert objective.chance_loss == pytest.approx(float(alike)) and float(alike) > 0
