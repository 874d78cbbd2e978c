import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The CLI's zero-shot scores go to a folder of this test session's, never the user's cache.
os.environ["PETSTUDIO_CACHE"] = tempfile.mkdtemp(prefix="petstudio-test-cache-")
atexit.register(shutil.rmtree, os.environ["PETSTUDIO_CACHE"], ignore_errors=True)
# an empty hub cache: weights a developer has fetched must not stand in for the unreachable hub the tests assume
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="petstudio-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from core.backbones import load_backbone  # noqa: E402
from core.data.shapes import write_shapes_dataset  # noqa: E402

TINY = "openclip:PETStudio-Tiny"

# Under pytest-xdist each worker computes on one thread: the workers share the cores already.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


def _two_pictures():
    """Two distinct pictures: a red disc on white and a blue square on black."""
    from PIL import Image, ImageDraw

    disc = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(disc).ellipse((12, 12, 52, 52), fill=(220, 30, 30))
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle((8, 20, 40, 52), fill=(30, 60, 220))
    return [disc, square]


def _relative_difference(a, b):
    return float((a - b).norm() / (0.5 * (a.norm() + b.norm())))


def assert_initialised_like_bert(model):
    """Every weight matrix, convolution and embedding of a random BLIP at std ~0.02 (BERT's init),
    the vision tower's included; LayerNorms at weight 1, bias 0."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    stds = {name: float(p.detach().std()) for name, p in model.named_parameters() if p.dim() >= 2}
    assert stds and all(0.018 < std < 0.022 for std in stds.values()), \
        {name: std for name, std in stds.items() if not 0.018 < std < 0.022}


def assert_sees_images(backbone):
    """A BLIP backbone's image tokens have a normal scale, vary across positions and tell two
    distinct pictures apart, and the text side (through cross-attention) sees the difference.
    Fails on vision weights left at ~1e-10 (BlipVisionConfig's default initializer_range): tokens
    ~1e-6, the same [CLS] for every picture, cross-attention that contributes nothing."""
    modes = {module: module.training for module in backbone.modules()}   # left as they were found
    backbone.eval()
    pixels = torch.stack([backbone.image_transform(picture) for picture in _two_pictures()])
    text = backbone.tokenize(["what is in the picture?"] * 2)
    try:
        with torch.no_grad():
            tokens = backbone.image_tokens(pixels)
            if backbone.has("matching"):
                fused = backbone.fused_cls(tokens, text)
            else:
                fused = backbone.encode_question(tokens, text)[0][:, 0]
    finally:
        for module, training in modes.items():
            module.training = training
    scales = {
        "std": float(tokens.std()),
        "across_positions": float(tokens.std(dim=1).mean() / tokens.std()),   # within a picture
        "cls": _relative_difference(tokens[0, 0], tokens[1, 0]),               # between the pictures
        "patches": _relative_difference(tokens[0, 1:], tokens[1, 1:]),
        "fused": _relative_difference(fused[0], fused[1]),                     # the same text on each
    }
    assert torch.isfinite(tokens).all() and torch.isfinite(fused).all(), scales
    assert 0.1 < scales["std"] < 10 and scales["across_positions"] > 0.1, scales
    assert scales["cls"] > 0.1 and scales["patches"] > 0.1 and scales["fused"] > 0.01, scales
    return scales


@pytest.fixture(scope="session")
def tiny_blip_folder(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


@pytest.fixture
def tiny_blip(tiny_blip_folder):
    backbone = load_backbone(f"blip:{tiny_blip_folder}")
    assert_sees_images(backbone)
    return backbone


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

