import torch

import core.bench
from core.backbones import load_backbone
from core.bench import bench
from core.pet import METHODS
from tests.conftest import TINY


def test_bench_measures_every_method_and_the_peft_peer_on_one_batch(monkeypatch):
    loaded = []

    def load(*arguments, **keywords):
        loaded.append(load_backbone(*arguments, **keywords))
        return loaded[-1]

    monkeypatch.setattr(core.bench, "load_backbone", load)
    result = bench(TINY, batch=4, steps=1)
    assert all(p.grad is None for p in loaded[0].parameters())   # full fine-tuning's gradients are freed
    assert set(result["methods"]) == set(METHODS) - {"zero_shot", "vlpet"} | {
        "vlpet_small", "vlpet_middleX", "vlpet_middleY", "vlpet_large"}
    assert result["methods"]["vlpet_middleY"]["trainable_params"] < result["methods"]["vlpet_large"]["trainable_params"]
    assert result["methods"]["lora"]["trainable_params"] == 2688
    assert result["methods"]["full"]["trainable_params"] == 2_550_593
    # PEFT's LoRA on nn.MultiheadAttention adapts the packed in_proj (r=2) and out_proj.
    assert result["peers"]["peft_lora"]["trainable_params"] == 2 * (2 * (64 + 192) + 2 * (64 + 64)) + \
        2 * (2 * (48 + 144) + 2 * (48 + 48))
    for row in [*result["methods"].values(), *result["peers"].values()]:
        assert row["step_s"] > 0 and row["peak_mem_mb"] >= 0
        assert row["step_over_forward"] == row["step_s"] / result["forward_s"]
        assert row["step_over_naive"] == row["step_s"] / result["naive_forward_s"]
    # a step through a tower holds its activations (about 1 MB here): freed blocks the timing pass
    # left resident must not hide them (they read 0 for every method)
    through_a_tower = {**result["peers"], **{name: row for name, row in result["methods"].items()
                                             if name not in ("linear_probe", "prolip")}}
    assert all(row["peak_mem_mb"] > 0.25 for row in through_a_tower.values()), through_a_tower
    # what users feel: the library's own forward as the reference, the precision that ran, a whole tune
    assert result["naive_forward_s"] > 0 and result["precision"] in ("fp32", "bf16")
    assert result["forward_over_naive"] == result["forward_s"] / result["naive_forward_s"]
    assert result["e2e_s"] > result["forward_s"] and result["e2e_over_naive"] == result["e2e_s"] / result[
        "naive_forward_s"]
    # the range test that found the tune's learning rate, inside it
    assert 0 < result["e2e_range_test_s"] < result["e2e_s"] and 0 < result["range_test_share_of_e2e"] < 1


def test_peak_memory_is_null_where_it_cannot_be_read(monkeypatch, tmp_path):
    """Without glibc (musl keeps freed blocks that hide the rise) or without /proc, a step's peak is not
    known: null, not a false 0, and the step is not run for nothing."""
    ran = []
    with monkeypatch.context() as other_libc:
        other_libc.setattr(core.bench.heap, "glibc", lambda: None)
        assert core.bench._peak_mb(lambda: ran.append(1), torch.device("cpu")) is None
    with monkeypatch.context() as no_proc:
        no_proc.setattr(core.bench, "_CLEAR_REFS", tmp_path / "clear_refs")
        assert core.bench._peak_mb(lambda: ran.append(1), torch.device("cpu")) is None
    assert ran == []
