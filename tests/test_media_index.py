"""Indexing a folder and searching it (core/media_index.py, core/vector_index.py, `index`,
`search`, `bench-index`): the same ranking as exact cosine similarity, resumable, skips what the
dataset reader would, refuses another model, approximate above a size with its recall measured."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core import media_index
from core.backbones import load_backbone
from core.bench import bench_index
from core.cli import main
from core.data.media import load_media
from core.media_index import MediaIndex, MediaIndexError, build_index, model_fingerprint
from core.pet import attach
from core.tasks.encoding import embed_media, embed_texts
from core.vector_index import VectorIndex, recall_at
from core.world import write_part

CLIP = Path(__file__).resolve().parents[1] / "assets" / "samples" / "clips" / "horse_pan_right.mp4"


@pytest.fixture(scope="module")
def offline():
    return load_backbone("offline")


@pytest.fixture
def folder(tmp_path):
    """12 pictures in two folders, a clip, a broken picture, a link and a file that is not media."""
    data = write_part(tmp_path / "photos", "base", 12, seed=3)
    (data / "more").mkdir()
    for path in sorted(data.glob("*.png"))[6:]:
        path.rename(data / "more" / path.name)
    shutil.copy(CLIP, data / "more" / "horse.mp4")
    (data / "broken.jpg").write_bytes(b"not a picture")
    (data / "elsewhere.png").symlink_to(next((data / "more").glob("*.png")))
    return data


def _exact_ranking(backbone, folder: Path, paths: list[str], text: str) -> list[tuple[str, float]]:
    vectors = []
    for path in paths:
        kind = "video" if path.endswith(".mp4") else "image"
        vectors.append(embed_media(backbone, load_media(folder / path, kind, backbone.image_transform)[None])[0])
    scores = torch.stack(vectors) @ embed_texts(backbone, backbone.tokenize([text]))[0]
    return sorted(((str(folder / p), float(s)) for p, s in zip(paths, scores)), key=lambda x: -x[1])


def test_an_indexed_folder_is_searched_as_exact_cosine_similarity_would(offline, folder, tmp_path):
    report = build_index(offline, folder, tmp_path / "index", "offline", progress=False)
    assert (report.items, report.embedded, report.reused, report.kind) == (13, 13, 0, "exact")
    assert {s["path"]: s["problem"].split(" (")[0] for s in report.skipped} == {
        "broken.jpg": "unreadable image", "elsewhere.png": "a link"}
    assert json.loads((tmp_path / "index" / "skipped.json").read_text()) == report.skipped
    index = MediaIndex(tmp_path / "index")
    index.check_model(offline)
    assert "more/horse.mp4" in index.paths and "photos" not in index.paths[0]

    text = "a large red circle"
    found = index.search(embed_texts(offline, offline.tokenize([text])), k=5)
    expected = _exact_ranking(offline, folder, index.paths, text)[:5]
    assert [f.path for f in found] == [p for p, _ in expected]
    assert np.allclose([f.score for f in found], [s for _, s in expected], atol=1e-5)

    picture = folder / index.paths[0]
    by_example = index.search(embed_media(offline, load_media(picture, "image", offline.image_transform)[None]), k=1)
    assert by_example[0].score == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(embed_media(offline, load_media(by_example[0].path, "image", offline.image_transform)[None]),
                       embed_media(offline, load_media(picture, "image", offline.image_transform)[None]), atol=1e-5)


def test_an_interrupted_index_resumes_and_only_embeds_what_changed(offline, folder, tmp_path, monkeypatch):
    calls = []
    real_embed = media_index.embed_media

    def embed_then_stop(backbone, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_embed(backbone, pixels)

    monkeypatch.setattr(media_index, "embed_media", embed_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_index(offline, folder, tmp_path / "index", "offline", batch_size=4, progress=False)
    assert not json.loads((tmp_path / "index" / "index.json").read_text())["complete"]
    with pytest.raises(MediaIndexError, match="was not finished; run `python -m core index` again"):
        MediaIndex(tmp_path / "index")
    monkeypatch.setattr(media_index, "embed_media", real_embed)

    resumed = build_index(offline, folder, tmp_path / "index", "offline", batch_size=4, progress=False)
    assert (resumed.items, resumed.reused, resumed.embedded) == (13, 4, 9)

    changed = sorted(folder.glob("*.png"))[0]
    changed.write_bytes((folder / "more" / sorted(p.name for p in (folder / "more").glob("*.png"))[0]).read_bytes())
    (folder / "more" / "horse.mp4").unlink()
    again = build_index(offline, folder, tmp_path / "index", "offline", batch_size=4, progress=False)
    assert (again.items, again.reused, again.embedded) == (12, 11, 1)

    fresh = build_index(offline, folder, tmp_path / "fresh", "offline", progress=False)
    resumed_index, fresh_index = MediaIndex(tmp_path / "index"), MediaIndex(tmp_path / "fresh")
    assert sorted(resumed_index.paths) == sorted(fresh_index.paths) and fresh.items == 12
    vectors = lambda i: dict(zip(i.paths, np.fromfile(i.folder / "vectors.f32", np.float32).reshape(len(i.paths), -1)))  # noqa: E731
    resumed_vectors, fresh_vectors = vectors(resumed_index), vectors(fresh_index)
    assert all(np.allclose(resumed_vectors[p], fresh_vectors[p], atol=1e-6) for p in fresh_vectors)


def test_another_model_is_refused_for_searching_and_for_resuming(offline, folder, tmp_path):
    build_index(offline, folder, tmp_path / "index", "offline", progress=False)
    index = MediaIndex(tmp_path / "index")
    handle = attach(offline, "lora", {})
    try:
        with torch.no_grad():
            next(iter(handle.trainable_parameters().values())).add_(0.1)   # a tuned run: other weights
        assert model_fingerprint(offline, handle) != index.record.fingerprint
        with pytest.raises(MediaIndexError, match=r"built by another model \(offline\)"):
            index.check_model(offline, handle)
        with pytest.raises(MediaIndexError, match="started by another model"):
            build_index(offline, folder, tmp_path / "index", "offline", handle=handle, progress=False)
    finally:
        handle.detach()
    index.check_model(offline)   # the untuned model again: accepted


def test_the_index_writes_only_its_own_files_in_its_own_folder(offline, folder, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(MediaIndexError, match="a folder with other files in it"):
        build_index(offline, folder, occupied, "offline", progress=False)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    inside = folder / "index"   # inside the indexed folder: not indexed itself
    report = build_index(offline, folder, inside, "offline", progress=False)
    assert report.items == 13 and sorted(p.name for p in inside.iterdir()) == sorted(media_index.OWN_FILES)
    assert {p: p.stat().st_mtime_ns for p in before} == before

    victim = tmp_path / "victim.txt"   # a link planted where a file is written whole, then renamed
    victim.write_text("mine")
    (inside / "skipped.json.partial").symlink_to(victim)
    os.mkfifo(folder / "pipe.png")   # a picture's name on a pipe: read, it would block
    report = build_index(offline, folder, inside, "offline", progress=False)
    assert victim.read_text() == "mine" and not (inside / "skipped.json").is_symlink()
    assert {"path": "pipe.png", "problem": "is not a regular file"} in json.loads((inside / "skipped.json").read_text())
    (folder / "pipe.png").unlink()

    (inside / "index.json").write_text("[1, 2]")
    with pytest.raises(MediaIndexError, match=r"index\.json: not an index record PET Studio wrote"):
        MediaIndex(inside)
    (inside / "index.json").unlink()
    os.mkfifo(inside / "index.json")   # read plainly, it would wait for a writer
    with pytest.raises(MediaIndexError, match=r"index\.json: not an index record PET Studio wrote \(ValueError: not a regular file\)"):
        MediaIndex(inside)


def test_a_broken_model_indexes_nothing(folder, tmp_path):
    broken = load_backbone("offline")
    with torch.no_grad():
        for parameter in broken.backbone_parameters().values():
            parameter.fill_(float("nan"))
    with pytest.raises(MediaIndexError, match="not finite numbers"):
        build_index(broken, folder, tmp_path / "index", "offline", progress=False)
    assert not (tmp_path / "index" / "faiss.index").exists()


def _clustered(generator, centres, count):
    vectors = centres[generator.integers(0, len(centres), count)]
    vectors = vectors + generator.standard_normal(vectors.shape).astype(np.float32) * 0.06
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_above_its_exact_size_the_index_is_approximate_with_the_recall_it_promises(tmp_path):
    generator = np.random.default_rng(0)
    centres = generator.standard_normal((60, 64)).astype(np.float32)
    vectors, queries = _clustered(generator, centres, 4000), _clustered(generator, centres, 100)
    exact = VectorIndex.build(vectors)
    approximate = VectorIndex.build(vectors, exact_up_to=1000)
    assert exact.info.kind == "exact" and approximate.info.kind == "ivf"
    assert approximate.info.lists == 252 and 1 <= approximate.info.probes < approximate.info.lists
    assert approximate.info.recall_at_10 >= 0.95
    assert recall_at(10, approximate.search(queries, 10)[1], exact.search(queries, 10)[1]) >= 0.95
    approximate.save(tmp_path / "faiss.index")
    reloaded = VectorIndex.load(tmp_path / "faiss.index", approximate.info)
    assert np.array_equal(reloaded.search(queries, 10)[1], approximate.search(queries, 10)[1])
    with pytest.raises(ValueError, match="not finite numbers"):
        exact.search(np.full((1, 64), np.nan, dtype=np.float32), 3)


def test_bench_index_reports_exact_and_approximate_search():
    result = bench_index(items=3000, dim=64, queries=20, subjects=40)
    assert result["items"] == 3000 and result["exact"]["p50_ms"] > 0 and result["torch_matmul_p50_ms"] > 0
    assert result["approximate"]["recall_at_10"] >= 0.95 and result["approximate"]["lists"] == 219


def _cli(capsys, *args):
    code = main([*args, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_cli_indexes_searches_and_refuses_another_model(folder, tmp_path, capsys):
    code, built = _cli(capsys, "index", "--model", "offline", "--media", str(folder), "--out", str(tmp_path / "ix"))
    assert code == 0 and built["items"] == 13 and built["kind"] == "exact" and len(built["skipped"]) == 2
    code, found = _cli(capsys, "search", "--index", str(tmp_path / "ix"), "a small blue square", "--k", "3")
    assert code == 0 and len(found["results"]) == 3 and found["model"] == "offline"
    assert all(Path(r["path"]).is_relative_to(folder) for r in found["results"])
    assert found["results"][0]["score"] >= found["results"][1]["score"] >= found["results"][2]["score"]
    code, by_clip = _cli(capsys, "search", "--index", str(tmp_path / "ix"), "--media", str(CLIP), "--k", "1")
    assert code == 0 and by_clip["results"][0]["path"] == str(folder / "more" / "horse.mp4")
    code, refused = _cli(capsys, "search", "--index", str(tmp_path / "ix"), "x", "--model", "openclip:PETStudio-Tiny")
    assert code == 2 and "built by another model (offline)" in refused["error"]
    code, neither = _cli(capsys, "search", "--index", str(tmp_path / "ix"))
    assert code == 2 and "search with a text or with --media FILE" in neither["error"]


def _index_with(offline, folder, tmp_path, change) -> Path:
    """A finished index of `folder` with `change(index folder)` applied to its files."""
    out = tmp_path / "index"
    if not out.exists():
        build_index(offline, folder, out, "offline", progress=False)
        shutil.copytree(out, tmp_path / "pristine")
    else:
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "pristine", out)
    change(out)
    return out


def _line(out: Path, text: str) -> None:
    lines = (out / "items.jsonl").read_text().splitlines()
    (out / "items.jsonl").write_text("\n".join([text, *lines[1:]]) + "\n")


TAMPERED = [   # (id, change to the index folder, what the refusal says)
    ("garbage line", lambda out: _line(out, "{not json"), "items.jsonl: a line PET Studio did not write"),
    ("line without its path", lambda out: _line(out, '{"nopath": 1}'), "items.jsonl: a line PET Studio did not write"),
    ("line a list", lambda out: _line(out, "[1, 2]"), "items.jsonl: a line PET Studio did not write"),
    ("path an object", lambda out: _line(out, '{"path": {}, "size": 1, "mtime_ns": 1, "kind": "image"}'),
     "items.jsonl: a line PET Studio did not write"),
    ("path above the folder", lambda out: _line(out, '{"path": "../../etc/passwd", "size": 1, "mtime_ns": 1, '
                                                     '"kind": "image"}'),
     "items.jsonl: '../../etc/passwd' is not a path under the indexed folder"),
    ("absolute path", lambda out: _line(out, '{"path": "/etc/shadow", "size": 1, "mtime_ns": 1, "kind": "image"}'),
     "items.jsonl: '/etc/shadow' is not a path under the indexed folder"),
    ("items missing", lambda out: (out / "items.jsonl").unlink(), "items.jsonl: not a file PET Studio wrote"),
    ("items a pipe", lambda out: ((out / "items.jsonl").unlink(), os.mkfifo(out / "items.jsonl")),
     "items.jsonl: not a file PET Studio wrote"),
    ("faiss index a pipe", lambda out: ((out / "faiss.index").unlink(), os.mkfifo(out / "faiss.index")),
     "faiss.index: not a file PET Studio wrote"),
    ("record's folder a number", lambda out: (out / "index.json").write_text(json.dumps(
        {**json.loads((out / "index.json").read_text()), "folder": 123})),
     "index.json: not an index record PET Studio wrote"),
]


@pytest.mark.parametrize("name, change, expected", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_a_tampered_index_is_refused_naming_its_file(offline, folder, tmp_path, name, change, expected):
    out = _index_with(offline, folder, tmp_path, change)
    with pytest.raises(MediaIndexError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        MediaIndex(out)


def test_a_resumed_index_refuses_vectors_no_model_wrote(offline, folder, tmp_path):
    def poison(out):
        vectors = np.fromfile(out / "vectors.f32", dtype=np.float32)
        vectors[3] = np.nan
        vectors.tofile(out / "vectors.f32")

    out = _index_with(offline, folder, tmp_path, poison)
    with pytest.raises(MediaIndexError, match=r"vectors\.f32: holds values that are not finite"):
        build_index(offline, folder, out, "offline", progress=False)


def test_a_handful_of_vectors_is_searched_exactly_whatever_the_exact_size(capsys):
    vectors = np.eye(8, 4, dtype=np.float32)   # 8 points: too few for an IVF index's 4·√8 lists
    assert VectorIndex.build(vectors, exact_up_to=0).info.kind == "exact"
    for argv, said in ((["bench-index", "--dim", "0"], "argument --dim: at least 1, not 0"),
                       (["bench-index", "--items", "3"], "argument --items: at least 16, not 3"),
                       (["index", "--model", "offline", "--media", ".", "--out", "x", "--batch-size", "0"],
                        "argument --batch-size: at least 1, not 0")):
        assert main([*argv, "--json"]) == 2
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"].endswith(said)
