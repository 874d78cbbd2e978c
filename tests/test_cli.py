"""The CLI end to end, as a script would use it: one JSON object on the last line of stdout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "core", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_tune_learns_then_eval_reproduces_the_metrics(shapes, tmp_path):
    code, tuned, stderr = cli("tune", "--model", "openclip:PETStudio-Tiny", "--data", str(shapes),
                              "--method", "linear_probe", "--epochs", "10", "--lr", "1e-2",
                              "--seed", "0", "--out", str(tmp_path / "run"), "--epoch-metrics")
    assert code == 0, stderr
    per_epoch = tuned["epoch_metrics"]   # the test split scored after each epoch
    assert len(per_epoch) == 10 and per_epoch[-1] == tuned["tuned"] and per_epoch[0] != per_epoch[-1]
    assert set(tuned) >= {"method", "trainable_params", "zero_shot", "tuned", "seconds", "out"}
    assert tuned["method"] == "linear_probe" and tuned["trainable_params"] == 64 * 64 + 48 * 64
    assert set(tuned["tuned"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    chance = 100 / 24
    assert tuned["tuned"]["t2i_r1"] >= 4 * chance and tuned["tuned"]["i2t_r1"] >= 3 * chance
    assert tuned["tuned"]["t2i_r1"] > tuned["zero_shot"]["t2i_r1"]
    assert "random init (seed 0)" in stderr and "step 50/50" in stderr  # 144 training captions in batches of 32, 10 epochs
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    losses = run["train"]["epoch_losses"]
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]
    assert run["backbone"] == "openclip:PETStudio-Tiny" and run["config"] == {"pull": 0.0} and run["versions"]["torch"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pet.safetensors", "run.json"]

    code, evaluated, stderr = cli("eval", "--model", "openclip:PETStudio-Tiny", "--pet", str(tmp_path / "run"),
                                  "--data", str(shapes))
    assert code == 0, stderr
    assert evaluated["metrics"] == tuned["tuned"] and evaluated["same_data_as_tuning"] is True


def test_info_reports_the_budget():
    code, info, _ = cli("info", "--model", "openclip:PETStudio-Tiny", "--method", "lora", "--rank", "4",
                        "--towers", "vision")
    assert code == 0
    assert info["trainable_params"] == 2 * 3 * 4 * (64 + 64) and info["groups"] == {"lora": 3072}
    assert info["backbone_params"] == 2_550_593
    assert info["trainable_pct"] == pytest.approx(100 * 3072 / 2_550_593)


def test_errors_come_back_as_json_with_exit_code_2(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.csv").write_text("file,caption\ngone.png,x\n")
    code, out, stderr = cli("tune", "--model", "openclip:PETStudio-Tiny", "--data", str(tmp_path / "data"),
                            "--method", "lora", "--out", str(tmp_path / "run"))
    assert code == 2 and "captions.csv → gone.png, row 2: file not found" in out["error"]
    assert "error:" in stderr and "Traceback" not in stderr
    code, out, _ = cli("info", "--model", "openclip:PETStudio-Tiny", "--method", "prompt", "--rank", "3")
    assert code == 2 and out["error"].startswith("method prompt has no option rank")
