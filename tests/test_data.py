import pytest
import torch

from autoslim.config import DataConfig
from autoslim.data import Split, batches, load_data, load_data_subsets, random_crop, random_flip
from autoslim.errors import UsageError


def test_digits_split_is_deterministic_disjoint_and_complete():
    a = load_data(DataConfig(name="digits", seed=3))
    b = load_data(DataConfig(name="digits", seed=3))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    rows = lambda s: {tuple(r.tolist()) for r in s.x.flatten(1)}  # noqa: E731
    assert not rows(a.train) & rows(a.test) - rows(a.val)  # no test image leaks into train (up to duplicates)
    c = load_data(DataConfig(name="digits", seed=4))
    assert not torch.equal(a.val.y, c.val.y)


def test_train_is_normalised_with_its_own_statistics(digits):
    x = digits.train.x
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 0.05


@pytest.mark.parametrize("subset,expected", [(100, 100), (0.5, None)])
def test_train_subset(subset, expected):
    full = load_data(DataConfig(name="digits"))
    part = load_data(DataConfig(name="digits", train_subset=subset))
    assert len(part.train) == (expected or round(0.5 * len(full.train)))
    assert len(part.val) == len(full.val) and len(part.test) == len(full.test)


def test_a_smaller_train_subset_is_the_first_images_of_a_larger_one_and_the_split_does_not_move():
    """Normalised with all training images' statistics, so one read of the files serves every subset exactly."""
    full = load_data(DataConfig(name="digits", seed=2))
    part = load_data(DataConfig(name="digits", seed=2, train_subset=300))
    assert torch.equal(part.train.x, full.train.x[:300]) and torch.equal(part.train.y, full.train.y[:300])
    assert torch.equal(part.val.x, full.val.x) and torch.equal(part.test.x, full.test.x)
    half, none, hundred = load_data_subsets(DataConfig(name="digits", seed=2, train_subset=300), [0.5, None, 100])
    assert len(half.train) == round(0.5 * len(full.train)) and torch.equal(none.train.x, full.train.x)
    assert torch.equal(hundred.train.x, part.train.x[:100]) and torch.equal(hundred.val.y, full.val.y)


def test_batches_cover_every_example_once_when_shuffled():
    s = Split(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    seen = torch.cat([y for _, y in batches(s, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float).view(2, 3, 5, 5)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_flip_flips_about_half():
    x = torch.randn(400, 1, 2, 3)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, f) and not torch.equal(o, a) for o, a, f in zip(out, x, x.flip(-1))])
    same = torch.tensor([torch.equal(o, a) for o, a in zip(out, x)])
    assert (flipped | same).all() and 150 < int(flipped.sum()) < 250


def test_synthetic_is_learnable_shape():
    d = load_data(DataConfig(name="synthetic", image_shape=[3, 6, 6], num_classes=5, num_samples=100))
    assert d.in_shape == (3, 6, 6) and d.num_classes == 5


def test_missing_mnist_files_name_the_expected_files_and_folder(tmp_path):
    with pytest.raises(UsageError) as e:
        load_data(DataConfig(name="mnist", data_dir=str(tmp_path), download=False))
    msg = str(e.value)
    assert msg.startswith("data.data_dir:") and str(tmp_path / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "\n" not in msg


def test_imagefolder_reads_a_users_images(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 16), (40 * i, 100 if cls == "cat" else 200, 0)).save(tmp_path / cls / f"{i}.png")
    d = load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path), image_size=12, val_fraction=0.2))
    assert d.in_shape == (3, 12, 12) and d.num_classes == 2
    assert len(d.train) + len(d.val) + len(d.test) == 12


def test_data_of_one_class_is_refused_whatever_its_source(tmp_path, monkeypatch):
    import autoslim.data as data_module
    from autoslim.data import RawData

    def one_class(*, data_dir, download, config):
        return RawData(torch.rand(20, 1, 4, 4), torch.zeros(20, dtype=torch.long), None, None, num_classes=2)

    data_module.DATASETS.add("one-class", one_class)
    try:
        with pytest.raises(UsageError, match=r"^data.name: one-class: the training images are of 1 class; "
                                             r"accepted: at least 2 classes$"):
            load_data(DataConfig(name="one-class"))
    finally:
        data_module.DATASETS.remove("one-class")
    from PIL import Image

    (tmp_path / "cat").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "cat" / f"{i}.png")
    with pytest.raises(UsageError, match=f"^data.data_dir: {tmp_path}: the training images are of 1 class"):
        load_data(DataConfig(name="imagefolder", data_dir=str(tmp_path)))


def test_test_subset_is_a_fixed_part_of_the_test_split():
    full = load_data(DataConfig(name="digits"))
    a, b = (load_data(DataConfig(name="digits", test_subset=50)) for _ in range(2))
    assert len(a.test) == 50 and torch.equal(a.test.x, b.test.x)
    rows = {tuple(r.tolist()) for r in full.test.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in a.test.x.flatten(1))
    assert len(a.train) == len(full.train)


def test_workers_starting_together_prepare_a_torchvision_set_one_at_a_time(tmp_path, monkeypatch):
    """Two loads of MNIST at once (two workers of a new study) never run torchvision's extraction together."""
    import threading
    import time

    import torchvision

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    inside, overlaps = [], []

    class SlowMNIST:  # stands in for torchvision's class: records overlapping preparations
        classes = list(range(10))

        def __init__(self, *, root, train, download):
            inside.append(1)
            overlaps.append(len(inside) > 1)
            time.sleep(0.2)
            self.data = torch.zeros(50 if train else 20, 28, 28, dtype=torch.uint8)
            self.targets = torch.arange(len(self.data)) % 10
            inside.pop()

    monkeypatch.setattr(torchvision.datasets, "MNIST", SlowMNIST)
    cfg = DataConfig(name="mnist", data_dir=str(tmp_path / "data"))
    threads = [threading.Thread(target=load_data, args=(cfg,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 4 and not any(overlaps)


def test_download_off_still_extracts_archives_already_on_disk(tmp_path, monkeypatch):
    """``download: false`` means "do not go online": the .gz files in data_dir are still verified and extracted
    (torchvision does both only when asked to download, and then downloads nothing)."""
    import torchvision

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (raw / f).write_bytes(b"")
    asked = []

    class RecordingMNIST:
        classes = list(range(10))

        def __init__(self, *, root, train, download):
            asked.append(download)
            self.data = torch.zeros(30, 28, 28, dtype=torch.uint8)
            self.targets = torch.arange(30) % 10

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torchvision.datasets, "MNIST", RecordingMNIST)
    load_data(DataConfig(name="mnist", data_dir=str(tmp_path), download=False))
    assert asked == [True, True]
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()  # one archive missing: nothing to extract, stay offline
    asked.clear()
    load_data(DataConfig(name="mnist", data_dir=str(tmp_path), download=False))
    assert asked == [False, False]
