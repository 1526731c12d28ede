"""Whole datasets as tensors in memory, and batching/augmentation on tensors; or streamed through a DataLoader.

A dataset is loaded once per process into three :class:`Split` objects
(train / validation / test) of normalised float images ``(N, C, H, W)`` and
integer labels. Shuffling, batching, random crops and flips are tensor
operations on whole batches: there is no per-sample ``DataLoader`` on the hot
path, and on a GPU the data lives on the GPU. This is the default.

Data that does not fit in memory is streamed instead: :class:`StreamSplit`
reads a ``torch.utils.data.Dataset`` through ``DataLoader`` workers
(``data.workers``), with the same interface. ``imagefolder`` streams with
``data.stream: true`` (unset: above :data:`STREAM_ABOVE` images), with
torchvision transforms; a source that returns torch datasets hands them to
:func:`streamed_data`, which splits them as in-memory data is split.

Sources are a name-keyed registry (:func:`register_dataset`); a study file may also
name an installed package's entry point (group ``autoslim.datasets``) or an import
string ``package.module:function``. A source is called with those of ``data_dir``,
``download`` and ``config`` (the :class:`~autoslim.config.DataConfig`) that its
signature names, and returns a :class:`RawData`, tensors (``(train_x, train_y)``,
``(train_x, train_y, test_x, test_y)`` or a dict of :class:`RawData`'s fields) or
``torch.utils.data`` datasets / DataLoaders of ``(image, label)`` (one: training
images; two: training and test images), which :func:`as_raw_data` reads into memory.
The built-in sources:

- ``digits``: scikit-learn's 8x8 digits (1,797 images), embedded, offline; the default.
- ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's classes reading ``data_dir``
  (downloading when online).
- ``imagefolder``: a user's own images in torchvision's ImageFolder layout.
- ``synthetic``: generated class-conditional images, for tests.

>>> from autoslim.config import DataConfig
>>> data = load_data(DataConfig(name="digits"))
>>> data.in_shape, data.num_classes, len(data.train) + len(data.val) + len(data.test)
((1, 8, 8), 10, 1797)
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autoslim.errors import UsageError
from autoslim.registry import Registry, check_callable, named_arguments
from autoslim.storage import FileLock


@dataclass
class Split:
    """Images ``x`` (float, normalised, N x C x H x W) and labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one input."""
        return tuple(self.x.shape[1:])

    def head(self, n: int) -> "Split":
        """The first ``n`` examples (all if fewer), in memory."""
        return Split(self.x[:n], self.y[:n])

    def generator(self, seed: int) -> torch.Generator:
        """A generator for :meth:`batches`' shuffling, on the split's device."""
        return torch.Generator(device=self.x.device).manual_seed(seed)

    def batches(self, *, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                crop_padding: int = 0, flip: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`batches` of this split."""
        return batches(self, batch_size=batch_size, shuffle=shuffle, generator=generator,
                       crop_padding=crop_padding, flip=flip)


@dataclass
class Data:
    """A dataset split three ways, with the augmentation that fits it, and what a model of it expects as input:
    images normalised per channel with ``mean`` and ``std`` (of the raw images, in [0, 1] for image files) and
    one of ``classes`` (names, in label order) as output.

    The splits are in-memory :class:`Split` s (the fast default), or :class:`StreamSplit` s read through a
    ``DataLoader`` (data that does not fit in memory; their augmentation is in the dataset's transforms). Both
    offer what the training loop, evaluation, the methods (example inputs, APoZ statistics: :meth:`Split.head`),
    measurement (``shape``) and checkpoints (the shuffling ``generator``) use."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    crop_padding: int = 0
    flip: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.val.shape

    @property
    def device(self) -> torch.device:
        """Where batches are: the device a model of this data trains on."""
        return self.val.device

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamSplit)

    def examples(self, n: int) -> torch.Tensor:
        """The first ``n`` validation inputs, in memory (surgery traces a model with them)."""
        return self.val.head(n).x

    def input_spec(self) -> dict:
        """What a model trained on this data expects, for whoever runs it: input shape, normalisation, classes.

        >>> from autoslim.config import DataConfig
        >>> spec = load_data(DataConfig(name="digits")).input_spec()
        >>> spec["shape"], len(spec["mean"]), spec["classes"][:3]
        ([1, 8, 8], 1, ['0', '1', '2'])
        """
        return {"shape": list(self.in_shape), "mean": list(self.mean), "std": list(self.std),
                "classes": list(self.classes)}

    def to(self, device) -> "Data":
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device),
                                   test=self.test.to(device))


@dataclass
class RawData:
    """What a source returns: uint8/float images N x C x H x W, labels, and its augmentation."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    num_classes: int
    crop_padding: int = 0
    flip: bool = False
    classes: Sequence[str] | None = None  # names in label order; default "0", "1", ...


Source = Callable[..., Any]
DATASETS: Registry[Source] = Registry("data set", field="data.name", group="autoslim.datasets", check=check_callable)


def register_dataset(name: str) -> Callable[[Source], Source]:
    """Register ``source(*, data_dir, download, config) -> RawData`` under ``name`` (a source may name fewer of
    those arguments, and return anything :func:`as_raw_data` reads)."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_data(config, *, device: str | torch.device = "cpu") -> Data:
    """Load the dataset described by a :class:`autoslim.config.DataConfig`.

    The split is deterministic in ``config.seed``: the official test set is the
    test split (digits, synthetic and single-folder image sets hold out
    ``test_fraction``), ``val_fraction`` of the training images is the
    validation split, and ``train_subset`` (a count, or a fraction in (0, 1])
    keeps the first images of the shuffled remainder; ``test_subset`` (a count)
    keeps a fixed random part of the test split. Images are normalised with
    the per-channel mean and standard deviation of all training images (those
    ``train_subset`` keeps and those it leaves out), so the training images of
    a smaller subset are exactly the first ones of a larger subset's, and the
    validation and test splits do not depend on it.
    """
    (data,) = load_data_subsets(config, [config.train_subset], device=device)
    return data


def load_data_subsets(config, train_subsets: Sequence[int | float | None], *,
                      device: str | torch.device = "cpu") -> list[Data]:
    """:func:`load_data` for each of ``train_subsets`` in place of ``config.train_subset``, reading the files once.

    Every result has the same validation and test splits; each training split
    is the first images of the largest.

    >>> from autoslim.config import DataConfig
    >>> part, full = load_data_subsets(DataConfig(name="digits"), [100, None])
    >>> len(part.train), torch.equal(part.train.x, full.train.x[:100]), torch.equal(part.val.x, full.val.x)
    (100, True, True)
    """
    if config.stream is not None and config.stream and config.name != "imagefolder":
        raise UsageError(f"data.stream: {config.name} is read into memory; accepted: stream with imagefolder "
                         "(a source that returns torch datasets streams them: autoslim.data.streamed_data)")
    if config.name == "imagefolder" and _streams(config):
        return [stream_imagefolder(config, train_subset=n, device=device) for n in train_subsets]
    raw = read_source(config)
    _check_classes(raw, config)
    gen = torch.Generator().manual_seed(config.seed)
    x, y = raw.train_x, raw.train_y
    if raw.test_x is None:
        perm = torch.randperm(len(y), generator=gen)
        n_test = max(1, int(round(config.test_fraction * len(y))))
        test_x, test_y = x[perm[:n_test]], y[perm[:n_test]]
        x, y = x[perm[n_test:]], y[perm[n_test:]]
    else:
        test_x, test_y = raw.test_x, raw.test_y
    if config.test_subset is not None and config.test_subset < len(test_y):
        keep = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(config.seed))[:config.test_subset]
        test_x, test_y = test_x[keep], test_y[keep]
    perm = torch.randperm(len(y), generator=gen)
    n_val = max(1, int(round(config.val_fraction * len(y))))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_x = x[train_idx].float()
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    del train_x

    def split(images, labels) -> Split:
        return Split(((images.float() - mean) / std).contiguous(), labels.long()).to(device)

    augment = config.augment if config.augment is not None else (raw.crop_padding > 0 or raw.flip)
    val, test = split(x[val_idx], y[val_idx]), split(test_x, test_y)
    counts = [train_count(subset, len(train_idx)) for subset in train_subsets]
    largest = split(x[train_idx[:max(counts)]], y[train_idx[:max(counts)]])
    trains = {n: largest if n == len(largest) else Split(largest.x[:n].clone(), largest.y[:n].clone())
              for n in sorted(set(counts))}
    classes = tuple(map(str, raw.classes or range(raw.num_classes)))
    return [Data(config.name, trains[n], val, test, raw.num_classes, crop_padding=raw.crop_padding if augment else 0,
                 flip=raw.flip if augment else False, mean=tuple(mean.flatten().tolist()),
                 std=tuple(std.flatten().tolist()), classes=classes)
            for n in counts]


IN_MEMORY_LIMIT = 8 * 2**30  # bytes of float images a data source may hand over as a dataset to read into memory
_RAW_KEYS = [f.name for f in dataclasses.fields(RawData)]


def read_source(config) -> RawData:
    """Call the source ``config.name`` names (with the arguments its signature names) and read what it returns
    into a :class:`RawData` (:func:`as_raw_data`)."""
    source = DATASETS.get(config.name)
    where = f"data.name: {config.name!r}"
    try:
        value = source(**named_arguments(source, {"data_dir": config.data_dir, "download": config.download,
                                                  "config": config}))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{where} failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    return as_raw_data(value, where=where)


def as_raw_data(value: Any, *, where: str) -> RawData:
    """What a data source returned, as a :class:`RawData` in memory; one UsageError line naming ``where`` if
    it is none of: a RawData; ``(train_x, train_y[, test_x, test_y])`` tensors or arrays (images N x C x H x W
    or N x H x W, uint8 in 0-255 or float; integer labels); a dict of RawData's fields; a ``torch.utils.data``
    Dataset or DataLoader of ``(image, label)`` pairs (images as tensors, arrays or PIL images), or a pair of
    them (training, test). Datasets are read whole, up to :data:`IN_MEMORY_LIMIT` bytes.

    >>> raw = as_raw_data((torch.zeros(6, 8, 8, dtype=torch.uint8), [0, 1, 2, 0, 1, 2]), where="data.name: 'x:y'")
    >>> raw.train_x.shape, raw.num_classes, raw.test_x
    (torch.Size([6, 1, 8, 8]), 3, None)
    >>> as_raw_data(42, where="data.name: 'x:y'")
    Traceback (most recent call last):
    ...
    autoslim.errors.UsageError: data.name: 'x:y' returned int; accepted: a RawData, (train_x, train_y[, test_x, test_y]) tensors, a dict of RawData's fields, or torch.utils.data datasets (train[, test])
    """
    if isinstance(value, RawData):
        return value
    if _is_dataset(value) or (isinstance(value, (tuple, list)) and 1 <= len(value) <= 2
                              and all(_is_dataset(v) for v in value)):
        sets = [value] if _is_dataset(value) else list(value)
        (train_x, train_y, classes), *test = [_read_dataset(ds, where=f"{where} dataset {i}")
                                              for i, ds in enumerate(sets)]
        value = {"train_x": train_x, "train_y": train_y, "classes": classes}
        if test:
            value |= {"test_x": test[0][0], "test_y": test[0][1]}
    elif isinstance(value, (tuple, list)) and len(value) in (2, 4):
        value = dict(zip(_RAW_KEYS, value))
    if not isinstance(value, dict):
        raise UsageError(f"{where} returned {type(value).__name__}; accepted: a RawData, (train_x, train_y[, test_x, "
                         "test_y]) tensors, a dict of RawData's fields, or torch.utils.data datasets (train[, test])")
    return _raw_from_dict(value, where=where)


def _raw_from_dict(value: dict, *, where: str) -> RawData:
    unknown = sorted(set(value) - set(_RAW_KEYS))
    if unknown or "train_x" not in value or "train_y" not in value:
        what = f"key {unknown[0]!r}" if unknown else "no train_x or train_y"
        raise UsageError(f"{where} returned a dict with {what}; accepted keys: {', '.join(_RAW_KEYS)}")
    d = dict(value)
    for split in ("train", "test"):
        x, y = d.get(f"{split}_x"), d.get(f"{split}_y")
        if (x is None) != (y is None):
            raise UsageError(f"{where}: {split}_x and {split}_y must be given together")
        if x is not None:
            d[f"{split}_x"], d[f"{split}_y"] = _images_and_labels(x, y, where=f"{where} {split}")
    labels = torch.cat([d["train_y"]] + ([d["test_y"]] if d.get("test_y") is not None else []))
    classes = d.get("classes")
    d.setdefault("num_classes", len(classes) if classes else int(labels.max()) + 1 if len(labels) else 0)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= d["num_classes"]):
        raise UsageError(f"{where}: labels run from {int(labels.min())} to {int(labels.max())}; accepted: 0 to "
                         f"num_classes - 1 = {d['num_classes'] - 1}")
    return RawData(**{"test_x": None, "test_y": None, **d})


def _images_and_labels(x: Any, y: Any, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images N x C x H x W (a grey N x H x W gets its channel; uint8 becomes [0, 1]) and int64 labels."""
    try:
        x, y = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{where}: images and labels must be tensors or arrays: {e}") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"{where}: expected images N x C x H x W (or N x H x W) and N labels, got images of "
                         f"shape {tuple(x.shape)} and labels of shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise UsageError(f"{where}: labels must be integers (class indices), got {y.dtype}")
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()), y.long()


def _is_dataset(value: Any) -> bool:
    return isinstance(value, (torch.utils.data.Dataset, torch.utils.data.DataLoader))


def _read_dataset(ds, *, where: str) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """Every ``(image, label)`` of a map-style or iterable dataset, or every batch of a DataLoader, stacked."""
    from torchvision.transforms.functional import pil_to_tensor

    def tensor(img) -> torch.Tensor:
        return pil_to_tensor(img) if hasattr(img, "getbands") else torch.as_tensor(np.asarray(img))

    batched = isinstance(ds, torch.utils.data.DataLoader)
    xs, ys = [], []
    for i, item in enumerate(ds):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UsageError(f"{where}: item {i} is {type(item).__name__}; accepted: (image, label) pairs")
        x = tensor(item[0])
        if i == 0 and not batched and hasattr(ds, "__len__") and len(ds) * x.numel() * 4 > IN_MEMORY_LIMIT:
            raise UsageError(f"{where}: {len(ds):,} images of shape {tuple(x.shape)} take more than "
                             f"{IN_MEMORY_LIMIT / 2**30:.0f} GiB as floats in memory; accepted: a smaller data set")
        xs.append(x if batched else x[None])
        ys.append(torch.as_tensor(item[1]).reshape(-1))
    if not xs:
        raise UsageError(f"{where}: the dataset is empty")
    x = torch.cat(xs)
    classes = getattr(getattr(ds, "dataset", ds), "classes", None)  # a DataLoader's dataset's
    return (x.float() / 255.0 if x.dtype == torch.uint8 else x), torch.cat(ys), classes


def _check_classes(raw: RawData, config) -> None:
    """Refuse data of fewer than two classes (every source): any classifier of it is 100% accurate."""
    found = int(torch.unique(raw.train_y).numel())
    if min(found, raw.num_classes) < 2:
        where = f"data.data_dir: {config.data_dir}" if config.data_dir else f"data.name: {config.name}"
        raise UsageError(f"{where}: the training images are of {min(found, raw.num_classes)} class; "
                         "accepted: at least 2 classes")


def train_count(train_subset: int | float | None, available: int) -> int:
    """How many of ``available`` training images ``train_subset`` keeps (a count, a fraction, or None: all).

    >>> train_count(None, 500), train_count(0.5, 500), train_count(100, 500), train_count(900, 500)
    (500, 250, 100, 500)
    """
    if train_subset is None:
        return available
    n = train_subset if isinstance(train_subset, int) else int(round(train_subset * available))
    return min(available, max(1, n))


def batches(split: Split, *, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            crop_padding: int = 0, flip: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of ``split``; augmentation is applied to whole batches.

    >>> s = Split(torch.zeros(10, 1, 4, 4), torch.arange(10))
    >>> [len(y) for _, y in batches(s, batch_size=4)]
    [4, 4, 2]
    """
    n = len(split)
    order = torch.randperm(n, device=split.x.device, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        x, y = split.x[idx], split.y[idx]
        if crop_padding:
            x = random_crop(x, crop_padding, generator)
        if flip:
            x = random_flip(x, generator)
        yield x, y


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad a batch by ``padding`` and crop every image back at its own random offset."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
    rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip every image of a batch horizontally with probability 1/2."""
    mask = torch.rand(len(x), device=x.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------- sources


@register_dataset("digits")
def _digits(*, data_dir, download, config) -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    return RawData(x, torch.from_numpy(d.target), None, None, 10)


@register_dataset("synthetic")
def _synthetic(*, data_dir, download, config) -> RawData:
    """Class templates plus noise: learnable, deterministic in ``config.seed``."""
    c, h, w = config.image_shape
    gen = torch.Generator().manual_seed(1234 + config.seed)
    k = config.num_classes
    templates = torch.randn(k, c, h, w, generator=gen)
    y = torch.arange(config.num_samples) % k
    x = templates[y] + 0.8 * torch.randn(config.num_samples, c, h, w, generator=gen)
    return RawData(x, y, None, None, k)


_TORCHVISION = {
    # name: (class name, folder torchvision reads under data_dir, files it needs, crop padding, flip)
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"], 0, False),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                                           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"], 0, False),
    "cifar10": ("CIFAR10", ".", ["cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/)"], 4, True),
}


def _torchvision_root(name: str, data_dir: str | None) -> Path:
    """The folder torchvision should read: ``data_dir``, or a writable cached copy of it.

    torchvision extracts archives beside them; a read-only folder (a shared
    mount) is copied once to ``~/.cache/autoslim/<name>``.
    """
    root = Path(data_dir or Path.home() / ".cache" / "autoslim" / "data").expanduser()
    cls_name, sub, files, _, _ = _TORCHVISION[name]
    src = root / sub
    if src.is_dir() and not _writable(src):
        cache = Path.home() / ".cache" / "autoslim" / "data"
        dst = cache / sub
        for f in src.iterdir():
            if f.is_file() and not (dst / f.name).exists():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst / f.name)
        return cache
    return root


@contextlib.contextmanager
def _preparing(name: str) -> Iterator[None]:
    """Holds a per-user lock on data set ``name`` while its files are copied, downloaded or extracted.

    Workers of one study often start together on a fresh folder; without it one
    reads the archive another is still writing."""
    cache = Path.home() / ".cache" / "autoslim"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache / f"{name}.lock")
        lock.acquire()
    except OSError:  # no writable home: go on unlocked, as before
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _writable(path: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _torchvision_source(name: str):
    def source(*, data_dir, download, config) -> RawData:
        import torchvision

        cls_name, sub, files, crop, flip = _TORCHVISION[name]
        cls = getattr(torchvision.datasets, cls_name)
        root = Path(data_dir or Path.home() / ".cache" / "autoslim" / "data")
        try:
            with _preparing(name):
                root = _torchvision_root(name, data_dir)
                # the archives on disk: torchvision checks their md5 and extracts them, never going online
                local = all((root / sub / f).is_file() for f in files)
                train, test = [cls(root=str(root), train=t, download=download or local) for t in (True, False)]
        except Exception as e:  # missing files, offline download, corrupt archive
            where = Path(data_dir or root).expanduser() / sub
            raise UsageError(
                f"data.data_dir: {name} files not found or unreadable in {where} "
                f"(expected {', '.join(files)}); download {'failed' if download else 'is off'}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
            ) from None
        return RawData(*_images(train), *_images(test), num_classes=len(train.classes), crop_padding=crop, flip=flip,
                       classes=list(train.classes))

    return source


def _images(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(ds.data)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST N x H x W, CIFAR N x H x W x C
    return (x.float() / 255.0), torch.as_tensor(ds.targets)


for _name in _TORCHVISION:
    register_dataset(_name)(_torchvision_source(_name))


@register_dataset("imagefolder")
def _imagefolder(*, data_dir, download, config) -> RawData:
    """torchvision's ImageFolder layout: ``data_dir/<class>/<image>``, or ``data_dir/train`` and
    ``data_dir/test`` each in that layout. Images are resized to ``image_size``."""
    import torchvision
    from torchvision import transforms

    root = _image_root(data_dir)
    size = config.image_size or 32
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def read(folder: Path):
        try:
            ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"data.data_dir: {folder}: {e}") from None
        xs, ys = zip(*(_read_image(ds, i) for i in range(len(ds))))
        return torch.stack(xs), torch.tensor(ys), list(ds.classes)

    if (root / "train").is_dir() and (root / "test").is_dir():
        tx, ty, classes = read(root / "train")
        sx, sy, _ = read(root / "test")
        return RawData(tx, ty, sx, sy, len(classes), crop_padding=size // 8, flip=True, classes=classes)
    x, y, classes = read(root)
    return RawData(x, y, None, None, len(classes), crop_padding=size // 8, flip=True, classes=classes)


def _read_image(ds, index: int):
    """Image ``index`` of an ImageFolder set; a UsageError line naming the file if it cannot be read."""
    try:
        return ds[index]
    except Exception as e:  # PIL: UnidentifiedImageError, "image file is truncated", broken PNG streams, ...
        detail = " ".join(str(e).split())
        raise UsageError(f"data.data_dir: {ds.samples[index][0]} is not a readable image: "
                         f"{type(e).__name__}{': ' + detail if detail else ''}") from None


# --------------------------------------------------------------------------- streamed data (DataLoader)

STREAM_ABOVE = 20_000  # an imagefolder of more images streams unless data.stream says otherwise
NORM_IMAGES = 512  # training images (a fixed random sample) whose mean and std normalise a streamed image folder


class StreamSplit:
    """A split read batch by batch from a ``torch.utils.data.Dataset`` of ``(input, label)`` through a
    ``DataLoader`` with ``workers`` processes; batches are moved to ``device``. The same interface as
    :class:`Split` (``len``, ``device``, ``shape``, :meth:`batches`, :meth:`head`, :meth:`generator`), so the
    training loop, evaluation and methods take either. Augmentation lives in the dataset's transforms; the
    shuffling order is drawn from the CPU ``generator`` (a checkpoint saves its state, so a resumed epoch
    reads the same order)."""

    def __init__(self, dataset, *, device: str | torch.device = "cpu", workers: int = 0) -> None:
        self.dataset, self._device, self.workers = dataset, torch.device(device), workers
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def to(self, device) -> "StreamSplit":
        return StreamSplit(self.dataset, device=device, workers=self.workers)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shape(self) -> tuple[int, ...]:
        if self._shape is None:
            self._shape = tuple(torch.as_tensor(self.dataset[0][0]).shape)
        return self._shape

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def batches(self, *, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                crop_padding: int = 0, flip: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle,
                                             generator=generator, num_workers=self.workers,
                                             pin_memory=self._device.type == "cuda")
        for x, y in loader:
            yield x.to(self._device, non_blocking=True), torch.as_tensor(y).to(self._device, non_blocking=True)

    def head(self, n: int) -> Split:
        xs, ys = zip(*(self.dataset[i] for i in range(min(n, len(self)))))
        return Split(torch.stack([torch.as_tensor(x) for x in xs]).to(self._device),
                     torch.as_tensor(ys, dtype=torch.long).to(self._device))


def split_indices(n: int, *, config, has_test: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Train, validation and (without a test set of its own) test indices of ``n`` examples: the split
    :func:`load_data_subsets` makes of in-memory data, deterministic in ``config.seed``."""
    gen = torch.Generator().manual_seed(config.seed)
    rest, test = torch.arange(n), None
    if not has_test:
        perm = torch.randperm(n, generator=gen)
        n_test = max(1, int(round(config.test_fraction * n)))
        test, rest = perm[:n_test], perm[n_test:]
    perm = torch.randperm(len(rest), generator=gen)
    n_val = max(1, int(round(config.val_fraction * len(rest))))
    return rest[perm[n_val:]], rest[perm[:n_val]], test


def streamed_data(name: str, train, *, config, num_classes: int, test=None, plain=None, classes=None,
                  mean: Sequence[float] = (), std: Sequence[float] = (),
                  device: str | torch.device = "cpu", train_subset: int | float | None = None) -> Data:
    """:class:`Data` streamed from torch datasets: the seam for sources that return ``torch.utils.data``
    datasets too large for memory.

    ``train`` yields ``(input tensor, label)`` with training augmentation (a ``DataLoader`` stands for its
    dataset: batches are made with the study's ``train.batch_size`` and ``data.workers``); ``plain`` is the same examples
    without it (default ``train``): the validation split (``config.val_fraction``) and, without a ``test``
    set, the test split (``config.test_fraction``) are taken from it, as :func:`load_data` splits in-memory
    data. ``train_subset`` keeps the first training examples; ``config.test_subset`` a fixed random part of
    the test split. ``mean``/``std`` are the normalisation the transforms apply (recorded in model files).
    """
    train, test, plain = (_dataset(d) for d in (train, test, plain))
    plain = train if plain is None else plain
    train_idx, val_idx, test_idx = split_indices(len(train), config=config, has_test=test is not None)
    train_idx = train_idx[:train_count(train_subset, len(train_idx))]
    test = test if test is not None else torch.utils.data.Subset(plain, test_idx.tolist())
    if config.test_subset is not None and config.test_subset < len(test):
        keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(config.seed))[:config.test_subset]
        test = torch.utils.data.Subset(test, keep.tolist())

    def split(dataset, idx=None) -> StreamSplit:
        part = dataset if idx is None else torch.utils.data.Subset(dataset, idx.tolist())
        return StreamSplit(part, device=device, workers=config.workers)

    return Data(name, split(train, train_idx), split(plain, val_idx), split(test), num_classes, mean=tuple(mean),
                std=tuple(std), classes=tuple(map(str, classes or range(num_classes))))


def _dataset(obj):
    return obj.dataset if isinstance(obj, torch.utils.data.DataLoader) else obj


def _streams(config) -> bool:
    """Whether an imagefolder is streamed: ``data.stream``, else whether it holds more than STREAM_ABOVE images."""
    if config.stream is not None:
        return config.stream
    root = Path(config.data_dir).expanduser() if config.data_dir else None
    if root is None or not root.is_dir():
        return False
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) > STREAM_ABOVE


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def stream_imagefolder(config, *, train_subset: int | float | None, device: str | torch.device = "cpu") -> Data:
    """An image folder (the layouts of the ``imagefolder`` source) read through DataLoader workers: images are
    resized to ``image_size`` (default 32), normalised with the mean and std of NORM_IMAGES training images,
    and the training split is augmented (random crop with padding size/8, horizontal flip) unless
    ``data.augment`` is false."""
    import torchvision
    from torchvision import transforms

    root = _image_root(config.data_dir)
    size = config.image_size or 32
    resize = [transforms.Resize((size, size)), transforms.ToTensor()]
    both = (root / "train").is_dir() and (root / "test").is_dir()
    folder = root / "train" if both else root

    def images(where: Path, tf) -> Any:
        try:
            return torchvision.datasets.ImageFolder(str(where), transform=transforms.Compose(tf))
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"data.data_dir: {where}: {e}") from None

    raw = images(folder, resize)
    if len(raw.classes) < 2:
        raise UsageError(f"data.data_dir: {config.data_dir}: the training images are of {len(raw.classes)} class; "
                         "accepted: at least 2 classes")
    sample = torch.randperm(len(raw), generator=torch.Generator().manual_seed(config.seed))[:NORM_IMAGES]
    pixels = torch.stack([_read_image(raw, int(i))[0] for i in sample])
    mean, std = pixels.mean(dim=(0, 2, 3)).tolist(), pixels.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    norm = transforms.Normalize(mean, std)
    augment = [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
    train_tf = resize[:1] + (augment if config.augment is not False else []) + resize[1:] + [norm]
    test = images(root / "test", resize + [norm]) if both else None
    return streamed_data("imagefolder", images(folder, train_tf), config=config, num_classes=len(raw.classes),
                         test=test, plain=images(folder, resize + [norm]), classes=raw.classes, mean=mean, std=std,
                         device=device, train_subset=train_subset)


def _image_root(data_dir) -> Path:
    if not data_dir or not Path(data_dir).expanduser().is_dir():
        raise UsageError(f"data.data_dir: imagefolder needs an existing folder of class sub-folders, got {data_dir!r}")
    return Path(data_dir).expanduser()
