import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core.data import DatasetError, Limits, few_shot, read_dataset


def image(path: Path, size=(8, 8), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def folder(tmp_path: Path, csv: str, images=("a.png", "b.png", "c.png")) -> Path:
    root = tmp_path / "data"
    for name in images:
        image(root / name)
    (root / "captions.csv").write_text(csv, encoding="utf-8")
    return root


def problems(source, workdir, **limits) -> list[str]:
    with pytest.raises(DatasetError) as caught:
        read_dataset(source, workdir, Limits(**limits) if limits else Limits())
    return [str(p) for p in caught.value.problems]


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


def test_csv_folder_groups_captions_per_image_and_splits_deterministically(tmp_path):
    root = folder(tmp_path, "file,caption\na.png,a red thing\na.png,something red\nb.png,b\nc.png,c\n")
    first = read_dataset(root, tmp_path / "work")
    second = read_dataset(root, tmp_path / "work2")
    assert [i.media for i in first.items] == ["a.png", "b.png", "c.png"]
    assert first.items[0].captions == ["a red thing", "something red"] and first.items[0].rows == [2, 3]
    assert [i.split for i in first.items] == [i.split for i in second.items]
    assert first.stats() == {"items": 3, "captions": 4, "questions": 0, "train": 2, "test": 1}
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 16
    assert not (tmp_path / "work").exists()  # a folder is read in place: nothing written


def test_jsonl_with_captions_questions_and_splits(tmp_path):
    root = tmp_path / "data"
    image(root / "img/a.jpg"), image(root / "b.png")
    rows = [{"image": "img/a.jpg", "caption": "a cat", "split": "train"},
            {"image": "img/a.jpg", "question": "what animal?", "answer": ["cat", "kitten"], "split": "train"},
            {"image": "b.png", "caption": "a dog", "split": "test"}]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    dataset = read_dataset(root, tmp_path / "work")
    a, b = dataset.items
    assert (a.media, a.captions, a.split, b.split) == ("img/a.jpg", ["a cat"], "train", "test")
    assert a.qa[0].question == "what animal?" and a.qa[0].answers == ("cat", "kitten")


def test_zip_is_extracted_only_into_the_work_folder(tmp_path):
    root = folder(tmp_path, "file,caption\na.png,a\nb.png,b\nc.png,c\n")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in root.iterdir():
            zf.write(p, f"mydata/{p.name}")   # a folder inside the archive
    before = files_under(tmp_path)
    dataset = read_dataset(archive, tmp_path / "run")
    written = files_under(tmp_path) - before
    assert written and all(p.is_relative_to(tmp_path / "run" / "dataset") or p == tmp_path / "run" for p in written)
    assert dataset.root == (tmp_path / "run/dataset/mydata").resolve() and len(dataset.items) == 3


def test_few_shot_keeps_k_items_with_all_captions_by_seed(shapes, tmp_path):
    train = read_dataset(shapes, tmp_path).split("train")
    a, b, c = few_shot(train, 16, seed=1), few_shot(train, 16, seed=1), few_shot(train, 16, seed=2)
    assert len(a) == 16 and [i.media for i in a] == [i.media for i in b] != [i.media for i in c]
    assert all(len(i.captions) == 2 for i in a)
    assert few_shot(train, None, seed=0) == train and few_shot(train, 10_000, seed=0) == train


@pytest.mark.parametrize("csv, expected", [
    ("file,caption\na.png,ok\nmissing.png,x\n", "captions.csv → missing.png, row 3: file not found"),
    ("file,caption\na.png,\n", "captions.csv, row 2: empty caption"),
    ("file,text\na.png,x\n", "captions.csv, row 1: missing column(s) caption: the header must have file,caption (found: file, text)"),
    ("file,caption\n../outside.png,x\n", "captions.csv → ../outside.png, row 2: path escapes the dataset folder"),
    ("file,caption\n/etc/hostname,x\n", "captions.csv → /etc/hostname, row 2: absolute paths are not allowed"),
    ("file,caption\nnotes.txt,x\n", "captions.csv → notes.txt, row 2: unsupported file type '.txt'"),
    ("file,caption,split\na.png,x,train\nb.png,y\n", "row 3: some rows have a split and others don't"),
    ("file,caption,split\na.png,x,validation\n", "captions.csv, row 2: split must be train or test, not 'validation'"),
])
def test_bad_csv_rows_name_file_and_row(tmp_path, csv, expected):
    root = folder(tmp_path, csv)
    (tmp_path / "outside.png").write_bytes((root / "a.png").read_bytes())
    (root / "notes.txt").write_text("hello")
    found = problems(root, tmp_path / "work")
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once(tmp_path):
    root = folder(tmp_path, "file,caption\nnope.png,x\na.png,\nb.png,fine\n")
    found = problems(root, tmp_path / "work")
    assert found == ["captions.csv → nope.png, row 2: file not found", "captions.csv, row 3: empty caption"]


def test_non_utf8_manifest_names_the_row(tmp_path):
    root = folder(tmp_path, "")
    (root / "captions.csv").write_bytes("file,caption\na.png,ok\nb.png,caf\xe9\n".encode("latin-1"))
    assert problems(root, tmp_path / "w") == ["captions.csv, row 3: is not UTF-8 text (save it as UTF-8)"]


def test_unreadable_and_oversized_images(tmp_path):
    root = folder(tmp_path, "file,caption\na.png,x\nbroken.png,y\nbig.png,z\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    image(root / "big.png", size=(300, 200))
    found = problems(root, tmp_path / "w", max_image_pixels=50_000)
    assert found[0].startswith("captions.csv → broken.png, row 3: unreadable image")
    assert found[1] == "captions.csv → big.png, row 4: image has 60000 pixels (300×200), more than the limit of 50000"


def test_symlink_out_of_the_dataset_is_refused(tmp_path):
    root = folder(tmp_path, "file,caption\nlink.png,x\n")
    secret = image(tmp_path / "secret.png")
    os.symlink(secret, root / "link.png")
    assert problems(root, tmp_path / "w") == ["captions.csv → link.png, row 2: path escapes the dataset folder"]


def test_jsonl_problems(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    (root / "data.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", caption: 1}\n'
                                     '{"caption": "no media"}\n["a list"]\n', encoding="utf-8")
    assert problems(root, tmp_path / "w") == [
        "data.jsonl, row 2: not valid JSON (Expecting property name enclosed in double quotes)",
        "data.jsonl, row 4: each line must be a JSON object"]
    (root / "data.jsonl").write_text('{"caption": "no media"}\n{"image": "a.png", "question": "q?"}\n', encoding="utf-8")
    assert problems(root, tmp_path / "w") == [
        "data.jsonl, row 1: each row needs exactly one of 'image' or 'video'",
        "data.jsonl, row 2: 'answer' must be a non-empty string or list of strings"]


def test_manifest_must_be_there_once(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    assert "no manifest found" in problems(root, tmp_path / "w")[0]
    (root / "captions.csv").write_text("file,caption\na.png,x\n")
    (root / "data.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    assert "has both captions.csv and data.jsonl" in problems(root, tmp_path / "w")[0]


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("members, symlink, limits, expected", [
    ({"captions.csv": b"file,caption\n", "../evil.png": b"x"}, None, {},
     "upload.zip/../evil.png: path escapes the dataset folder"),
    ({"captions.csv": b"file,caption\n"}, "link.png", {}, "upload.zip/link.png: symbolic links are not allowed"),
    ({f"{i}.png": b"x" for i in range(5)}, None, {"max_files": 3}, "upload.zip: has 5 files, more than the limit of 3"),
    ({"captions.csv": b"file,caption\n", "zeros.png": bytes(5_000_000)}, None, {},
     "upload.zip/zeros.png: compression ratio"),
    ({"captions.csv": b"file,caption\n", "big.png": bytes(3000)}, None, {"max_total_bytes": 2000},
     "upload.zip: unpacks to 3013 bytes, more than the limit of 2000"),
])
def test_dangerous_archives_are_refused_before_anything_is_written(tmp_path, members, symlink, limits, expected):
    archive = _zip(tmp_path / "upload.zip", members, symlink)
    found = problems(archive, tmp_path / "run", **limits)
    assert any(p.startswith(expected) for p in found), found
    assert not (tmp_path / "run").exists() and not (tmp_path / "evil.png").exists()


def test_not_a_zip_and_missing_source(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"nope")
    assert problems(tmp_path / "fake.zip", tmp_path / "w")[0].startswith("fake.zip: not a readable .zip archive")
    assert problems(tmp_path / "nothing", tmp_path / "w") == [f"{tmp_path / 'nothing'}: not found"]


def test_oversized_media_file_is_refused(tmp_path):
    root = folder(tmp_path, "file,caption\na.png,x\n")
    size = (root / "a.png").stat().st_size
    assert problems(root, tmp_path / "w", max_file_bytes=size - 1) == [
        f"captions.csv → a.png, row 2: file is {size} bytes, more than the limit of {size - 1}"]
