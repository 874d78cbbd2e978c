import json

import pytest
import torch

from core import checkpoint
from core.checkpoint import CheckpointError
from core.pet import METHODS
from core.runs import load_run, tune
from tests.conftest import TINY, embeddings


@pytest.mark.parametrize("method", [m for m in METHODS if m != "zero_shot"])
def test_every_method_round_trips_through_safetensors(shapes, tmp_path, method):
    result = tune(TINY, shapes, method, shots=4, epochs=1, lr=1e-2, seed=2, out=tmp_path / "run")
    _, handle, info = load_run(TINY, tmp_path / "run")
    assert info.method == method and info.trainable_params == handle.num_trainable()
    saved = handle.state_dict()
    pixels = torch.randn(2, 3, 32, 32)
    tokens = handle.backbone.tokenize(["a red circle", "a blue square"])
    reloaded = embeddings(handle.backbone, pixels, tokens)
    # Replaying the same seeded run gives the same weights, so the same embeddings.
    again = tune(TINY, shapes, method, shots=4, epochs=1, lr=1e-2, seed=2, out=tmp_path / "again")
    _, handle_again, _ = load_run(TINY, tmp_path / "again")
    assert all(torch.equal(saved[n], t) for n, t in handle_again.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(reloaded, embeddings(handle_again.backbone, pixels, tokens)))
    assert result.tuned == again.tuned


@pytest.fixture
def lora_run(shapes, tmp_path):
    tune(TINY, shapes, "lora", shots=4, epochs=1, seed=0, out=tmp_path / "run")
    return tmp_path / "run"


def test_only_safetensors_are_loaded(lora_run):
    torch.save({"x": torch.zeros(1)}, lora_run / "pet.pt")
    with pytest.raises(CheckpointError, match="pet.pt: only .safetensors checkpoints are loaded"):
        load_run(TINY, lora_run / "pet.pt")
    (lora_run / "pet.safetensors").write_bytes(b"garbage that is not safetensors")
    with pytest.raises(CheckpointError, match="pet.safetensors: not a readable safetensors file"):
        load_run(TINY, lora_run)


def test_backbone_spec_and_shapes_are_checked(lora_run):
    with pytest.raises(CheckpointError, match="tuned on openclip:PETStudio-Tiny, not openclip:ViT-B-32"):
        load_run("openclip:ViT-B-32", lora_run)
    info = json.loads((lora_run / "run.json").read_text())
    info["config"]["rank"] = 3
    (lora_run / "run.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"lora weight pet\.vision\.0\.q\.down has shape \(2, 64\), expected \(3, 64\)"):
        load_run(TINY, lora_run)
    info["config"] = {"rank": 2, "towers": ["vision"]}
    (lora_run / "run.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="lora weights do not match: missing \\[\\], unexpected \\['pet.text"):
        load_run(TINY, lora_run)
    (lora_run / "run.json").unlink()
    with pytest.raises(CheckpointError, match="run.json: missing"):
        checkpoint.read(lora_run)
