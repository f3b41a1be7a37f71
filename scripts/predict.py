"""Predict classes for your file: `python scripts/predict.py ckpt_path=<ckpt> input=my.csv [output=preds.csv]`
(the same as `xentlit predict ...`)."""

from xentlit.cli import predict
from xentlit.entry import hydra_entry

main = hydra_entry(predict, config_name="predict")

if __name__ == "__main__":
    main()
