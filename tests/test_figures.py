"""The plotly figures (core/figures.py) draw the numbers they are given."""
import numpy as np
import torch
from PIL import Image

from core import figures
from core.result import RunResult, TrainSummary
from core.pet import attach
from core.pet.vlpet import Config as VlPetConfig


def test_budget_bars_are_the_groups_the_total_and_the_backbone():
    figure = figures.budget_figure({"shared": 81_920, "modes": 6_912}, 223_744_258, file_bytes=355_000)
    bars = figure.data[0]
    assert list(bars.y) == ["shared", "modes", "all trainable", "backbone"]
    assert list(bars.x) == [81_920, 6_912, 88_832, 223_744_258]
    assert bars.text[2] == "88.8k (0.0397%)"
    assert figure.layout.xaxis.type == "log"
    assert "88,832 of 223,744,258 parameters (0.0397%) · saved file 346.7 KiB" in figure.layout.title.text


def test_vlpet_heatmap_is_the_mean_gate_per_layer_and_site():
    readout = {f"{tower}.{layer}.{site}": torch.full((2, 5), 0.1 * layer + (0.5 if site == "mlp" else 0))
               for tower in ("vision", "text") for layer in range(3) for site in ("attn", "mlp")}
    figure = figures.gate_figure("vlpet", VlPetConfig(granularity="middleX"), readout)
    vision = figure.data[0]
    assert list(vision.x) == ["attn", "mlp"] and list(vision.y) == ["layer 0", "layer 1", "layer 2"]
    assert np.allclose(np.asarray(vision.z), [[0.0, 0.5], [0.1, 0.6], [0.2, 0.7]])
    assert "middleX" in figure.layout.title.text


def test_aurora_heatmaps_are_the_norms_per_layer_and_projection(tiny):
    handle = attach(tiny, "aurora", {"rank": 8, "gqt": True})
    with torch.no_grad():   # a trained-looking state: V and the GQT gates away from zero
        for p in handle.trainable_parameters().values():
            p.normal_()
    readout = handle.gate_readout()
    figure = figures.gate_figure("aurora", None, readout)
    handle.detach()
    vision_modes, text_modes, vision_norms, text_norms, gamma, beta = figure.data
    assert list(vision_modes.x) == ["q", "k", "v", "out", "fc1", "fc2"]
    assert list(vision_modes.y) == ["layer 0", "layer 1"]
    # fc1 holds one mode vector per quarter of its hidden layer: ‖λ‖ is over all four.
    assert np.allclose(np.asarray(vision_modes.z)[:, 4], readout["vision.modes.fc1"].flatten(1).norm(dim=1).numpy())
    assert np.allclose(np.asarray(text_norms.z)[:, 2], readout["text.delta_norm.v"].numpy())
    assert np.asarray(gamma.z).shape == (2, 48) and "text: GQT beta" in [a.text for a in figure.layout.annotations]


def test_methods_without_gates_say_so():
    figure = figures.gate_figure("lora", None, {})
    assert "lora has no gates" in figure.layout.annotations[0].text


def test_overlay_puts_one_cell_on_each_patch():
    figure = figures.patch_overlay_figure(Image.new("RGB", (64, 64), "white"), torch.rand(4, 4), "gates")
    image, heatmap = figure.data
    assert np.asarray(image.z).shape == (224, 224, 3)
    assert heatmap.dx == heatmap.dy == 56 and heatmap.x0 == 28


def _train(**changes) -> TrainSummary:
    return TrainSummary(**{**dict(epochs=2, lr=1e-2, batch_size=2, shots=None, bf16=False, device="cpu",
                                  epoch_losses=[3.5, 2.25], step_losses=[4.0, 3.0, 2.5, 2.0],
                                  epoch_metrics=[{"t2i_r1": 10.0}, {"t2i_r1": 30.0}], cancelled=False), **changes})


def _run(method, trainable, zero_shot, tuned, task="retrieval", train=None) -> RunResult:
    return RunResult(method=method, config={}, backbone="offline", task=task, trainable_params=trainable,
                     zero_shot=zero_shot, tuned=tuned, train=train)


def test_training_curve_with_metrics_per_epoch():
    result = _run("lora", 1, None, None, train=_train())
    steps, epochs, metric = figures.training_figure(result).data
    assert list(steps.y) == [4.0, 3.0, 2.5, 2.0]
    assert list(epochs.x) == [2.0, 4.0] and list(epochs.y) == [3.5, 2.25]
    assert list(metric.y) == [10.0, 30.0] and metric.yaxis == "y2"
    vqa = _run("lora", 1, None, None, task="vqa", train=_train(epoch_metrics=[{"vqa_acc": 5.0}, {"vqa_acc": 7.5}]))
    assert list(figures.training_figure(vqa).data[2].y) == [5.0, 7.5]
    live = figures.training_figure(None, live=[1.0, 0.5])
    assert len(live.data) == 1 and "(live)" in live.layout.title.text


def test_compare_plots_each_run_against_its_budget():
    runs = [_run("aurora", 44_032, {"t2i_r1": 59.4}, {"t2i_r1": 78.1}),
            _run("lora", 1_536, {"t2i_r1": 59.4}, {"t2i_r1": 62.5})]
    figure = figures.compare_figure(runs)
    tuned, zero_shot = figure.data
    assert list(tuned.x) == [44_032, 1_536] and list(tuned.y) == [78.1, 62.5]
    assert list(tuned.text) == ["aurora", "lora"]
    assert list(zero_shot.x) == [44_032, 1_536] and list(zero_shot.y) == [59.4, 59.4]
    vqa_run = _run("aurora", 44_032, {"vqa_acc": 10.0}, {"vqa_acc": 20.0}, task="vqa")
    assert len(figures.compare_figure([*runs, vqa_run]).data[0].x) == 2   # one metric per chart
    assert figures.compare_figure([vqa_run, *runs]).layout.yaxis.title.text == "vqa_acc (%)"
