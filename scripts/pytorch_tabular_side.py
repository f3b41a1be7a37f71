"""pytorch-tabular's side of `scripts/compare_pytorch_tabular.py`: run with a Python that has `pytorch-tabular`
installed (not xentlit's environment). Trains CategoryEmbedding on the given train/val/test CSVs with the given
column roles and prints one JSON line: test accuracy, macro-F1 and the seconds of the fit."""

import argparse
import json
import time

import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("split_dir")
parser.add_argument("--spec", required=True, help="JSON: label, numeric, categorical, epochs, batch_size, layers, seed")
args = parser.parse_args()
spec = json.loads(args.spec)

from pytorch_tabular import TabularModel  # noqa: E402  (imports are part of the measured run, after arguments)
from pytorch_tabular.config import DataConfig, OptimizerConfig, TrainerConfig  # noqa: E402
from pytorch_tabular.models import CategoryEmbeddingModelConfig  # noqa: E402

frames = {name: pd.read_csv(f"{args.split_dir}/{name}.csv") for name in ("train", "val", "test")}
label, numeric, categorical = spec["label"], spec["numeric"], spec["categorical"]
# pytorch-tabular leaves missing numbers to the user: the training median, as xentlit imputes
medians = frames["train"][numeric].median()
for name, frame in frames.items():
    frame[numeric] = frame[numeric].fillna(medians).astype("float32")
    frame[categorical] = frame[categorical].astype(str)
    frame[label] = frame[label].astype(str)
model = TabularModel(
    data_config=DataConfig(target=[label], continuous_cols=numeric, categorical_cols=categorical),
    model_config=CategoryEmbeddingModelConfig(task="classification", layers=spec["layers"], activation="ReLU",
                                              learning_rate=1e-3, seed=spec["seed"]),
    optimizer_config=OptimizerConfig(optimizer="Adam"),
    trainer_config=TrainerConfig(max_epochs=spec["epochs"], batch_size=spec["batch_size"], accelerator="cpu",
                                 early_stopping="valid_loss", early_stopping_patience=10,
                                 checkpoints="valid_loss", load_best=True, seed=spec["seed"]),
    verbose=False,
)
start = time.perf_counter()
model.fit(train=frames["train"], validation=frames["val"], seed=spec["seed"])
fit_s = time.perf_counter() - start
pred = model.predict(frames["test"])[f"{label}_prediction"].astype(str)
truth = frames["test"][label]
print(json.dumps({"acc": accuracy_score(truth, pred), "f1_macro": f1_score(truth, pred, average="macro"),
                  "fit_s": fit_s}))
