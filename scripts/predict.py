"""Predict classes for your file: `python scripts/predict.py ckpt_path=<ckpt> input=my.csv [output=preds.csv]`."""

from xentlit.cli import hydra_entry, predict

main = hydra_entry(predict, config_name="predict")

if __name__ == "__main__":
    main()
