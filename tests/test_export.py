"""Export (core/export.py): a tuned run folded into its library's format and loaded by that
library alone gives PET Studio's tuned embeddings; what cannot be folded is refused with a way out."""
import json

import open_clip
import pytest
import torch

from core.backbones import load_backbone
from core.cli import main
from core.export import OPEN_CLIP_WEIGHTS, ExportError, export
from core.runs import load_run, tune
from tests.conftest import TINY


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, generator=generator), ["a red circle", "two blue squares", "x"]


@pytest.mark.parametrize("method", ["lora", "aurora"])
def test_open_clip_loads_the_exported_model_alone(shapes, tmp_path, inputs, method, capsys):
    tune(TINY, shapes, method, shots=4, epochs=1, lr=1e-2, out=tmp_path / "run")
    assert main(["export", "--model", TINY, "--pet", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                 "--json"]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["files"] == [OPEN_CLIP_WEIGHTS, "PETStudio-Tiny.json", "README.md"]
    # PET Studio's tuned model, deltas not merged, on the CPU where open_clip loads the export (on a
    # GPU machine load_run would pick the GPU)
    backbone = load_run(TINY, tmp_path / "run", device=torch.device("cpu"))[0].eval()
    pixels, texts = inputs
    with torch.no_grad():
        tuned = backbone.encode_image(pixels), backbone.encode_text(backbone.tokenize(texts))
        open_clip.add_model_config(tmp_path / "out" / "PETStudio-Tiny.json")
        model, _, _ = open_clip.create_model_and_transforms("PETStudio-Tiny",
                                                            pretrained=str(tmp_path / "out" / OPEN_CLIP_WEIGHTS))
        model.eval()
        exported = model.encode_image(pixels), model.encode_text(open_clip.get_tokenizer("PETStudio-Tiny")(texts))
        frozen = load_backbone(TINY).eval().encode_image(pixels)   # the same seed-0 init, untuned
    assert _relative(exported[0], tuned[0]) < 1e-4 and _relative(exported[1], tuned[1]) < 1e-4
    assert _relative(exported[0], frozen) > 1e-3   # the tuning is in it
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and f"- {method}\n" in card and "| text→image R@1 |" in card


@pytest.mark.parametrize("method", ["lora", "aurora"])
def test_transformers_loads_the_exported_blip_alone(shapes, tiny_blip_folder, tmp_path, inputs, method):
    from transformers import BlipForImageTextRetrieval

    spec = f"blip:{tiny_blip_folder}"
    tune(spec, shapes, method, {"heads": True} if method == "aurora" else {}, shots=4, epochs=1, lr=1e-2,
         out=tmp_path / "run")
    assert export(spec, tmp_path / "run", tmp_path / "out")["library"] == "transformers"
    backbone = load_run(spec, tmp_path / "run", device=torch.device("cpu"))[0].eval()
    pixels, texts = inputs
    tokens = backbone.tokenize(texts)
    model = BlipForImageTextRetrieval.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        tuned = backbone.encode_image(pixels), backbone.encode_text(tokens)
        mask = (tokens != backbone.pad_id).long()
        exported = (model.vision_proj(model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]),
                    model.text_proj(model.text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]))
    assert _relative(exported[0], tuned[0]) < 1e-4 and _relative(exported[1], tuned[1]) < 1e-4


@pytest.mark.parametrize("method, options", [("vlpet", {}), ("adapter", {}), ("aurora", {"gqt": True})])
def test_what_cannot_be_folded_is_refused_with_a_way_out(shapes, tmp_path, method, options):
    tune(TINY, shapes, method, options, shots=2, epochs=1, out=tmp_path / "run")
    with pytest.raises(ExportError, match="cannot be folded into the backbone: load the run with PET Studio instead"):
        export(TINY, tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_fold_into_infinite_ones_are_not_exported(shapes, tmp_path):
    """Each factor finite (1e30), their product not: the loaded run passes every check, the folded model would not."""
    from safetensors.torch import load_file, save_file

    tune(TINY, shapes, "lora", shots=2, epochs=1, out=tmp_path / "run")
    weights = tmp_path / "run" / "pet.safetensors"
    save_file({name: torch.full_like(tensor, 1e30) for name, tensor in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ExportError, match=r"lora folded into openclip:PETStudio-Tiny gives non-finite weights \("):
        export(TINY, tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
