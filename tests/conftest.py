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
def shapes(tmp_path_factory):
    """24 test pictures (one per colour × shape, chance R@1 = 1/24) and 72 training pictures."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


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
