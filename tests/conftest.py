"""Shared fixtures: run the real scripts in subprocesses, compose the real configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# CI runs on 2 shared cores with several processes at once (xdist workers, DDP ranks): one intra-op thread
# per process avoids oversubscription, which slows small-MLP steps by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CONF = ROOT / "conf"


def run_script(script: str, *overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
               check: bool = True, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/<script>`` with Hydra overrides in ``cwd`` (runs land in ``cwd/outputs``)."""
    command = [*(launcher or [sys.executable]), str(SCRIPTS / script), *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}"
            f"\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def run_dirs(root: Path) -> list[Path]:
    """Every run directory (one holding a metrics.json or a checkpoints folder) below ``root``."""
    found = {p.parent for p in root.rglob("metrics.json")} | {p.parent for p in root.rglob("checkpoints")}
    return sorted(found)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def compose():
    """Compose ``conf/train.yaml`` with overrides through Hydra's compose API (no run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from xentlit.config import register_configs

    register_configs()

    def _compose(*overrides: str, config_name: str = "train", return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)

    return _compose
