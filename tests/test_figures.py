"""The plotly figures (core/figures.py) draw the numbers they are given."""
import numpy as np
import pytest
import torch
from PIL import Image

from core import figures
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


def test_aurora_heatmaps_combine_the_quarters_of_the_mlp():
    layers, rank = 2, 4
    readout = {
        "vision.modes.q": torch.ones(layers, rank),
        "vision.modes.fc1": torch.ones(4 * layers, rank),               # one mode vector per quarter
        "vision.delta_norm.q": torch.tensor([1.0, 2.0]),
        "vision.delta_norm.fc1": torch.tensor([3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
        "vision.gqt_gamma": torch.zeros(layers, 8),
    }
    figure = figures.gate_figure("aurora", None, readout)
    modes, norms, gamma = figure.data
    assert list(modes.x) == ["q", "fc1"]
    assert np.allclose(np.asarray(modes.z), [[2.0, 4.0], [2.0, 4.0]])         # ‖λ‖: √4 and √16
    assert np.allclose(np.asarray(norms.z), [[1.0, 5.0], [2.0, 2.0]])         # ‖ΔW‖_F of the whole fc1
    assert np.asarray(gamma.z).shape == (layers, 8)


def test_methods_without_gates_say_so():
    figure = figures.gate_figure("lora", None, {})
    assert "lora has no gates" in figure.layout.annotations[0].text


def test_overlay_puts_one_cell_on_each_patch():
    figure = figures.patch_overlay_figure(Image.new("RGB", (64, 64), "white"), torch.rand(4, 4), "gates")
    image, heatmap = figure.data
    assert np.asarray(image.z).shape == (224, 224, 3)
    assert heatmap.dx == heatmap.dy == 56 and heatmap.x0 == 28


def test_training_curve_with_metrics_per_epoch():
    result = {"train": {"step_losses": [4.0, 3.0, 2.5, 2.0], "epoch_losses": [3.5, 2.25],
                        "epoch_metrics": [{"t2i_r1": 10.0}, {"t2i_r1": 30.0}]}}
    steps, epochs, metric = figures.training_figure(result).data
    assert list(steps.y) == [4.0, 3.0, 2.5, 2.0]
    assert list(epochs.x) == [2.0, 4.0] and list(epochs.y) == [3.5, 2.25]
    assert list(metric.y) == [10.0, 30.0] and metric.yaxis == "y2"
    live = figures.training_figure({}, live=[1.0, 0.5])
    assert len(live.data) == 1 and "(live)" in live.layout.title.text


def test_compare_plots_each_run_against_its_budget():
    runs = [{"method": "aurora", "trainable_params": 44_032, "zero_shot": {"t2i_r1": 59.4}, "tuned": {"t2i_r1": 78.1}},
            {"method": "lora", "trainable_params": 1_536, "zero_shot": {"t2i_r1": 59.4}, "tuned": {"t2i_r1": 62.5}}]
    figure = figures.compare_figure(runs)
    points = figure.data[0]
    assert list(points.x) == [44_032, 1_536] and list(points.y) == [78.1, 62.5]
    assert list(points.text) == ["aurora", "lora"]
    assert figure.layout.shapes[0].y0 == pytest.approx(59.4)
