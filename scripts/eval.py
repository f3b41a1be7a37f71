"""Re-test a trained model: `python scripts/eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt`
(the same as `xentlit eval ...`)."""

from xentlit.cli import evaluate
from xentlit.entry import hydra_entry

main = hydra_entry(evaluate, config_name="eval")

if __name__ == "__main__":
    main()
