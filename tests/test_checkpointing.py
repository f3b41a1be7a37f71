"""last.ckpt is the last completed epoch; checkpoints are written atomically in their own directory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch

from xentlit import MLP, TensorDataModule, XentModule
from xentlit.checkpointing import AtomicCheckpointIO, ModelCheckpoint


def _fit(tmp_path, checkpoint_cls, epochs: int = 4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 5, generator=g), torch.randint(0, 3, (200,), generator=g)
    # mode=max on a falling loss: the "best" is epoch 0 and is never beaten afterwards
    checkpoint = checkpoint_cls(dirpath=tmp_path, monitor="val/loss", mode="max", save_top_k=1, save_last=True,
                                filename="best_{epoch}")
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[checkpoint], plugins=[AtomicCheckpointIO()])
    pl.seed_everything(0)
    trainer.fit(XentModule(MLP(5, 3, hidden_sizes=[8]), steps_per_execution=1),
                datamodule=TensorDataModule(x, y, batch_size=32))
    return checkpoint


def test_last_ckpt_holds_the_last_epoch_while_the_best_stays_behind(tmp_path):
    checkpoint = _fit(tmp_path / "xentlit", ModelCheckpoint)
    assert torch.load(checkpoint.best_model_path, weights_only=True)["epoch"] == 0
    last = torch.load(tmp_path / "xentlit" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3 and last["global_step"] == 4 * 5  # 140 training rows, batches of 32
    # Lightning's own class leaves last.ckpt at the best epoch here: what xentlit's fixes
    _fit(tmp_path / "lightning", pl.callbacks.ModelCheckpoint)
    assert torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in (tmp_path / "xentlit").iterdir()) == ["best_epoch=0.ckpt", "last.ckpt"]


def test_atomic_io_writes_beside_the_target_and_leaves_nothing_else(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "sub" / "a.ckpt")
    assert os.listdir(tmp_path / "sub") == ["a.ckpt"]
    seen = []
    from pathlib import Path

    def full_disk(self, data):
        seen.append(str(self.parent))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match=r"No space left on device.*a\.ckpt"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "sub" / "a.ckpt")
    monkeypatch.undo()
    assert seen == [str(tmp_path / "sub")]  # the temp file was in the checkpoint's own directory
    assert os.listdir(tmp_path / "sub") == ["a.ckpt"]  # no temp file left behind
    assert torch.equal(torch.load(tmp_path / "sub" / "a.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(3))


KILL_DURING_WRITE = textwrap.dedent("""
    import os, sys, torch
    from xentlit.checkpointing import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, sys.argv[1])
    from pathlib import Path
    def half_then_die(self, data):
        with open(self, "wb") as h:
            h.write(bytes(data)[: len(data) // 2])
        os._exit(137)  # killed with half a file written
    Path.write_bytes = half_then_die
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 2}, sys.argv[1])
""")


def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(target)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 137, result.stderr[-2000:]
    assert torch.load(target, weights_only=True)["epoch"] == 1
