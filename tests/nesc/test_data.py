"""The dataset registry: the real Fashion-MNIST files (when installed), MNIST-1D generated offline,
scikit-learn digits, and the synthetic set; splits, normalisation, seeded subsets and loaders."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from nesc.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    balanced_indices,
    list_datasets,
    load_dataset,
    read_idx,
)
from nesc.core.errors import InputError

HAS_FMNIST = all((FASHION_MNIST_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair)
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")


def test_registry_lists_every_dataset_and_rejects_unknown_names() -> None:
    assert list_datasets() == ["digits", "fashion_mnist", "mnist1d", "synthetic"]
    with pytest.raises(InputError, match="unknown dataset 'cifar'.*digits, fashion_mnist, mnist1d, synthetic"):
        load_dataset("cifar")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit_is_an_error(limit) -> None:
    with pytest.raises(InputError, match="limit must be a positive number"):
        load_dataset("synthetic", limit=limit)


def test_synthetic_is_seeded_shaped_and_balanced() -> None:
    a, b, c = load_dataset("synthetic"), load_dataset("synthetic"), load_dataset("synthetic", seed=1)
    assert a.x_train.shape == (512, 1, 8, 8) and a.x_test.shape == (256, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.bincount(a.y_train).tolist() == [128] * 4


def test_limit_takes_a_balanced_seeded_subset_of_train_only() -> None:
    full = load_dataset("synthetic")
    sub = load_dataset("synthetic", limit=40, test_limit=10)
    assert len(sub) == 40 and torch.bincount(sub.y_train).tolist() == [10] * 4
    assert torch.equal(sub.x_test, full.x_test[:10])
    # Every kept sample is a sample of the full train split, at the index the subset names.
    keep = balanced_indices(full.y_train, 40, seed=0)
    assert torch.equal(sub.x_train, full.x_train[keep])
    assert not torch.equal(keep, balanced_indices(full.y_train, 40, seed=1))


def test_loader_order_depends_on_its_seed_only() -> None:
    ds = load_dataset("synthetic")

    def first_batch(seed: int) -> torch.Tensor:
        torch.manual_seed(123)  # the global generator must not matter
        return next(iter(ds.loader("train", batch_size=16, seed=seed)))[1]

    a = first_batch(0)
    torch.manual_seed(999)
    assert torch.equal(a, first_batch(0))
    assert not torch.equal(a, first_batch(1))
    xb, yb = next(iter(ds.loader("test", batch_size=8)))
    assert torch.equal(xb, ds.x_test[:8])  # test is not shuffled
    with pytest.raises(InputError, match="unknown split 'val'"):
        ds.loader("val", batch_size=8)


@needs_fmnist
def test_fashion_mnist_from_the_debian_files() -> None:
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10 and torch.bincount(ds.y_test).tolist() == [1000] * 10
    # The documented normalisation: the train set has mean 0 and std 1 (to the 4 digits of the constants).
    assert abs(ds.x_train.mean().item()) < 1e-3 and abs(ds.x_train.std().item() - 1) < 1e-3
    # Independent check of the first image against the raw bytes.
    with gzip.open(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16 : 16 + 784], dtype=np.uint8).astype(np.float32)
    expected = (torch.from_numpy(raw) / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(ds.x_train[0].flatten(), expected)


@needs_fmnist
def test_fashion_mnist_from_a_user_directory(tmp_path) -> None:
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            shutil.copy(FASHION_MNIST_DIR / name, tmp_path / name)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, limit=100, test_limit=50)
    assert ds.x_train.shape == (100, 1, 28, 28) and ds.x_test.shape == (50, 1, 28, 28)


def test_missing_fashion_mnist_says_how_to_install(tmp_path) -> None:
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_idx_reader_checks_magic_and_length(tmp_path) -> None:
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 2]) + struct.pack(">2I", 2, 3) + bytes(range(6)))
    assert read_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 13, 1]) + struct.pack(">I", 4) + bytes(16))
    with pytest.raises(InputError, match="not an IDX file of unsigned bytes"):
        read_idx(bad)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(4))
    with pytest.raises(InputError, match="truncated"):
        read_idx(short)


def test_mnist1d_is_generated_offline(monkeypatch) -> None:
    pytest.importorskip("mnist1d")
    import socket

    import mnist1d.data

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, never downloaded")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert sorted(ds.y_train.unique().tolist()) == list(range(10))
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's numpy RNG is left alone
    # make_dataset's standard-normalised signals (its own seed 42: the same data on every machine).
    assert abs(ds.x_train.mean().item()) < 0.05 and abs(ds.x_train.std().item() - 1) < 0.05


def test_digits_split_is_stratified_and_fixed() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std().item() - 1) < 1e-2
    assert torch.equal(ds.y_test, load_dataset("digits", seed=5).y_test)
    assert torch.bincount(ds.y_test).min() >= 35

