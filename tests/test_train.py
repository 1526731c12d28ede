import pytest
import torch

from autoslim.config import TrainConfig
from autoslim.data import Data, Split
from autoslim.errors import UsageError
from autoslim.methods import TrialContext
from autoslim.models import create_model
from autoslim.train import Callback, Diverged, evaluate, lr_factor, seed_everything, train


def fresh(data, seed=0):
    seed_everything(seed)
    return create_model("lenet300_100", in_shape=data.in_shape, num_classes=data.num_classes)


def test_training_learns_digits(digits):
    model = fresh(digits)
    before = evaluate(model, digits.val)
    history = train(model, digits, config=TrainConfig(epochs=5, lr=0.05), seed=0)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["val_accuracy"] > 0.85 > before
    assert history[-1]["loss"] < history[0]["loss"]


def test_same_seed_same_weights(digits):
    a, b = fresh(digits), fresh(digits)
    for m in (a, b):
        train(m, digits, config=TrainConfig(epochs=1), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = fresh(digits)
    train(c, digits, config=TrainConfig(epochs=1), seed=8)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_hooks_are_called_and_extra_loss_counts(digits):
    class Spy(Callback):
        steps, epochs = 0, []

        def extra_loss(self, model):
            return 100.0 * sum(p.pow(2).sum() for p in model.parameters())

        def on_step_end(self, model, step):
            Spy.steps = step

        def on_epoch_end(self, model, record):
            Spy.epochs.append(record["epoch"])

    model = fresh(digits)
    norm0 = sum(p.pow(2).sum().item() for p in model.parameters())
    train(model, digits, config=TrainConfig(epochs=2, batch_size=256, weight_decay=0, lr=0.001), callbacks=[Spy()])
    assert Spy.steps == 2 * -(-len(digits.train) // 256) and Spy.epochs == [1, 2]
    assert sum(p.pow(2).sum().item() for p in model.parameters()) < 0.5 * norm0  # the regularizer shrank weights


def test_divergence_is_reported(digits):
    with pytest.raises(Diverged, match="training loss is"):
        train(fresh(digits), digits, config=TrainConfig(epochs=3, lr=1e6, momentum=0.9), seed=0)


def test_schedules():
    cos = lr_factor(TrainConfig(schedule="cosine"), 10)
    assert cos(0) == 1 and abs(cos(5) - 0.5) < 1e-9
    step = lr_factor(TrainConfig(schedule="step", milestones=[0.5, 0.75], gamma=0.1), 8)
    assert [round(step(e), 6) for e in (0, 3, 4, 6, 7)] == [1, 1, 0.1, 0.01, 0.01]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
def test_deterministic_cuda_training_is_bit_identical():
    """train.deterministic: two runs of a conv net on the GPU with one seed end with the same weights,
    and the global kernel settings are back as they were afterwards."""
    from autoslim.config import DataConfig
    from autoslim.data import load_data

    data = load_data(DataConfig(name="synthetic", num_samples=512, image_shape=[1, 16, 16], num_classes=4),
                     device=torch.device("cuda"))
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = create_model("lenet5", in_shape=data.in_shape, num_classes=data.num_classes)
        train(model, data, config=TrainConfig(epochs=2, batch_size=32, deterministic=True), seed=0)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_deterministic_is_a_train_setting_of_the_study_file():
    from autoslim.config import StudyConfig

    cfg = StudyConfig.from_dict({"name": "d", "train": {"deterministic": True}})
    assert cfg.train.deterministic is True
    assert TrainConfig().deterministic is False


def test_a_phase_trained_with_its_own_config_runs_that_configs_epochs(digits):
    """TrialContext.train(config=...) takes the epochs from the config it is given (a fine-tune's), not the study's."""
    ctx = TrialContext(data=digits, train_config=TrainConfig(epochs=3, batch_size=64))
    records = ctx.train(fresh(digits), phase="finetune", config=TrainConfig(epochs=1, batch_size=64))
    assert [r["phase"] for r in records] == ["finetune"] and len(ctx.history) == 1
    assert len(ctx.train(fresh(digits))) == 3 and ctx.epochs_done == 4


class AuxHead(torch.nn.Module):
    """Like torchvision's GoogLeNet with aux_logits: (logits, aux) in training mode, logits in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_a_model_with_auxiliary_outputs_in_training_mode_is_refused_in_one_line_before_a_step():
    """Old code crashed in cross_entropy with a raw TypeError (torchvision's googlenet, aux_logits by default)."""
    split = Split(torch.randn(8, 1, 2, 2), torch.arange(8) % 3)
    model = AuxHead()
    before = model.body.weight.detach().clone()
    with pytest.raises(UsageError, match=r"AuxHead returns tuple, not one tensor of logits.*aux_logits: false"):
        train(model, Data("t", split, split, split, 3), config=TrainConfig(epochs=1, batch_size=4))
    assert torch.equal(model.body.weight, before)
