import math

import pytest
import torch
import torch.nn.functional as F

from core.tasks import TASKS, TaskError, headline_metric, lower_is_better, metric_label
from core.tasks.retrieval import METRIC_KEYS, contrastive_loss, cosine_matrix, recall_metrics


def test_recall_and_median_rank_on_a_hand_worked_matrix():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    owners = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([
        [0.9, 0.1, 0.5, 0.2],   # image 0: its best caption (0.9) is first          -> i2t rank 0
        [0.8, 0.3, 0.4, 0.1],   # image 1: caption 2 (0.4) below captions 0 (0.8)  -> i2t rank 1
        [0.7, 0.6, 0.5, 0.2],   # image 2: caption 3 (0.2) below 0, 1, 2           -> i2t rank 3
    ])
    m = recall_metrics(similarity, owners)
    # t2i: caption 0 -> image 0 top (rank 0); caption 1: 0.1 vs 0.3, 0.6 -> rank 2;
    #      caption 2: 0.4 vs 0.5 (img 0), 0.5 (img 2) -> rank 2; caption 3: 0.1 vs 0.2, 0.2 -> tie counts against: rank 1
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r5"] == 100.0 and m["i2t_medr"] == 2.0
    assert m["t2i_r1"] == 25.0 and m["t2i_r5"] == 100.0 and m["t2i_medr"] == 2.5
    assert set(METRIC_KEYS) == set(m)


def test_ties_count_against_the_model():
    m = recall_metrics(torch.zeros(4, 4), torch.arange(4))
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0 and m["t2i_medr"] == 4.0


def test_contrastive_loss_treats_captions_of_one_image_as_positives():
    emb = F.normalize(torch.randn(3, 8), dim=-1)
    image_emb = emb[[0, 0, 1]]
    text_emb = F.normalize(torch.stack([emb[0] + 0.3 * emb[2], emb[0] - 0.3 * emb[2], emb[1]]), dim=-1)
    scale = torch.tensor(math.log(100.0))
    soft = contrastive_loss(cosine_matrix(image_emb, text_emb), torch.tensor([0, 0, 1]), scale)
    logits = 100.0 * image_emb @ text_emb.T
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])  # rows and columns alike
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert soft.item() == pytest.approx(expected.item(), rel=1e-5)
    # Two captions of image 0 scored against image 1's: the third pair is a negative for both.
    assert contrastive_loss(cosine_matrix(image_emb, text_emb), torch.tensor([0, 0, 0]), scale) != pytest.approx(soft.item())


def test_tasks_declare_their_metrics_headline_and_direction():
    assert list(TASKS) == ["retrieval", "vqa"] and tuple(TASKS["retrieval"].metrics) == METRIC_KEYS
    assert headline_metric("retrieval") == "t2i_r1" and headline_metric("vqa") == "vqa_acc"
    assert metric_label("t2i_r1") == "text→image R@1" and metric_label("vqa_acc") == "VQA accuracy"
    assert metric_label("made_up") == "made_up"
    assert lower_is_better("i2t_medr") and not lower_is_better("i2t_r10") and not lower_is_better("vqa_acc")
    with pytest.raises(TaskError, match="unknown task 'captioning': choose one of retrieval, vqa"):
        headline_metric("captioning")


def test_the_objective_keeps_its_batch_similarity_spread_for_the_guard(shapes):
    from core.backbones import load_backbone
    from core.data import read_dataset
    from core.tasks import retrieval
    from core.tasks.encoding import embed_media, embed_texts, media_spread, similarity_spread
    from tests.conftest import TINY

    backbone = load_backbone(TINY, seed=0)
    dataset = read_dataset(shapes, shapes.parent)
    data = retrieval.prepare(backbone, dataset, dataset.split("train")[:6])
    objective = retrieval.RetrievalObjective(backbone, data).eval()
    ids = torch.arange(len(data))
    with torch.no_grad():
        objective(ids)
    images, texts = embed_media(backbone, data.pixels), embed_texts(backbone, data.tokens)   # made apart from the objective
    expected = (backbone.logit_scale.detach().exp() * images[data.caption_image] @ texts.T).std(dim=1).mean()
    assert float(objective.last_spread) == pytest.approx(float(expected), rel=1e-4) and float(expected) > 1e-3
    # chance's loss: what the batch would cost with every pair scored alike
    alike = retrieval.contrastive_loss(torch.zeros(len(ids), len(ids)), data.caption_image[ids],
                                       backbone.logit_scale.detach())
    assert objective.chance_loss == pytest.approx(float(alike)) == pytest.approx(math.log(len(ids)))
    # embeddings collapsed onto one another have no spread at all
    same = F.normalize(torch.ones(4, 8), dim=-1)
    assert float(similarity_spread(cosine_matrix(same, same), torch.tensor(math.log(100)))) == pytest.approx(0, abs=1e-4)
    # the objective keeps its batch's distinct pictures' spread, each picture once however many captions it has
    repeated = torch.cat([ids, ids[:3]])
    with torch.no_grad():
        objective(repeated)
    pictures = data.caption_image[repeated].unique()
    assert float(objective.last_media_spread) == pytest.approx(media_spread(images[pictures]), rel=1e-4)
    assert media_spread(images[pictures]) > 1e-3
