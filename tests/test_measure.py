import dataclasses
import io
import math
import random
import time

import pytest
import torch
from torch import nn

from autoslim.artifacts import trial_note
from autoslim.config import LatencyConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.errors import UsageError
from autoslim.measure import count_flops, count_nonzeros, count_params, latency, layer_widths, measure, saved_size
from autoslim.models import create_model
from autoslim.trial import run_trial


def test_lenet5_flops_equal_the_hand_count():
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    macs = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_flops(model, in_shape=(1, 28, 28)) == 2 * macs


def test_nonzeros_and_size():
    model = nn.Sequential(nn.Linear(10, 4))
    with torch.no_grad():
        model[0].weight[:2] = 0
    assert count_params(model) == 44 and count_nonzeros(model) == 24
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert saved_size(model) == buf.tell()


def test_measure_leaves_the_model_alone():
    model = create_model("resnet20", in_shape=(3, 32, 32), num_classes=10).train()
    m = measure(model, in_shape=(3, 32, 32), latency_config=LatencyConfig(time=0.01))
    assert model.training and m.latency_ms > 0 and m.params == count_params(model)
    assert layer_widths(model)["layer1.0.conv1"] == 16 and layer_widths(model)["fc"] == 10


class SlowFirstCall(nn.Module):
    """A small layer whose first forward sleeps 0.3 s: a cold start (lazy initialisation, caches, page faults)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.calls = nn.Linear(16, 4), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.3)
        return self.fc(x)


def test_latency_is_measured_after_a_warm_up_and_reports_its_spread():
    m = measure(SlowFirstCall(), in_shape=(16,))
    assert m.latency_ms < 30  # a tenth of the cold call: the cold call is not the number
    assert math.isfinite(m.latency_iqr_ms) and 0 <= m.latency_iqr_ms
    assert m.to_dict()["latency_iqr_ms"] == m.latency_iqr_ms


class Jittery(nn.Module):
    """A layer whose calls take 0 to 1 ms more at random: the blocks of calls differ."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gen = nn.Linear(16, 4), random.Random(0)

    def forward(self, x):
        time.sleep(0.001 * self.gen.random())
        return self.fc(x)


def test_latency_spread_is_that_of_its_blocks():
    median, iqr = latency(Jittery(), in_shape=(16,))
    assert 0 < iqr < median < 5


class Batched(nn.Module):
    """Sleeps 0.1 ms per example: its latency grows with the batch size by a known amount."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        time.sleep(1e-4 * len(x))
        return self.fc(x)


def test_latency_is_measured_at_the_batch_size_the_study_sets():
    one, _ = latency(Batched(), in_shape=(16,), config=LatencyConfig(batch_size=1, time=0.02))
    many, _ = latency(Batched(), in_shape=(16,), config=LatencyConfig(batch_size=40, time=0.05))
    assert many - one > 0.8 * 39 * 0.1  # ms: 39 more examples of at least 0.1 ms each


def test_onnxruntime_latency_times_the_exported_graph():
    """The Python-side sleep of Batched is not in its ONNX graph: ONNX Runtime's latency leaves it out."""
    config = LatencyConfig(batch_size=40, time=0.05)
    in_torch, _ = latency(Batched(), in_shape=(16,), config=config)
    in_ort, iqr = latency(Batched(), in_shape=(16,), config=dataclasses.replace(config, runtime="onnxruntime"))
    assert in_torch > 4 > in_ort > 0 and 0 <= iqr


def test_latency_settings_are_checked():
    with pytest.raises(UsageError, match=r"latency.device: onnxruntime is measured on the CPU"):
        LatencyConfig(runtime="onnxruntime", device="study")
    with pytest.raises(UsageError, match=r"^latency.batch_size: "):
        StudyConfig.from_dict({"latency": {"batch_size": 0}})
    with pytest.raises(UsageError, match=r"^latency.runtime: "):
        StudyConfig.from_dict({"latency": {"runtime": "tensorrt"}})


def test_a_trial_measures_latency_as_its_config_says(digits):
    config = TrialConfig(method="trimming", params={"rounds": 1, "retrain_epochs": 1}, model="lenet300_100",
                         train=TrainConfig(epochs=1), latency=LatencyConfig(batch_size=8, threads=2))
    result = run_trial(config, data=digits)
    assert TrialConfig.from_dict(result.user_attrs()["config"]).latency == config.latency
    assert "| latency (batch 8, CPU, 2 threads) |" in trial_note(0, result)
