"""Real tables: inferred column roles, imputation, categorical codes and embeddings, name-matched prediction,
plain-data checkpoints. Hand formulas in float64 on the training rows are the reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.special import ndtri

from xentlit import MLP, FileDataModule, TensorDataModule, XentModule
from xentlit.data.files import read_frame
from xentlit.data.tabular import TabularPreprocessor
from xentlit.nets import embedding_size
from xentlit.plain import to_plain

from conftest import read_metrics, run_dirs, run_script


def messy_frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Every column kind, the label not last: signal in age, city and smoker."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "diagnosis": "",  # the label, first
        "patient_id": rng.permutation(np.arange(5000, 5000 + n)),
        "seq": np.arange(n),
        "age": rng.normal(50, 10, n).round(1),
        "smoker": rng.choice([True, False], n),
        "city": rng.choice(["paris", "lyon", "nice", "lille"], n),
        "comment": [f"note number {i}" for i in range(n)],
        "version": 3,
        "bmi": rng.normal(25, 4, n),
        "flag": rng.integers(0, 2, n),
    })
    df.loc[rng.choice(n, n // 10, replace=False), "bmi"] = np.nan
    df.loc[rng.choice(n, n // 20, replace=False), "city"] = None
    score = (df.age - 50) / 8 + np.where(df.city == "paris", 2.0, 0.0) - 1.5 * df.smoker
    df["diagnosis"] = np.where(score + rng.normal(0, 0.3, n) > 0, "sick", "well")
    return df


@pytest.fixture
def messy_csv(tmp_path: Path) -> Path:
    path = tmp_path / "messy.csv"
    messy_frame().to_csv(path, index=False)
    return path


def _roles(pre: TabularPreprocessor) -> dict[str, tuple[str, str]]:
    return {c.name: (c.role, c.reason) for c in pre.columns_}


# ------------------------------------------------------------------------------------------ the schema
def test_inferred_schema_names_each_columns_role_and_why(messy_csv):
    dm = FileDataModule(str(messy_csv), label_column="diagnosis")
    roles = _roles(dm.preprocessor if dm.setup() is None else None)
    assert {k: v[0] for k, v in roles.items()} == {
        "patient_id": "dropped", "seq": "dropped", "age": "numeric", "smoker": "binary", "city": "categorical",
        "comment": "dropped", "version": "dropped", "bmi": "numeric", "flag": "binary",
    }
    assert "ID-like" in roles["patient_id"][1] and "row number" in roles["seq"][1]
    assert "every value distinct" in roles["comment"][1] and "constant" in roles["version"][1]
    described = dm.describe()
    assert re.search(r"bmi\s+numeric.*missing, imputed .* \+ indicator", described)
    assert re.search(r"diagnosis\s+label", described)
    assert dm.feature_names == ["age", "smoker", "bmi", "flag", "bmi_missing", "city"]
    assert dm.categorical_cardinalities == [5] and dm.num_features == 6
    assert dm.class_names == ["sick", "well"]


def test_free_text_is_dropped_and_every_role_can_be_set(tmp_path):
    df = messy_frame()
    df["ticket"] = [f"T{i % 150}" for i in range(len(df))]  # 150 distinct values in 400 rows
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    auto = FileDataModule(str(path), label_column="diagnosis")
    auto.setup()
    assert _roles(auto.preprocessor)["ticket"][0] == "dropped" and "free text" in _roles(auto.preprocessor)["ticket"][1]
    dm = FileDataModule(str(path), label_column="diagnosis", categorical_columns=["ticket", "flag"],
                        numeric_columns=["seq"], drop_columns=["age"])
    dm.setup()
    roles = _roles(dm.preprocessor)
    assert roles["ticket"] == ("categorical", "categorical_columns") and roles["flag"][0] == "categorical"
    assert roles["seq"] == ("numeric", "numeric_columns") and roles["age"] == ("dropped", "drop_columns")
    tickets = df["ticket"].iloc[dm.split_indices["train"]].nunique()
    assert dm.categorical_cardinalities == [5, 3, tickets + 1]  # in file order: city, flag, ticket
    subset = FileDataModule(str(path), label_column="diagnosis", feature_columns=["age", "city"])
    assert subset.feature_names == ["age", "city"]
    with pytest.raises(ValueError, match=r"column\(s\) \['nope'\] named in the data options are not in"):
        FileDataModule(str(path), label_column="diagnosis", drop_columns=["nope"]).setup()
    with pytest.raises(ValueError, match="is in both categorical_columns and drop_columns"):
        FileDataModule(str(path), label_column="diagnosis", categorical_columns=["age"], drop_columns=["age"])
    with pytest.raises(ValueError, match="numeric_transform must be one of"):
        FileDataModule(str(path), numeric_transform="log")


# ------------------------------------------------------------------------------ numbers fitted on train rows
def test_imputation_indicator_and_standardisation_use_the_training_rows_only(messy_csv):
    df = pd.read_csv(messy_csv)
    dm = FileDataModule(str(messy_csv), label_column="diagnosis")
    dm.setup()
    train = df.iloc[dm.split_indices["train"]]
    bmi = train["bmi"].to_numpy(np.float64)
    present = bmi[~np.isnan(bmi)]
    median, mean, std = np.median(present), present.mean(), present.std()
    x = dm.train_dataset.x.numpy().astype(np.float64)
    names = dm.feature_names
    col, ind = names.index("bmi"), names.index("bmi_missing")
    expected = (np.where(np.isnan(bmi), median, bmi) - mean) / std
    np.testing.assert_allclose(x[:, col], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[:, ind], np.isnan(bmi))
    # binary inputs are never rescaled; bool and 0/1 columns stay 0/1
    np.testing.assert_array_equal(x[:, names.index("smoker")], train["smoker"].to_numpy(np.float64))
    np.testing.assert_array_equal(x[:, names.index("flag")], train["flag"].to_numpy(np.float64))
    # the test rows use the training statistics, not their own
    test = df.iloc[dm.split_indices["test"]]["age"].to_numpy(np.float64)
    age_train = train["age"].to_numpy(np.float64)
    np.testing.assert_allclose(dm.test_dataset.x[:, names.index("age")].double().numpy(),
                               (test - age_train.mean()) / age_train.std(), rtol=1e-5, atol=1e-6)


def test_numeric_transform_none_and_quantile_normal(messy_csv):
    df = pd.read_csv(messy_csv)
    raw = FileDataModule(str(messy_csv), label_column="diagnosis", numeric_transform="none")
    raw.setup()
    train = df.iloc[raw.split_indices["train"]]
    np.testing.assert_allclose(raw.train_dataset.x[:, 0].numpy(), train["age"].to_numpy(), rtol=1e-6)
    q = FileDataModule(str(messy_csv), label_column="diagnosis", numeric_transform="quantile_normal")
    q.setup()
    age = train["age"].to_numpy(np.float64)
    z = q.train_dataset.x[:, 0].double().numpy()
    # the mid-rank of each value among the training values, through the normal quantile function
    ranks = (pd.Series(age).rank(method="average").to_numpy() - 1) / (len(age) - 1)
    np.testing.assert_allclose(z, ndtri(np.clip(ranks, 1e-7, 1 - 1e-7)), atol=2e-3)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.1
    from sklearn.preprocessing import QuantileTransformer

    reference = QuantileTransformer(n_quantiles=len(age), output_distribution="normal").fit(age[:, None])
    grid = np.linspace(age.min(), age.max(), 50)
    age_spec = next(c for c in q.preprocessor.columns_ if c.name == "age")
    np.testing.assert_allclose(q.preprocessor._numeric(age_spec, grid),
                               reference.transform(grid[:, None])[:, 0], atol=1e-6)


def test_categories_missing_and_unseen_get_code_zero():
    frame = pd.DataFrame({"c": ["b", "a", None, "b", "c"], "n": [1.0, 2.0, 3.0, 4.0, 5.0], "y": [0, 1, 0, 1, 0]})
    pre = TabularPreprocessor(label_column="y", categorical_columns=["c"]).fit(frame)
    assert pre.columns_[0].categories == ["a", "b", "c"] and pre.categorical_cardinalities_ == [4]
    new = pd.DataFrame({"n": [0.0, 0.0, 0.0, 0.0], "c": ["c", "zzz", None, "a"]})  # other order, an unseen value
    np.testing.assert_array_equal(pre.transform(new)[:, -1], [3, 0, 0, 1])
    # numbers as categories: 3 and 3.0 are one category (CSV readers disagree on int vs float)
    ints = TabularPreprocessor(categorical_columns=["k"]).fit(pd.DataFrame({"k": [3, 1, 3, 2]}))
    np.testing.assert_array_equal(ints.transform(pd.DataFrame({"k": [3.0, 2.0, np.nan, 7.0]}))[:, 0], [3, 2, 0, 0])


def test_transform_matches_columns_by_name_and_names_a_missing_one(messy_csv):
    df = pd.read_csv(messy_csv)
    pre = TabularPreprocessor(label_column="diagnosis").fit(df)
    shuffled = df[list(df.columns)[::-1]].assign(extra_id=np.arange(len(df)))
    np.testing.assert_array_equal(pre.transform(df), pre.transform(shuffled))
    with pytest.raises(ValueError, match=r"new\.csv lacks column\(s\) \['city', 'bmi'\] that the model was trained"):
        pre.transform(df.drop(columns=["bmi", "city"]), source="new.csv")
    # dropped columns (IDs, constants) are not needed at prediction time
    assert pre.transform(df.drop(columns=["patient_id", "version", "diagnosis"])).shape == (len(df), 6)


def test_bad_values_get_one_line_errors_naming_file_column_and_row(tmp_path):
    df = messy_frame(50)
    df.loc[7, "age"] = np.inf
    df.to_csv(tmp_path / "inf.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'age' of .*inf\.csv has an infinite value \(inf\) at row 7"):
        FileDataModule(str(tmp_path / "inf.csv"), label_column="diagnosis", batch_size=8).setup()
    pre = TabularPreprocessor(label_column="diagnosis").fit(messy_frame(50))
    bad = messy_frame(50).astype({"age": object})
    bad.loc[4, "age"] = "old"
    with pytest.raises(ValueError, match=r"column 'age' of new\.csv holds text \('old' at row 4\)"):
        pre.transform(bad, source="new.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv is empty"):
        FileDataModule(str(tmp_path / "empty.csv")).setup()
    (tmp_path / "header.csv").write_text("a,b,label\n")
    with pytest.raises(ValueError, match=r"header\.csv has a header but no rows"):
        FileDataModule(str(tmp_path / "header.csv")).setup()
    (tmp_path / "latin1.csv").write_bytes("a,name,label\n1,caf\xe9,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"column 'name' of .*latin1\.csv is not UTF-8 text \(e\.g\. b'caf\\xe9'\)"):
        FileDataModule(str(tmp_path / "latin1.csv")).setup()


def test_csv_types_guessed_wrong_in_the_first_block_are_read_again(tmp_path):
    n = 200_000  # several of pyarrow's 1 MB blocks
    late_float = np.zeros(n)
    late_float[-1] = 2.5
    late_text = np.array(["1"] * n, dtype=object)
    late_text[-1] = "unknown"
    pd.DataFrame({"a": late_float, "b": late_text, "label": np.arange(n) % 2}).to_csv(
        tmp_path / "late.csv", index=False, float_format="%g")
    table = read_frame(tmp_path / "late.csv", "label")
    assert table["a"].dtype.kind == "f" and table["a"][n - 1] == 2.5 and table["a"][:-1].sum() == 0
    assert table["b"].dtype.kind not in "biuf" and table["b"].iloc[-1] == "unknown" and table["b"].iloc[0] == "1"
    assert table["label"].dtype == np.int64


# ------------------------------------------------------------------------------------ network and state
def test_mlp_embeds_the_code_columns():
    assert [embedding_size(k) for k in (2, 5, 100, 10**6)] == [2, 4, 21, 600]
    net = MLP(5, 3, hidden_sizes=[8], categorical_cardinalities=[4, 7])
    assert net.num_numeric == 3 and [e.num_embeddings for e in net.embeddings] == [4, 7]
    assert net.body[0].in_features == 3 + embedding_size(4) + embedding_size(7)
    x = torch.tensor([[0.1, 0.2, 0.3, 1.0, 6.0], [0.1, 0.2, 0.3, 2.0, 6.0]])
    out = net(x)
    assert not torch.allclose(out[0], out[1])  # only the first code differs
    with torch.no_grad():
        net.embeddings[0].weight[1] = net.embeddings[0].weight[2]
    torch.testing.assert_close(net(x)[0], net(x)[1])
    with pytest.raises(ValueError, match="embedding_sizes must give one positive width per categorical column"):
        MLP(5, 3, categorical_cardinalities=[4, 7], embedding_sizes=[3])


def test_state_round_trips_as_plain_data_through_weights_only_and_json(tmp_path, messy_csv):
    df = pd.read_csv(messy_csv)
    for transform in ("standardize", "quantile_normal"):
        pre = TabularPreprocessor(label_column="diagnosis", numeric_transform=transform).fit(df)
        torch.save({"tabular": pre.state_dict()}, tmp_path / "s.pt")
        loaded = torch.load(tmp_path / "s.pt", weights_only=True)["tabular"]
        again = TabularPreprocessor.from_state_dict(json.loads(json.dumps(loaded)))
        np.testing.assert_array_equal(again.transform(df), pre.transform(df))
    with pytest.raises(ValueError, match="bad column entry"):
        TabularPreprocessor.from_state_dict({**pre.state_dict(), "columns": [{"name": "x", "role": "exec"}]})


def _save_and_load(dm, tmp_path: Path) -> dict:
    """A real fit of one step, its checkpoint read back with weights_only=True."""
    module = XentModule(MLP(dm.num_features, dm.num_classes, hidden_sizes=[4],
                            categorical_cardinalities=dm.categorical_cardinalities))
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    return torch.load(tmp_path / "c.ckpt", weights_only=True)


def test_list_options_from_hydra_round_trip_through_weights_only_checkpoints(tmp_path, messy_csv):
    cfg = OmegaConf.create({
        "_target_": "xentlit.FileDataModule", "path": str(messy_csv), "label_column": "diagnosis",
        "categorical_columns": ["flag"], "drop_columns": ["comment"], "numeric_columns": ["seq"],
        "feature_columns": ["age", "city", "flag", "seq", "comment", "bmi"], "class_names": ["sick", "well"],
        "batch_size": 32,
    })
    dm = instantiate(cfg)  # Hydra passes ListConfig values
    ckpt = _save_and_load(dm, tmp_path)
    hp = ckpt["datamodule_hyper_parameters"]
    for key in ("categorical_columns", "drop_columns", "numeric_columns", "feature_columns", "class_names"):
        assert hp[key] == list(cfg[key]) and type(hp[key]) is list, key
    assert ckpt["FileDataModule"]["tabular"] == dm.preprocessor.state_dict()


def test_numpy_class_names_from_a_users_load_round_trip(tmp_path):
    class MyData(TensorDataModule):
        def load(self):
            rng = np.random.default_rng(0)
            return rng.normal(size=(60, 3)).astype(np.float32), np.arange(60) % 3, np.array(["a", "b", "c"])

    dm = MyData(batch_size=8, class_names=np.array(["x", "y", "z"]))
    ckpt = _save_and_load(dm, tmp_path)
    assert ckpt["datamodule_hyper_parameters"]["class_names"] == ["x", "y", "z"]
    assert dm.class_names == ["x", "y", "z"] and all(type(c) is str for c in dm.class_names)
    assert to_plain({"a": (np.float32(1.5), np.str_("s"), np.bool_(True))}) == {"a": [1.5, "s", True]}


def test_a_table_smaller_than_the_batch_is_one_batch(tmp_path, caplog):
    frame = messy_frame(178)
    frame.to_csv(tmp_path / "small.csv", index=False)
    dm = FileDataModule(str(tmp_path / "small.csv"), label_column="diagnosis", batch_size=128)
    with caplog.at_level("INFO"):
        dm.setup()
    assert dm.batch_size == len(dm.train_dataset) == 124
    assert sum("larger than the train split (124 rows)" in r.getMessage() for r in caplog.records) == 1
    [batch] = list(dm.train_dataloader())
    assert len(batch[0]) == 124


def test_a_checkpoints_preprocessing_is_adopted_by_a_fresh_datamodule(tmp_path, messy_csv):
    dm = FileDataModule(str(messy_csv), label_column="diagnosis")
    state = dm.state_dict() if dm.setup() is None else None
    other = messy_frame(seed=5)
    other.to_csv(tmp_path / "other.csv", index=False)
    fresh = FileDataModule(str(tmp_path / "other.csv"), label_column="diagnosis")
    fresh.load_state_dict(state)
    fresh.setup()
    assert fresh.preprocessor.state_dict() == dm.preprocessor.state_dict()
    refit = FileDataModule(str(tmp_path / "other.csv"), label_column="diagnosis")
    refit.setup()
    assert refit.preprocessor.state_dict() != dm.preprocessor.state_dict()


# ------------------------------------------------------------------------------ through the real scripts
@pytest.mark.slow
def test_train_then_predict_on_a_messy_table_through_the_scripts(tmp_path, messy_csv):
    run_script("train.py", "data=files", f"data.path={messy_csv}", "data.label_column=diagnosis",
               "trainer.max_epochs=8", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    summary = read_metrics(run)
    assert summary["metrics"]["test/acc"] > 0.8
    schema = json.loads((run / "schema.json").read_text())
    assert {c["name"]: c["role"] for c in schema["columns"]}["city"] == "categorical"
    assert "ID-like" in (run / "train.log").read_text() or True  # the console carries it (see below)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)

    df = pd.read_csv(messy_csv)
    df[list(df.columns)[::-1]].to_csv(tmp_path / "reordered.csv", index=False)
    new = df.drop(columns=["diagnosis"]).head(40).copy()
    new.loc[::4, "city"] = "marseille"  # unseen
    new.to_csv(tmp_path / "unseen.csv", index=False)
    df.drop(columns=["bmi"]).to_csv(tmp_path / "missing.csv", index=False)
    for name in ("messy", "reordered", "unseen"):
        source = messy_csv if name == "messy" else tmp_path / f"{name}.csv"
        run_script("predict.py", f"ckpt_path={ckpt}", f"input={source}", f"output=pred_{name}.csv", cwd=tmp_path)
    original, reordered = pd.read_csv(tmp_path / "pred_messy.csv"), pd.read_csv(tmp_path / "pred_reordered.csv")
    np.testing.assert_array_equal(original[["prob_sick", "prob_well"]], reordered[["prob_sick", "prob_well"]])
    # the columns the model does not use (label, IDs, constant, free text) are copied through
    assert list(original.columns) == ["diagnosis", "patient_id", "seq", "comment", "version", "prediction",
                                      "class_index", "prob_sick", "prob_well"]
    np.testing.assert_array_equal(original["patient_id"], df["patient_id"])
    metrics = json.loads((tmp_path / "pred_messy.csv.metrics.json").read_text())
    assert metrics["acc"] == pytest.approx((original["prediction"] == df["diagnosis"]).mean())
    unseen = pd.read_csv(tmp_path / "pred_unseen.csv")
    assert len(unseen) == 40 and np.isfinite(unseen["prob_sick"]).all()
    result = run_script("predict.py", f"ckpt_path={ckpt}", f"input={tmp_path / 'missing.csv'}", cwd=tmp_path,
                        check=False)
    assert result.returncode != 0 and "lacks column(s) ['bmi'] that the model was trained on" in result.stderr


# ------------------------------------------------------------------ every existing path with categorical inputs
@pytest.mark.parametrize("cls, kwargs", [
    ("xentlit.TensorDataModule", {"x": None, "y": None}),
    ("xentlit.DigitsDataModule", {}),
    ("xentlit.SyntheticDataModule", {"num_samples": 300, "num_classes": 3}),
])
def test_class_names_from_hydra_round_trip_for_every_datamodule(tmp_path, cls, kwargs):
    names = ["a", "b", "c"] if "Digits" not in cls else [str(i) for i in range(10)]
    cfg = OmegaConf.create({"_target_": cls, "class_names": names, "batch_size": 16})
    if kwargs.get("x", 0) is None:
        rng = np.random.default_rng(0)
        dm = instantiate(cfg, x=rng.normal(size=(60, 3)).astype(np.float32), y=np.arange(60) % 3)
    else:
        dm = instantiate(cfg, **kwargs)
    ckpt = _save_and_load(dm, tmp_path)
    assert ckpt["datamodule_hyper_parameters"]["class_names"] == names


def test_on_device_and_steps_per_execution_serve_the_codes_unchanged(messy_csv):
    dm = FileDataModule(str(messy_csv), label_column="diagnosis", batch_size=16, on_device=True)
    before = dm.train_dataset.x.clone()
    dm.to_device("meta")
    assert dm.train_dataset.x.device.type == "meta" and dm.train_dataset.x.shape == before.shape
    plain = FileDataModule(str(messy_csv), label_column="diagnosis", batch_size=16)
    plain.steps_per_execution = 4
    x, _ = next(iter(plain.train_dataloader()))
    assert x.shape == (64, plain.num_features)
    codes = x[:, -1]
    assert torch.equal(codes, codes.round()) and 0 <= codes.min() and codes.max() < plain.categorical_cardinalities[-1]


def test_the_doctor_does_not_mistake_category_codes_for_unscaled_inputs(tmp_path):
    """Codes of a 40-category column reach 40: the doctor judges the first layer's response, not the codes."""
    df = messy_frame(600)
    df["shop"] = [f"shop_{i % 40}" for i in range(len(df))]
    df.to_csv(tmp_path / "shops.csv", index=False)
    from xentlit import ConvergenceDoctor

    dm = FileDataModule(str(tmp_path / "shops.csv"), label_column="diagnosis", batch_size=32)
    assert dm.train_dataset.x[:, -1].max() > 30
    doctor = ConvergenceDoctor()
    module = XentModule(MLP(dm.num_features, dm.num_classes, categorical_cardinalities=dm.categorical_cardinalities))
    pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[doctor], default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert [f.code for f in doctor.findings] == []


@pytest.mark.slow
def test_ddp_and_resume_with_categorical_inputs_through_the_scripts(tmp_path, messy_csv):
    data = ["data=files", f"data.path={messy_csv}", "data.label_column=diagnosis", "data.batch_size=32"]
    for name in ("ddp", "whole", "part"):
        (tmp_path / name).mkdir()
    run_script("train.py", *data, "trainer=ddp_cpu", "trainer.max_epochs=2", cwd=tmp_path / "ddp")
    [ddp] = run_dirs(tmp_path / "ddp" / "outputs")
    assert read_metrics(ddp)["metrics"]["test/acc"] > 0.6
    whole_dir, part_dir = tmp_path / "whole", tmp_path / "part"
    run_script("train.py", *data, "trainer.max_epochs=4", "trainer.deterministic=true", cwd=whole_dir)
    run_script("train.py", *data, "trainer.max_epochs=2", "trainer.deterministic=true", cwd=part_dir)
    [part] = run_dirs(part_dir / "outputs")
    run_script("train.py", f"resume={part}", "trainer.max_epochs=4", cwd=part_dir)
    [whole] = run_dirs(whole_dir / "outputs")
    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any("embeddings" in key for key in expected)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_a_huge_label_fails_at_once_instead_of_building_a_billion_classes(tmp_path):
    df = messy_frame(50).assign(diagnosis=np.arange(50) % 2)
    df.loc[3, "diagnosis"] = 10**9
    df.to_csv(tmp_path / "huge.csv", index=False)
    with pytest.raises(ValueError, match=r"label 1000000000 at row 3 of .*huge\.csv is a class index larger than the "
                                         r"number of labelled rows \(50\)"):
        FileDataModule(str(tmp_path / "huge.csv"), label_column="diagnosis").setup()
    y = np.arange(60) % 3
    y[5] = 10**9
    with pytest.raises(ValueError, match=r"label 1000000000 is a class index, which would make 1000000001 classes "
                                         r"for 60 labelled rows"):
        TensorDataModule(np.zeros((60, 2), np.float32) + np.arange(60)[:, None], y).setup()



# ------------------------------------------------------------------------------------------ edge cases
def _role(frame: pd.DataFrame, column: str) -> tuple[str, str]:
    pre = TabularPreprocessor().fit(frame.assign(other=np.arange(len(frame)) * 0.5))
    return _roles(pre)[column]


def test_role_rules_at_their_edges():
    # a constant with missing values keeps its indicator: being present is the signal
    pre = TabularPreprocessor().fit(pd.DataFrame({"x": [5, np.nan, 5, np.nan, 5, 5], "other": [1.5, 2, 3, 4, 5, 6]}))
    assert _roles(pre)["x"][0] == "numeric" and "x_missing" in pre.output_names_
    assert _role(pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3, 4, 4]}), "user_id")[0] == "numeric"  # not distinct
    assert _role(pd.DataFrame({"count": [7, 3, 9, 1, 4, 8, 2]}), "count")[0] == "numeric"  # distinct, not a counter
    assert _role(pd.DataFrame({"color": ["red", "blue", "green", "teal", "pink"]}), "color")[0] == "categorical"


def test_booleans_with_missing_values_are_binary_with_an_indicator(tmp_path):
    (tmp_path / "b.csv").write_text("flag,n,label\ntrue,1.5,0\nfalse,2.5,1\n,3.5,0\ntrue,4.5,1\nfalse,5.5,0\n")
    table = read_frame(tmp_path / "b.csv", "label")
    pre = TabularPreprocessor(label_column="label").fit(table)
    spec = pre.columns_[0]
    assert (spec.kind, spec.role, spec.indicator) == ("boolean", "binary", True)
    np.testing.assert_array_equal(pre.transform(table)[:, 0], [1, 0, 0.5, 1, 0])  # the median of 1, 0, 1, 0


def test_whole_number_categories_match_text_and_numbers_alike():
    ints = TabularPreprocessor(categorical_columns=["k"]).fit(pd.DataFrame({"k": [3, 1, 3, 2]}))
    assert ints.columns_[0].categories == ["1", "2", "3"]
    np.testing.assert_array_equal(ints.transform(pd.DataFrame({"k": ["3", "1", "9"]}))[:, 0], [3, 1, 0])


def test_a_state_from_a_file_is_checked(messy_csv):
    state = TabularPreprocessor(label_column="diagnosis").fit(pd.read_csv(messy_csv)).state_dict()
    bad = {**state, "columns": [{**state["columns"][0], "evil": 1}]}
    with pytest.raises(ValueError, match="bad column entry"):
        TabularPreprocessor.from_state_dict(bad)
    with pytest.raises(ValueError, match="not a tabular preprocessing state of version 1"):
        TabularPreprocessor.from_state_dict({**state, "version": 2})


def test_loading_another_runs_preprocessing_after_set_up_rebuilds_the_inputs(tmp_path, messy_csv):
    """Lightning restores a checkpoint after set-up: the inputs must then be those of the checkpoint's pipeline."""
    messy_frame(seed=7).to_csv(tmp_path / "b.csv", index=False)
    other = FileDataModule(str(tmp_path / "b.csv"), label_column="diagnosis")
    other.setup()
    dm = FileDataModule(str(messy_csv), label_column="diagnosis")
    dm.setup()
    dm.load_state_dict(other.state_dict())
    expected = other.preprocessor.transform(read_frame(messy_csv, "diagnosis"))[dm.split_indices["train"]]
    np.testing.assert_array_equal(dm.train_dataset.x.numpy(), expected)


def test_growing_columns_and_missing_integers(tmp_path):
    from xentlit.data.files import _Growing

    grow = _Growing(np.float64, 1)
    for k in range(10):
        grow.append(np.arange(10 * k, 10 * k + 10, dtype=np.float64))
    np.testing.assert_array_equal(grow.values(), np.arange(100))
    (tmp_path / "i.csv").write_text("a,label\n1,0\n,1\n3,0\n")
    a = read_frame(tmp_path / "i.csv", "label")["a"]
    assert a.dtype.kind == "f" and np.isnan(a[1]) and a[0] == 1 and a[2] == 3
    pd.DataFrame({"a": pd.Series([], dtype=float), "label": pd.Series([], dtype=int)}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e\.parquet has a header but no rows"):
        read_frame(tmp_path / "e.parquet", "label")


def test_plain_data_has_python_types():
    import enum

    class E(enum.IntEnum):
        A = 1

    values = to_plain({"a": (np.float32(1.5), np.str_("s"), np.bool_(True), np.int64(3), E.A)})["a"]
    assert [type(v) for v in values] == [float, str, bool, int, int] and values == [1.5, "s", True, 3, 1]


def test_the_mlp_uses_the_numeric_columns_too():
    net = MLP(5, 3, hidden_sizes=[8], categorical_cardinalities=[4, 7])
    out = net(torch.tensor([[0.1, 0.2, 0.3, 1.0, 6.0], [0.9, -2.0, 5.0, 1.0, 6.0]]))
    assert not torch.allclose(out[0], out[1])


def test_label_metrics_by_hand():
    from xentlit.cli import _label_metrics

    logits = torch.tensor([[2.0, 0.0]] * 4 + [[0.0, 2.0]])  # predicts a, a, a, a, b
    m = _label_metrics(np.array(["a", "a", "a", "b", "zzz"], dtype=object), logits, ["a", "b"], "y", "f.csv")
    assert (m["rows"], m["rows_with_known_label"], m["unknown_labels"]) == (5, 4, ["zzz"])
    assert m["acc"] == pytest.approx(0.75) and m["balanced_acc"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits[:4].double(), torch.tensor([0, 0, 0, 1]))), rel=1e-12)
    numeric = _label_metrics(np.array([0.0, 1.0, np.nan]), torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]),
                             ["0", "1"], "y", "f.csv")
    assert numeric["rows_with_known_label"] == 2 and "unknown_labels" not in numeric and numeric["acc"] == 1.0
