"""Zero-shot scores computed once: across CLI runs (a cache folder) and runs of one app session."""
import json
from pathlib import Path

import pytest

from core.cli import main
from core.cache import ScoreCache
from core.result import MAX_JSON_BYTES
from tests.conftest import TINY

KEY = ("offline", "the bundled offline model", "abc123", "retrieval", 8, ())


def test_scores_round_trip_and_anything_else_counts_as_absent(tmp_path):
    cache = ScoreCache(tmp_path / "zero-shot")
    assert KEY not in cache and len(cache) == 0
    cache[KEY] = {"t2i_r1": 12.5, "i2t_r1": 20.0}
    assert cache[KEY] == {"t2i_r1": 12.5, "i2t_r1": 20.0} and list(cache) == [KEY]
    assert ScoreCache(tmp_path / "zero-shot")[KEY] == {"t2i_r1": 12.5, "i2t_r1": 20.0}   # another process
    (stored,) = (tmp_path / "zero-shot").glob("*.json")
    for broken in ("{not json", json.dumps({"key": ["other"], "value": {"t2i_r1": 1.0}}),
                   json.dumps({"key": list(KEY)[:5] + [[]], "value": {"t2i_r1": "high"}}), "[]"):
        stored.write_text(broken)
        assert KEY not in cache
    cache[KEY] = {"t2i_r1": float("nan")}   # a broken score is never kept
    assert KEY not in cache
    local = ("openclip:ViT-B-32:/tmp/my.pt",) + KEY[1:]   # a local file may change under its name
    cache[local] = {"t2i_r1": 1.0}
    assert local not in cache


def test_a_cache_file_that_is_not_plain_json_counts_as_absent_and_blocks_nothing(tmp_path):
    """A pipe would block the run, a device never end, a deep or huge file exhaust it: each is absent."""
    import os

    cache = ScoreCache(tmp_path / "zero-shot")
    cache[KEY] = {"t2i_r1": 12.5}
    (stored,) = (tmp_path / "zero-shot").glob("*.json")
    stored.unlink()
    os.mkfifo(stored)   # a reader that opened it plainly would wait here for a writer
    assert KEY not in cache
    stored.unlink()
    stored.symlink_to("/dev/zero")
    assert KEY not in cache
    stored.unlink()
    stored.write_text("[" * 200_000 + "]" * 200_000)
    assert KEY not in cache
    stored.write_text(json.dumps({"key": list(KEY), "value": {"t2i_r1": 12.5}, "padding": "x" * MAX_JSON_BYTES}))
    assert KEY not in cache
    stored.write_text(json.dumps({"key": list(KEY), "value": {"t2i_r1": 12.5}}))
    assert cache[KEY] == {"t2i_r1": 12.5} and list(cache) == [KEY]


def test_kept_zero_shot_scores_are_used_only_if_they_are_the_tasks_and_in_range():
    from types import SimpleNamespace

    from core.runs import _kept_scores
    from core.tasks import vqa

    task = SimpleNamespace(name="vqa", metric_keys=vqa.METRIC_KEYS)
    assert _kept_scores({KEY: {"vqa_acc": 50.0}}, KEY, task) == {"vqa_acc": 50.0}
    for poisoned in ({"vqa_acc": 1e6}, {"vqa_acc": -5.0}, {"vqa_acc": 50.0, "bogus": 1.0}, {"t2i_r1": 50.0}, {},
                     {"vqa_acc": "high"}, [50.0], None):
        assert _kept_scores({KEY: poisoned}, KEY, task) is None, poisoned


def test_a_kept_number_past_any_float_counts_as_absent(tmp_path):
    cache = ScoreCache(tmp_path)
    cache[KEY] = {"t2i_r1": 12.5}
    (stored,) = tmp_path.glob("*.json")
    stored.write_text(json.dumps({"key": list(KEY), "value": {"t2i_r1": 1}}).replace("1}}", "1" + "0" * 400 + "}}"))
    assert KEY not in cache


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path):
    """A cache saves time, nothing more: a full disk or a cache folder that cannot be made does not
    end the run that computed the value."""
    (tmp_path / "taken").write_text("a file where the cache folder would be")
    cache = ScoreCache(tmp_path / "taken" / "zero-shot")
    with pytest.warns(UserWarning, match="could not keep a result in the cache"):
        cache[KEY] = {"t2i_r1": 12.5}
    assert KEY not in cache and (tmp_path / "taken").read_text().startswith("a file")


def _cached_run(shapes, tmp_path, capsys, out: str, *extra: str) -> dict:
    """A CLI tune on `shapes` with the cache at tmp_path/cache: its --json output."""
    assert main(["tune", "--model", TINY, "--data", str(shapes), "--method", "bitfit", "--shots", "4", "--epochs", "1",
                 "--cache", str(tmp_path / "cache"), "--json", "--out", str(tmp_path / out), *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _kept(tmp_path) -> tuple[dict, Path, Path]:
    """(the zero-shot cache's records by file, the media spread's file, the scores' file)."""
    records = {path: json.loads(path.read_text()) for path in (tmp_path / "cache" / "zero-shot").glob("*.json")}
    (spread_file,) = [path for path, r in records.items() if r["key"][-1] == "media spread"]   # beside the scores
    (scores_file,) = [path for path in records if path != spread_file]
    return records, spread_file, scores_file


def test_a_second_cli_run_on_the_same_data_reuses_the_zero_shot_scores(shapes, tmp_path, capsys):
    first = _cached_run(shapes, tmp_path, capsys, "first")
    records, spread_file, stored = _kept(tmp_path)
    assert records[spread_file]["value"] == {"spread": first["media_spread"]["zero_shot"]}
    record = records[stored]
    assert record["value"] == first["zero_shot"]
    record["value"]["t2i_r1"] = 99.5   # a marker: only a reused score can carry it
    stored.write_text(json.dumps(record))
    spread_file.write_text(json.dumps({**records[spread_file], "value": {"spread": 5.0}}))   # out of range: measured again
    second = _cached_run(shapes, tmp_path, capsys, "second")
    assert second["zero_shot"]["t2i_r1"] == 99.5
    assert second["media_spread"]["zero_shot"] == first["media_spread"]["zero_shot"]
    assert json.loads(spread_file.read_text())["value"] == {"spread": first["media_spread"]["zero_shot"]}
    assert _cached_run(shapes, tmp_path, capsys, "third", "--no-cache")["zero_shot"] == first["zero_shot"]


def test_a_kept_spread_is_reused_when_the_scores_beside_it_are_gone(shapes, tmp_path, capsys):
    first = _cached_run(shapes, tmp_path, capsys, "first")
    records, spread_file, scores_file = _kept(tmp_path)
    scores_file.unlink()
    spread_file.write_text(json.dumps({**records[spread_file], "value": {"spread": 1.234}}))   # a marker in range
    second = _cached_run(shapes, tmp_path, capsys, "second")
    assert second["zero_shot"] == first["zero_shot"] and second["media_spread"]["zero_shot"] == 1.234
    assert second["media_spread"]["tuned"] == first["media_spread"]["tuned"]


def test_a_run_on_a_local_file_backbone_scores_zero_shot_itself(shapes, tmp_path):
    """The cache declines a local file's scores; the run still has them (it scored them itself)."""
    from core.runs import tune

    result = tune(TINY, shapes, "bitfit", {}, shots=4, epochs=1, out=tmp_path / "run",
                  zero_shot_cache=ScoreCache(tmp_path / "zero-shot"))
    assert result.zero_shot and len(ScoreCache(tmp_path / "zero-shot")) == 2   # the scores, the media spread
    declining = ScoreCache(tmp_path / "declines")
    declining.__class__ = type("Declining", (ScoreCache,), {"__setitem__": lambda self, key, value: None})
    again = tune(TINY, shapes, "bitfit", {}, shots=4, epochs=1, out=tmp_path / "again", zero_shot_cache=declining)
    assert again.zero_shot == result.zero_shot
