"""Re-test a trained model: `python scripts/eval.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt`."""

from xentlit.cli import evaluate, hydra_entry

main = hydra_entry(evaluate, config_name="eval")

if __name__ == "__main__":
    main()
