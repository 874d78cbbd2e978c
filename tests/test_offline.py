"""The shipped offline model: loads through open_clip, knows the base world, learns novel parts."""
import json

import pytest

from core import world
from core.backbones import OFFLINE, OFFLINE_CHECKPOINT, load_backbone
from core.offline import part_test_set
from core.runs import tune
from core.tasks import retrieval
from tests.test_cli import cli


@pytest.fixture(scope="module")
def offline():
    return load_backbone(OFFLINE)


def test_the_shipped_checkpoint_loads_through_open_clip_and_knows_the_base_world(offline):
    assert offline.spec == "offline" and offline.pretrained and "bundled offline model" in offline.weights
    assert OFFLINE_CHECKPOINT.stat().st_size <= 25 * 2**20
    metrics = retrieval.evaluate(offline, part_test_set(offline, "base", items=50, seed=777))
    assert metrics["t2i_r1"] >= 10 * (100 / 50) and metrics["i2t_r1"] >= 10 * (100 / 50)


def test_the_model_card_reports_the_pretraining_run():
    report = json.loads((OFFLINE_CHECKPOINT.parent / "pretraining.json").read_text())
    card = (OFFLINE_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    assert f"--steps {report['steps']}" in card and f"{report['minutes']}" in card
    for part, r1 in report["zero_shot_t2i_r1"].items():
        assert f"| {part} | {r1:.1f} |" in card


def test_unreachable_weights_fall_back_to_the_offline_model_and_say_so(tmp_path):
    backbone = load_backbone("openclip:ViT-B-32:openai", fallback_offline=True)
    assert backbone.spec == OFFLINE and "openclip:ViT-B-32:openai could not be fetched" in backbone.fallback_note
    code, info, stderr = cli("info", "--model", "openclip:ViT-B-32:openai", "--method", "aurora")
    assert code == 0 and info["backbone"] == "offline"
    assert "note: openclip:ViT-B-32:openai could not be fetched (no network, or the hub is unreachable)" in stderr


def test_aurora_16_shot_beats_zero_shot_on_a_novel_part(tmp_path):
    data = world.write_part(tmp_path / "novel", "novel-colours", items=200)   # 50 test scenes
    # No learning rate given: the one suggested for the model actually used (the offline one) learns.
    result = tune("openclip:ViT-B-32:openai", data, "aurora", shots=16, epochs=15, seed=0, out=tmp_path / "run")
    assert result.backbone == "offline" and "could not be fetched" in result.note and result.train.lr == 1e-2
    zero_shot, tuned = result.zero_shot, result.tuned
    assert tuned["t2i_r1"] >= zero_shot["t2i_r1"] + 8 and tuned["i2t_r1"] >= zero_shot["i2t_r1"] + 8, (zero_shot, tuned)


def test_the_model_card_measures_every_method_at_its_suggested_rate_and_each_beats_zero_shot():
    from core.runs import suggested_lr

    comparison = json.loads((OFFLINE_CHECKPOINT.parent / "compare.json").read_text())
    card = (OFFLINE_CHECKPOINT.parent / "MODEL_CARD.md").read_text()
    for row in comparison["rows"]:
        method = row["method"].split(" ")[0]
        assert row["lr"] == suggested_lr(OFFLINE, method), row["method"]
        assert f"| {row['method']} | {row['trainable_params']:,} |" in card
        if method != "zero_shot":   # text→image, the headline: above the untuned model at the suggested rate
            assert row["t2i_r1"] > row["zero_shot_t2i_r1"], row["method"]
