import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from core.backbones import load_backbone  # noqa: E402
from core.data.shapes import write_shapes_dataset  # noqa: E402

TINY = "openclip:PETStudio-Tiny"


@pytest.fixture
def tiny():
    return load_backbone(TINY, seed=0)


@pytest.fixture(scope="session")
def vit_b16():
    """ViT-B/16 with no weights, shared by budget tests (each detaches what it attaches)."""
    return load_backbone("openclip:ViT-B-16")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """24 test pictures (one per colour × shape, chance R@1 = 1/24) and 72 training pictures."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


def _tiny_blip_config(tokenizer):
    """2 layers, 32 wide; initializer_range 0.3 (BLIP's is 0.02) keeps a random tiny model's
    features diverse enough for few-step tuning tests."""
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.3),
        text_config=dict(vocab_size=160, bos_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         encoder_hidden_size=32, initializer_range=0.3),
        image_text_hidden_size=32)


def _write_tiny_blip(folder, model_class, seed):
    from transformers import BlipImageProcessor, BlipProcessor

    from core.backbones.blip import stand_in_tokenizer

    tokenizer = stand_in_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(_tiny_blip_config(tokenizer))
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_tiny_blip(folder, seed=0):
    """A tiny BLIP retrieval model and its processor, written with save_pretrained."""
    from transformers import BlipForImageTextRetrieval

    return _write_tiny_blip(folder, BlipForImageTextRetrieval, seed)


def write_tiny_blip_vqa(folder, seed=0):
    """A tiny BLIP question-answering model and its processor, written with save_pretrained."""
    from transformers import BlipForQuestionAnswering

    return _write_tiny_blip(folder, BlipForQuestionAnswering, seed)


@pytest.fixture(scope="session")
def tiny_blip_folder(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


@pytest.fixture
def tiny_blip(tiny_blip_folder):
    return load_backbone(f"blip:{tiny_blip_folder}")


@pytest.fixture
def batch(tiny):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tiny.tokenize(["a red square", "two blue circles left of a big green tree", "x"])
    return pixels, tokens


def embeddings(backbone, pixels, tokens):
    backbone.eval()
    with torch.no_grad():
        return backbone.encode_image(pixels), backbone.encode_text(tokens)

