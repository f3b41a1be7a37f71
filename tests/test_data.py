"""Tests for xentlit.data: splits, standardisation, synthetic data, files and fast batching."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from xentlit.data import (
    DigitsDataModule,
    FileDataModule,
    SyntheticDataModule,
    TensorBatchDataset,
    TensorDataModule,
    collate_batch,
    long_tail_counts,
)

# ------------------------------------------------------------------------------ helpers


def make_data(n: int = 1000, f: int = 4, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with distinct scales/offsets (column 0 is a unique row id) and labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * np.array([3.0, 0.5, 10.0, 1.0][:f]) + np.array([5.0, -2.0, 100.0, 0.0][:f])
    x[:, 0] = np.arange(n)  # unique id so rows can be traced through the split
    y = rng.integers(0, c, size=n)
    return x, y


def raw_rows(dm: TensorDataModule, ds: TensorBatchDataset) -> torch.Tensor:
    """Undo standardisation to recover the raw features of a split."""
    assert dm.feature_mean is not None and dm.feature_std is not None
    return ds.x * dm.feature_std + dm.feature_mean


def ids_of(dm: TensorDataModule, ds: TensorBatchDataset) -> np.ndarray:
    return np.round(raw_rows(dm, ds)[:, 0].double().numpy()).astype(int)


# ------------------------------------------------------------------------------ fast batching


class NoPerSampleDataset(TensorBatchDataset):
    def __getitem__(self, i: int):  # pragma: no cover - must never run
        raise AssertionError("per-sample __getitem__ used; batches must come from __getitems__")


@pytest.mark.parametrize("soft", [False, True])
def test_fast_batches_equal_slow_tensordataset_batches(soft: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 5, generator=g)
    y = torch.softmax(torch.randn(103, 4, generator=g), 1) if soft else torch.randint(0, 4, (103,), generator=g)
    order = torch.randperm(103, generator=g).tolist()
    fast = DataLoader(NoPerSampleDataset(x, y), batch_size=16, sampler=order, collate_fn=collate_batch)
    slow = DataLoader(TensorDataset(x, y), batch_size=16, sampler=order)
    fast_batches, slow_batches = list(fast), list(slow)
    assert len(fast_batches) == len(slow_batches) == math.ceil(103 / 16)
    for (xf, yf), (xs, ys) in zip(fast_batches, slow_batches):
        assert torch.equal(xf, xs) and torch.equal(yf, ys)
        assert yf.dtype == ys.dtype


def test_getitem_still_works() -> None:
    ds = TensorBatchDataset(torch.arange(12.0).reshape(6, 2), torch.arange(6))
    x, y = ds[3]
    assert torch.equal(x, torch.tensor([6.0, 7.0])) and int(y) == 3
    xb, yb = ds.__getitems__([5, 0])
    assert torch.equal(yb, torch.tensor([5, 0])) and xb.shape == (2, 2)


def test_distributed_sampler_shards_fast_loader() -> None:
    n = 51
    ds = NoPerSampleDataset(torch.randn(n, 3), torch.arange(n))
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=collate_batch)
        ids = torch.cat([y for _, y in loader]).tolist()
        assert len(ids) == math.ceil(n / 2)
        seen.append(ids)
    assert set(seen[0]) | set(seen[1]) == set(range(n))
    # 51 rows over 2 ranks: DistributedSampler pads exactly one duplicate
    assert len(seen[0]) + len(seen[1]) - len(set(seen[0]) | set(seen[1])) == 1


def test_lightning_sampler_injection_keeps_fast_path() -> None:
    # The same helper Lightning uses to inject a DistributedSampler under DDP.
    from lightning.pytorch.utilities.data import _update_dataloader

    x, y = make_data(200)
    dm = TensorDataModule(x, y, batch_size=16)
    loader = dm.train_dataloader()
    assert loader.collate_fn is collate_batch
    shards = []
    for rank in range(2):
        new = _update_dataloader(loader, DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank))
        assert isinstance(new.sampler, DistributedSampler) and new.collate_fn is collate_batch
        shards.append(np.concatenate([np.round((xb * dm.feature_std + dm.feature_mean)[:, 0].numpy()) for xb, _ in new]))
    assert set(shards[0]) | set(shards[1]) == set(ids_of(dm, dm.train_dataset))


def test_worker_processes_get_the_same_batches() -> None:
    x, y = make_data(300)
    dm = TensorDataModule(x, y, batch_size=32, num_workers=2)
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    assert dm.train_dataloader().persistent_workers
    # iterate a non-persistent twin: persistent workers outlive the test and slow its teardown
    twin = DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=2, collate_fn=loader.collate_fn)
    xs, ys = zip(*list(twin))
    assert torch.equal(torch.cat(xs), dm.val_dataset.x) and torch.equal(torch.cat(ys), dm.val_dataset.y)


@pytest.mark.parametrize("loader_name", ["val_dataloader", "test_dataloader", "predict_dataloader"])
def test_unrepeated_sampler_under_fake_ddp(loader_name: str) -> None:
    x, y = make_data(1007)
    dm = TensorDataModule(x, y, batch_size=16, eval_batch_size=7)
    ds = dm.test_dataset if loader_name != "val_dataloader" else dm.val_dataset
    assert len(ds) % 2 == 1  # odd size: a plain DistributedSampler would repeat a row
    rows = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = getattr(dm, loader_name)()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        assert loader.batch_size == 7
        rows.append(torch.cat([xb for xb, _ in loader]))
    both = torch.cat(rows)
    assert len(both) == len(ds)  # every row exactly once
    assert sorted(ids_of(dm, TensorBatchDataset(both, torch.zeros(len(both))))) == sorted(ids_of(dm, ds))
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert isinstance(getattr(dm, loader_name)().sampler, SequentialSampler)


def test_train_loader_settings() -> None:
    x, y = make_data(200)
    dm = TensorDataModule(x, y, batch_size=16, drop_last=True)
    loader = dm.train_dataloader()
    assert loader.batch_size == 16 and loader.drop_last and not loader.persistent_workers
    assert type(loader.sampler).__name__ == "RandomSampler"
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.float32 and xb.shape == (16, 4) and yb.dtype == torch.int64
    assert len(loader) == len(dm.train_dataset) // 16


# ------------------------------------------------------------------------------ splits


def test_split_sizes_disjoint_and_covering() -> None:
    x, y = make_data(1000)
    dm = TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.1, standardize=False)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (700, 200, 100)
    idx = dm.split_indices
    assert idx is not None
    tr, va, te = set(idx["train"]), set(idx["val"]), set(idx["test"])
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(range(1000))
    for name, ds in (("train", dm.train_dataset), ("val", dm.val_dataset), ("test", dm.test_dataset)):
        assert np.array_equal(ds.x[:, 0].numpy().astype(int), idx[name])
        assert np.array_equal(ds.y.numpy(), y[idx[name]])


def test_split_is_stratified() -> None:
    x, _ = make_data(1000)
    y = np.repeat([0, 1, 2], [600, 300, 100])
    dm = TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.2)
    for ds, n in ((dm.val_dataset, 200), (dm.test_dataset, 200), (dm.train_dataset, 600)):
        counts = np.bincount(ds.y.numpy(), minlength=3)
        assert np.abs(counts - np.array([0.6, 0.3, 0.1]) * n).max() <= 1


def test_split_falls_back_when_a_class_has_one_member() -> None:
    x, _ = make_data(100)
    y = np.array([0] * 60 + [1] * 39 + [2])
    dm = TensorDataModule(x, y, val_fraction=0.1, test_fraction=0.1, batch_size=8)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (80, 10, 10)
    assert dm.num_classes == 3


def test_split_seed_reproducible_and_different() -> None:
    x, y = make_data(500)

    def indices(seed: int) -> dict[str, np.ndarray]:
        dm = TensorDataModule(x, y, split_seed=seed)
        dm.setup()
        assert dm.split_indices is not None
        return dm.split_indices

    a, b, c = indices(0), indices(0), indices(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_split_independent_of_global_seed() -> None:
    x, y = make_data(500)
    results = []
    for global_seed in (0, 1234):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        lightning.seed_everything(global_seed, verbose=False)
        dm = TensorDataModule(x, y, split_seed=7)
        dm.setup()
        assert dm.split_indices is not None
        results.append(dm.split_indices)
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_setup_is_idempotent_and_prepare_data_is_a_noop() -> None:
    calls = []

    class Counting(TensorDataModule):
        def load(self):
            calls.append(1)
            return super().load()

    x, y = make_data(200)
    dm = Counting(x, y)
    dm.prepare_data()
    assert calls == []
    dm.setup("fit")
    ds = dm.train_dataset
    dm.setup("test")
    dm.setup()
    _ = dm.num_classes, dm.num_features, dm.class_counts
    assert calls == [1] and dm.train_dataset is ds


def test_zero_fractions_give_empty_loaders() -> None:
    x, y = make_data(200)
    dm = TensorDataModule(x, y, val_fraction=0.0, test_fraction=0.25)
    assert len(dm.train_dataset) == 150 and len(dm.val_dataset) == 0 and len(dm.test_dataset) == 50
    assert dm.val_dataloader() == []
    assert isinstance(dm.test_dataloader(), DataLoader)
    dm2 = TensorDataModule(x, y, val_fraction=0.1, test_fraction=0.0)
    assert dm2.test_dataloader() == [] and dm2.predict_dataloader() == []


def test_hparams_exclude_tensors() -> None:
    x, y = make_data(100)
    dm = TensorDataModule(x, y, batch_size=10)
    assert "x" not in dm.hparams and "y" not in dm.hparams and dm.hparams.batch_size == 10
    syn = SyntheticDataModule(num_samples=100, num_classes=4, imbalance_factor=2.0, batch_size=8)
    assert syn.hparams.imbalance_factor == 2.0 and syn.hparams.batch_size == 8


class _TinyModel(lightning.LightningModule):
    def __init__(self, f: int, c: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(f, c)
        self.val_batches = 0

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, _):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_empty_val_split_and_checkpointed_statistics(tmp_path: Path) -> None:
    x, y = make_data(300)
    dm = TensorDataModule(x, y, batch_size=32, val_fraction=0.0)
    model = _TinyModel(dm.num_features, dm.num_classes)
    trainer = lightning.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.val_batches == 0 and trainer.global_step == math.ceil(len(dm.train_dataset) / 32)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert torch.equal(ckpt["TensorDataModule"]["feature_mean"], dm.feature_mean)
    assert torch.equal(ckpt["TensorDataModule"]["feature_std"], dm.feature_std)


# ------------------------------------------------------------------------------ standardisation


def test_train_split_is_standardised() -> None:
    x, y = make_data(1000)
    dm = TensorDataModule(x, y)
    xt = dm.train_dataset.x.double()
    assert torch.allclose(xt.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xt.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5)
    assert dm.feature_mean is not None and dm.feature_mean.shape == (4,)


def test_val_test_use_train_statistics_only() -> None:
    x, y = make_data(1000)
    x[:, 2] += np.arange(1000) * 0.5  # drift so that all-row statistics differ clearly
    dm = TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.split_indices is not None
    train_raw = torch.as_tensor(x[dm.split_indices["train"]], dtype=torch.float64)
    mean, std = train_raw.mean(0), train_raw.std(0, unbiased=False)
    assert torch.allclose(dm.feature_mean.double(), mean, rtol=1e-5)
    assert torch.allclose(dm.feature_std.double(), std, rtol=1e-5)
    all_mean = torch.as_tensor(x, dtype=torch.float64).mean(0)
    all_std = torch.as_tensor(x, dtype=torch.float64).std(0, unbiased=False)
    for name, ds in (("val", dm.val_dataset), ("test", dm.test_dataset)):
        raw = torch.as_tensor(x[dm.split_indices[name]], dtype=torch.float64)
        expected = (raw - mean) / std
        assert torch.allclose(ds.x.double(), expected, atol=1e-4)
        leaky = (raw - all_mean) / all_std
        assert not torch.allclose(ds.x.double(), leaky, atol=1e-2)


def test_constant_feature_gets_unit_std_and_standardize_false_is_identity() -> None:
    x, y = make_data(200)
    x[:, 1] = 7.0
    dm = TensorDataModule(x, y)
    assert dm.feature_std[1] == 1.0 and dm.feature_mean[1] == pytest.approx(7.0)
    assert torch.all(dm.train_dataset.x[:, 1] == 0) and torch.all(dm.test_dataset.x[:, 1] == 0)
    raw = TensorDataModule(x, y, standardize=False)
    raw.setup()
    assert torch.equal(raw.feature_mean, torch.zeros(4)) and torch.equal(raw.feature_std, torch.ones(4))
    assert raw.split_indices is not None
    assert torch.equal(raw.train_dataset.x, torch.as_tensor(x[raw.split_indices["train"]], dtype=torch.float32))


def test_state_dict_round_trip_applies_loaded_statistics() -> None:
    x, y = make_data(300)
    dm = TensorDataModule(x, y)
    dm.setup()
    state = dm.state_dict()
    assert set(state) == {"feature_mean", "feature_std"}
    assert TensorDataModule(x, y).state_dict() == {}  # nothing before setup
    mean, std = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    # before setup: the loaded statistics are used instead of refitting
    fresh = TensorDataModule(x, y)
    fresh.load_state_dict({"feature_mean": mean, "feature_std": std})
    fresh.setup()
    assert torch.equal(fresh.feature_mean, mean) and torch.equal(fresh.feature_std, std)
    assert fresh.split_indices is not None
    expected = (torch.as_tensor(x[fresh.split_indices["val"]], dtype=torch.float32) - mean) / std
    assert torch.allclose(fresh.val_dataset.x, expected, atol=1e-4)
    # after setup: data is re-standardised with the loaded statistics
    dm.load_state_dict({"feature_mean": mean, "feature_std": std})
    assert dm.split_indices is not None
    expected = (torch.as_tensor(x[dm.split_indices["train"]], dtype=torch.float32) - mean) / std
    assert torch.allclose(dm.train_dataset.x, expected, atol=1e-3)
    with pytest.raises(ValueError, match="cover 2 features but the data has 4"):
        dm.load_state_dict({"feature_mean": torch.zeros(2), "feature_std": torch.ones(2)})


# ------------------------------------------------------------------------------ classes and counts


def test_class_counts_exclude_ignored_rows() -> None:
    x, y = make_data(600, c=4)
    y[::7] = -100
    dm = TensorDataModule(x, y)
    dm.setup()
    assert dm.split_indices is not None
    y_train = y[dm.split_indices["train"]]
    expected = np.bincount(y_train[y_train != -100], minlength=4)
    assert dm.class_counts.dtype == torch.float32
    assert np.array_equal(dm.class_counts.numpy(), expected.astype(np.float32))
    assert dm.class_counts.sum() < len(dm.train_dataset)  # ignored rows not counted
    assert int((dm.train_dataset.y == -100).sum()) == int(np.sum(y_train == -100)) > 0
    assert dm.num_classes == 4 and dm.class_names == ["0", "1", "2", "3"]


def test_custom_ignore_index() -> None:
    x, y = make_data(300)
    y[:30] = -1
    dm = TensorDataModule(x, y, ignore_index=-1)
    assert dm.class_counts.sum() == int((dm.train_dataset.y != -1).sum())
    with pytest.raises(ValueError, match="negative label -1 at row 0"):
        TensorDataModule(x, y).setup()


def test_soft_targets() -> None:
    x, _ = make_data(400)
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=400).astype(np.float32)
    dm = TensorDataModule(x, p, class_names=["a", "b", "c"])
    assert dm.num_classes == 3 and dm.class_names == ["a", "b", "c"]
    assert dm.train_dataset.y.dtype == torch.float32 and dm.train_dataset.y.shape[1] == 3
    assert dm.split_indices is not None
    assert torch.allclose(dm.class_counts, torch.as_tensor(p[dm.split_indices["train"]].sum(0)), atol=1e-3)
    _, yb = next(iter(dm.train_dataloader()))
    assert yb.shape == (128, 3) and yb.dtype == torch.float32
    with pytest.raises(ValueError, match="sum to 1 per row.*row 0 sums to 2"):
        TensorDataModule(x, p * 2).setup()


def test_num_classes_from_class_names_and_errors() -> None:
    x, y = make_data(300, c=3)
    dm = TensorDataModule(x, y, class_names=["a", "b", "c", "d", "e"])
    assert dm.num_classes == 5 and dm.class_counts.shape == (5,) and dm.class_counts[3:].sum() == 0
    with pytest.raises(ValueError, match=r"label 2 at row \d+ of the \w+ split is >= num_classes=2"):
        TensorDataModule(x, y, class_names=["a", "b"]).setup()


def test_float_integral_labels_are_cast() -> None:
    x, y = make_data(200)
    dm = TensorDataModule(torch.as_tensor(x, dtype=torch.float64), y.astype(np.float64))
    assert dm.train_dataset.y.dtype == torch.int64 and dm.train_dataset.x.dtype == torch.float32


# ------------------------------------------------------------------------------ validation errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"eval_batch_size": -3}, "eval_batch_size must be an integer >= 1, got -3"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"test_fraction": -0.1}, r"test_fraction must be in \[0, 1\), got -0.1"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ test_fraction must be < 1.*0.5 \\+ 0.5"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ],
)
def test_bad_configuration(kwargs: dict, match: str) -> None:
    x, y = make_data(100)
    with pytest.raises(ValueError, match=match):
        TensorDataModule(x, y, **kwargs)


def test_bad_data_errors() -> None:
    x, y = make_data(100)
    cases = [
        ((x[:, 0], y), {}, r"must be 2-D.*got shape \(100,\)"),
        ((x, y[:90]), {}, "labels y in the dataset have 90 rows but features x have 100"),
        ((x, -2 * np.ones(100, dtype=int)), {}, "negative label -2 at row 0"),
        ((x, np.zeros(100, dtype=int)), {}, r"only one class present.*class 0"),
        ((x, np.array([0, 5] + [-100] * 98)), {}, r"label 5 is a class index, which would make 6 classes for 2 labelled"),
        ((x, y + 0.5), {}, r"whole numbers.*row 0 \(value"),
        ((x[:2], y[:2]), {"val_fraction": 0.4, "test_fraction": 0.4}, "train split is empty"),
        ((np.array([["a", "b"]] * 100), y), {}, "features x in the dataset must be numeric"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            TensorDataModule(*args, **kwargs).setup()


def test_a_batch_larger_than_the_train_split_is_the_whole_split() -> None:
    x, y = make_data(100)
    dm = TensorDataModule(x, y, batch_size=71)
    dm.setup()
    assert dm.batch_size == len(dm.train_dataset) == 70
    assert [len(b[0]) for b in dm.train_dataloader()] == [70]


def test_non_finite_features_named() -> None:
    x, y = make_data(100)
    x[5, 2] = np.nan
    x[40, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*row 5, column 2"):
        TensorDataModule(x, y).setup()


def test_missing_x_or_y() -> None:
    with pytest.raises(ValueError, match="got no x and no y"):
        TensorDataModule().setup()
    x, _ = make_data(10)
    with pytest.raises(ValueError, match="got no y"):
        _ = TensorDataModule(x).num_classes


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_long_tail_profile() -> None:
    dm = SyntheticDataModule(num_samples=3000, num_classes=10, imbalance_factor=10.0, batch_size=64)
    clean = np.bincount(dm.clean_train_targets.numpy(), minlength=10)
    expected = [round(300 * 0.1 ** (c / 9)) for c in range(10)]
    assert clean.tolist() == expected == long_tail_counts(300, 10, 10.0)
    assert clean[0] == 300 and clean[-1] == 30 and clean[0] / clean[-1] == pytest.approx(10.0)
    assert all(a >= b for a, b in zip(clean, clean[1:]))
    assert np.array_equal(dm.class_counts.numpy(), clean)  # no noise: observed == clean
    per_class = round(300 * 0.15 / 0.7)
    for ds in (dm.val_dataset, dm.test_dataset):
        assert np.bincount(ds.y.numpy(), minlength=10).tolist() == [per_class] * 10
    assert dm.class_names == [f"class_{i}" for i in range(10)] and dm.num_features == 20


def test_synthetic_balanced_default_sizes() -> None:
    dm = SyntheticDataModule()
    assert len(dm.train_dataset) == 6000 and dm.num_classes == 10
    assert dm.class_counts.tolist() == [600.0] * 10
    assert len(dm.val_dataset) == len(dm.test_dataset) == 10 * round(600 * 0.15 / 0.7)


def test_synthetic_label_noise_exact() -> None:
    dm = SyntheticDataModule(num_samples=2000, num_classes=5, label_noise=0.3, imbalance_factor=4.0)
    y, clean = dm.train_dataset.y, dm.clean_train_targets
    flipped = y != clean
    assert int(flipped.sum()) == round(0.3 * len(y))
    assert torch.equal(flipped, dm.train_noisy_mask)
    assert torch.all(y[flipped] != clean[flipped]) and torch.all((y >= 0) & (y < 5))
    # flips go to every other class
    for c in range(5):
        targets = set(y[flipped & (clean == c)].tolist())
        assert targets == set(range(5)) - {c}
    for ds in (dm.val_dataset, dm.test_dataset):  # clean, balanced evaluation labels
        counts = np.bincount(ds.y.numpy(), minlength=5)
        assert counts.min() == counts.max() > 0


def test_synthetic_unlabeled_fraction_exact_with_noise() -> None:
    dm = SyntheticDataModule(num_samples=1000, num_classes=4, unlabeled_fraction=0.25, label_noise=0.1)
    y = dm.train_dataset.y
    unl = y == -100
    assert int(unl.sum()) == 250 and torch.equal(unl, dm.train_unlabeled_mask)
    n_lab = 1000 - 250
    assert int(dm.train_noisy_mask.sum()) == round(0.1 * n_lab)
    assert not torch.any(dm.train_noisy_mask & unl)
    assert dm.class_counts.sum() == n_lab
    assert torch.all(dm.val_dataset.y >= 0) and torch.all(dm.test_dataset.y >= 0)


def test_synthetic_reproducible_and_seed_dependent() -> None:
    a = SyntheticDataModule(num_samples=500, num_classes=5, label_noise=0.2, data_seed=3)
    torch.manual_seed(99)
    np.random.seed(99)
    b = SyntheticDataModule(num_samples=500, num_classes=5, label_noise=0.2, data_seed=3, split_seed=11)
    c = SyntheticDataModule(num_samples=500, num_classes=5, label_noise=0.2, data_seed=4)
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert not torch.equal(a.train_dataset.x, c.train_dataset.x)
    # evaluation rows do not depend on the imbalance/corruption settings
    d = SyntheticDataModule(num_samples=500, num_classes=5, imbalance_factor=5.0, data_seed=3, standardize=False)
    e = SyntheticDataModule(num_samples=500, num_classes=5, unlabeled_fraction=0.5, data_seed=3, standardize=False)
    assert torch.equal(d.test_dataset.x, e.test_dataset.x) and torch.equal(d.val_dataset.y, e.val_dataset.y)


def test_synthetic_is_learnable_but_not_trivial() -> None:
    from sklearn.linear_model import LogisticRegression

    dm = SyntheticDataModule(num_samples=3000)
    clf = LogisticRegression(max_iter=500).fit(dm.train_dataset.x.numpy(), dm.train_dataset.y.numpy())
    acc = clf.score(dm.test_dataset.x.numpy(), dm.test_dataset.y.numpy())
    assert 0.5 < acc < 0.95  # chance is 0.1
    easy = SyntheticDataModule(num_samples=3000, class_sep=3.0)
    clf = LogisticRegression(max_iter=500).fit(easy.train_dataset.x.numpy(), easy.train_dataset.y.numpy())
    assert clf.score(easy.test_dataset.x.numpy(), easy.test_dataset.y.numpy()) > acc


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"imbalance_factor": 0.5}, "imbalance_factor must be >= 1"),
        ({"label_noise": 1.0}, r"label_noise must be in \[0, 1\), got 1.0"),
        ({"unlabeled_fraction": -0.1}, r"unlabeled_fraction must be in \[0, 1\)"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"num_samples": 100, "imbalance_factor": 1000.0}, "leaves class 9 with 0 training rows"),
    ],
)
def test_synthetic_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticDataModule(**kwargs)


# ------------------------------------------------------------------------------ digits


def test_digits() -> None:
    dm = DigitsDataModule(batch_size=64)
    sizes = (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset))
    assert sum(sizes) == 1797 and sizes == (1257, 270, 270)
    assert dm.num_features == 64 and dm.num_classes == 10
    assert dm.class_names == [str(i) for i in range(10)]
    assert dm.class_counts.sum() == 1257
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 64) and yb.dtype == torch.int64


# ------------------------------------------------------------------------------ files


def _frame(n: int = 200, seed: int = 0, labels: list | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": np.arange(n, dtype=float), "b": rng.normal(size=n), "c": rng.integers(0, 5, n)})
    df["label"] = labels if labels is not None else rng.integers(0, 3, n)
    return df


def test_csv_round_trip(tmp_path: Path) -> None:
    df = _frame()
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    dm = FileDataModule(str(path), standardize=False, batch_size=16)
    dm.setup()
    assert dm.num_features == 3 and dm.num_classes == 3 and dm.class_names == ["0", "1", "2"]
    assert dm.split_indices is not None
    tr = dm.split_indices["train"]
    assert np.allclose(dm.train_dataset.x.numpy(), df[["a", "b", "c"]].to_numpy()[tr], atol=1e-6)
    assert np.array_equal(dm.train_dataset.y.numpy(), df["label"].to_numpy()[tr])
    assert sum(len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)) == 200


def test_csv_string_labels_missing_labels_and_feature_subset(tmp_path: Path) -> None:
    labels = ["dog", "cat", "emu", None] * 50
    df = _frame(labels=labels)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    dm = FileDataModule(str(path), feature_columns=["a", "b"], standardize=False)
    assert dm.class_names == ["cat", "dog", "emu"] and dm.num_features == 2
    assert dm.split_indices is not None
    tr = dm.split_indices["train"]
    mapping = {"cat": 0, "dog": 1, "emu": 2, None: -100}
    assert dm.train_dataset.y.tolist() == [mapping[labels[i]] for i in tr]
    assert np.allclose(dm.train_dataset.x[:, 0].numpy(), tr)


def test_parquet_round_trip(tmp_path: Path) -> None:
    df = _frame(labels=["b", "a"] * 100)
    path = tmp_path / "d.parquet"
    df.to_parquet(path)
    dm = FileDataModule(str(path), label_column="label", standardize=False, val_fraction=0.1, test_fraction=0.1)
    assert dm.class_names == ["a", "b"]
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (160, 20, 20)
    assert dm.split_indices is not None
    assert dm.test_dataset.y.tolist() == [1 if i % 2 == 0 else 0 for i in dm.split_indices["test"]]


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6)).astype(np.float32)
    y = rng.integers(0, 4, 150)
    np.savez(tmp_path / "d.npz", x=x, label=y)
    dm = FileDataModule(str(tmp_path / "d.npz"), standardize=False, batch_size=16)
    assert dm.num_features == 6 and dm.num_classes == 4 and dm.split_indices is not None
    assert torch.equal(dm.val_dataset.x, torch.as_tensor(x[dm.split_indices["val"]]))
    np.savez(tmp_path / "e.npz", feats=x, target=np.array(["n", "m"] * 75))
    dm2 = FileDataModule(str(tmp_path / "e.npz"), label_column="target", feature_columns=["feats"], batch_size=16)
    assert dm2.class_names == ["m", "n"] and dm2.num_features == 6


def test_separate_val_test_files(tmp_path: Path) -> None:
    train = _frame(100, seed=0, labels=["x", "y", "z", "y"] * 25)
    val = _frame(30, seed=1, labels=["z", "y", "z"] * 10)
    test = _frame(20, seed=2, labels=["y", "x"] * 10)
    for name, df in (("train", train), ("val", val), ("test", test)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    dm = FileDataModule(
        str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv"), test_path=str(tmp_path / "test.csv"),
        batch_size=10,
    )
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (100, 30, 20)
    assert dm.class_names == ["x", "y", "z"]
    assert dm.val_dataset.y.tolist() == [2, 1, 2] * 10 and dm.test_dataset.y.tolist() == [1, 0] * 10
    # statistics come from the train file only
    raw = torch.as_tensor(train[["a", "b", "c"]].to_numpy(), dtype=torch.float64)
    centers = torch.tensor([c.center for c in dm.preprocessor.columns_], dtype=torch.float64)
    assert torch.allclose(centers, raw.mean(0), rtol=1e-5)
    val_raw = torch.as_tensor(val[["a", "b", "c"]].to_numpy(), dtype=torch.float64)
    assert torch.allclose(dm.val_dataset.x.double(), (val_raw - raw.mean(0)) / raw.std(0, unbiased=False), atol=1e-5)
    # only a val file: the test split is carved out of the main file with test_fraction
    dm2 = FileDataModule(str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv"), test_fraction=0.2, batch_size=10)
    assert (len(dm2.train_dataset), len(dm2.val_dataset), len(dm2.test_dataset)) == (80, 30, 20)


def test_num_classes_argument(tmp_path: Path) -> None:
    df = _frame()
    df.to_csv(tmp_path / "d.csv", index=False)
    dm = FileDataModule(str(tmp_path / "d.csv"), num_classes=5)
    assert dm.num_classes == 5 and dm.class_names == ["0", "1", "2", "3", "4"]
    df.loc[17, "label"] = 9
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"label 9 at row 17 of .*bad.csv is out of range for num_classes=5"):
        FileDataModule(str(tmp_path / "bad.csv"), num_classes=5).setup()


def test_file_errors(tmp_path: Path) -> None:
    df = _frame()
    csv = tmp_path / "d.csv"
    df.to_csv(csv, index=False)

    with pytest.raises(ValueError, match=r"unsupported suffix '\.txt'; supported: \.csv, \.parquet, \.npz"):
        FileDataModule(str(tmp_path / "d.txt"))
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FileDataModule(str(missing)).setup()
    with pytest.raises(ValueError, match=r"label column 'target' not found.*available columns: \['a', 'b', 'c', 'label'\]"):
        FileDataModule(str(csv), label_column="target").setup()
    with pytest.raises(ValueError, match=r"column\(s\) \['zz'\] named in the data options are not in .*d\.csv"):
        FileDataModule(str(csv), feature_columns=["a", "zz"]).setup()

    frac = df.copy()
    frac["label"] = frac["label"].astype(float)
    frac.loc[4, "label"] = 1.5
    frac.to_csv(tmp_path / "frac.csv", index=False)
    with pytest.raises(ValueError, match=r"label 1.5 at row 4 .* not a whole number"):
        FileDataModule(str(tmp_path / "frac.csv")).setup()

    neg = df.copy()
    neg.loc[6, "label"] = -3
    neg.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(ValueError, match=r"label -3 at row 6 .* negative"):
        FileDataModule(str(tmp_path / "neg.csv")).setup()

    _frame(labels=["a", "b"] * 100).to_csv(tmp_path / "s.csv", index=False)
    _frame(10, labels=["a"] * 9 + ["q"]).to_csv(tmp_path / "sv.csv", index=False)
    with pytest.raises(ValueError, match=r"label 'q' at row 9 of .*sv.csv does not occur in"):
        FileDataModule(str(tmp_path / "s.csv"), val_path=str(tmp_path / "sv.csv"), batch_size=8).setup()
    with pytest.raises(ValueError, match=r"labels in .*d.csv are numeric .* has string labels"):
        FileDataModule(str(tmp_path / "s.csv"), test_path=str(csv), batch_size=8).setup()

    np.savez(tmp_path / "k.npz", x=np.zeros((5, 2)), y=np.zeros(5))
    with pytest.raises(ValueError, match=r"label array 'label' not found.*available keys: \['x', 'y'\]"):
        FileDataModule(str(tmp_path / "k.npz")).setup()
    with pytest.raises(ValueError, match=r"feature array 'feats' not found"):
        FileDataModule(str(tmp_path / "k.npz"), label_column="y", feature_columns=["feats"]).setup()


# ------------------------------------------------------------------------------ data kept on the device
def _on_device_fit(on_device: bool, accelerator: str = "cpu"):
    from xentlit import MLP, XentModule

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
    dm = TensorDataModule(x, y, batch_size=16, on_device=on_device)
    torch.manual_seed(0)
    module = XentModule(MLP(6, 3, hidden_sizes=[8]))
    trainer = lightning.pytorch.Trainer(accelerator=accelerator, devices=1, max_epochs=2, logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    lightning.pytorch.seed_everything(1)
    trainer.fit(module, datamodule=dm)
    return dm, module, trainer


def test_on_device_moves_every_split_once_and_serves_batches_there():
    dm = TensorDataModule(torch.randn(40, 3), torch.randint(0, 2, (40,)), batch_size=8, on_device=True)
    dm.to_device("meta")  # any device: the batches are indexed where the data is
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert ds.x.device.type == "meta" and ds.y.device.type == "meta"
    x, y = next(iter(dm.train_dataloader()))
    assert x.device.type == y.device.type == "meta" and x.shape == (8, 3)
    assert dm.state_dict()["feature_mean"].device.type == "cpu"  # checkpointed statistics stay on the host


def test_on_device_follows_the_trainer_and_trains_the_same_model():
    dm, on, trainer = _on_device_fit(True)
    assert dm.train_dataset.x.device == trainer.strategy.root_device
    _, off, _ = _on_device_fit(False)
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loader_option", [dict(num_workers=2), dict(pin_memory=True)])
def test_on_device_refuses_workers_and_pinned_memory(loader_option):
    with pytest.raises(ValueError, match=r"on_device=True keeps the data on the accelerator.*use num_workers=0"):
        TensorDataModule(torch.randn(10, 2), torch.zeros(10, dtype=torch.long), on_device=True, **loader_option)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_on_device_data_lives_on_the_gpu_and_trains_like_host_data():
    dm, on, _ = _on_device_fit(True, accelerator="gpu")
    assert dm.train_dataset.x.is_cuda and dm.val_dataset.y.is_cuda
    _, off, _ = _on_device_fit(False, accelerator="gpu")
    for a, b in zip(on.parameters(), off.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_all_constant_features_are_refused_and_a_train_constant_that_moves_later_is_named() -> None:
    y = np.arange(100) % 2
    with pytest.raises(ValueError, match=r"every feature column \(3\) is constant in the train split"):
        TensorDataModule(np.ones((100, 3), np.float32), y).setup()
    x, y = make_data(100)
    x[:, 2] = 7.0
    dm = TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.2)
    dm.split_indices  # noqa: B018  (sets up)
    x[dm.split_indices["test"][0], 2] = 1e30  # only a test row moves
    moved = TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.2)
    with pytest.warns(UserWarning, match=r"feature column 2 is constant in the train split \(7\) but not in the test "
                                         r"split \(it differs by up to 1e\+30\)"):
        moved.setup()
    x[dm.split_indices["test"][0], 2] = 8.0  # a small move, within the spread of the other features: no word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TensorDataModule(x, y, val_fraction=0.2, test_fraction=0.2).setup()
