from pathlib import Path

import pytest

from core.data import read_dataset
from core.data.samples import SAMPLES, SAMPLES_ROOT, sample_path
from core.tasks import get_task


@pytest.mark.parametrize("name, kind, items", [("photos", "image", 8), ("clips", "video", 6)])
def test_sample_datasets_load_and_validate(name, kind, items, tmp_path):
    dataset = read_dataset(sample_path(name), tmp_path / "w")
    assert len(dataset.items) == items and {i.kind for i in dataset.items} == {kind}
    assert all(len(i.captions) >= 2 and i.qa for i in dataset.items)
    assert dataset.split("test") and dataset.split("train")
    for task in ("retrieval", "vqa"):
        get_task(task, dataset)
    assert not (tmp_path / "w").exists()


def test_assets_stay_small_and_every_photo_has_a_licence():
    total = sum(p.stat().st_size for p in Path(SAMPLES_ROOT).parent.rglob("*") if p.is_file())
    assert total < 20 * 2**20
    provenance = (SAMPLES_ROOT / "PROVENANCE.md").read_text()
    for photo in (SAMPLES_ROOT / "photos").iterdir():
        if photo.suffix != ".jsonl":
            assert f"| {photo.name} |" in provenance, photo.name
    assert set(SAMPLES) == {"photos", "clips"}
