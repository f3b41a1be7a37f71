"""The user's own configs and networks: a config directory with model/, data/ and experiment/ options, added with
``XENTLIT_CONFIG_DIR`` or ``--config-dir``, and a network of the user's own selected by ``model=<option>``."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from xentlit.cli import _stored_config, build_module, load_checkpoint
from xentlit.entry import CONFIG_DIR_ENV, _argv_with_user_config_dir
from xentlit.trust import UntrustedTargetError

from conftest import read_metrics, run_dirs, run_script

NETWORK = '''
    import torch
    from torch import nn

    class ResMLP(nn.Module):
        """Residual blocks of `width` units; takes xentlit's in_features and num_classes, and options of its own."""
        def __init__(self, in_features, num_classes, width=64, blocks=2):
            super().__init__()
            self.stem = nn.Linear(in_features, width)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU()) for _ in range(blocks))
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = h + block(h)
            return self.head(h)
'''

OPTIONS = {
    "model/resmlp.yaml": """
        _target_: mymodels.ResMLP
        width: 24
        blocks: 3
    """,
    # an option of a shipped group, checked by the shipped schema: a typo here fails at compose time
    "data/blobs.yaml": """
        defaults:
          - /schema/data/synthetic@_here_
          - _self_
        _target_: xentlit.SyntheticDataModule
        num_samples: 900
        num_features: 6
        num_classes: 3
        ignore_index: ${ignore_index}
    """,
    "experiment/quick.yaml": """
        # @package _global_
        defaults:
          - override /data: blobs
          - override /model: resmlp
        trainer:
          max_epochs: 3
        callbacks:
          plots: null
    """,
}


@pytest.fixture
def project(tmp_path):
    """A user's project: ``mymodels.py`` and a config directory ``myconf/``."""
    root = tmp_path / "project"
    (root / "myconf").mkdir(parents=True)
    (root / "mymodels.py").write_text(textwrap.dedent(NETWORK))
    for name, text in OPTIONS.items():
        (root / "myconf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "myconf" / name).write_text(textwrap.dedent(text))
    return root


def test_the_config_dir_variable_acts_as_config_dir_which_wins(monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, "mine")
    assert _argv_with_user_config_dir(["train", "seed=1"]) == ["train", "--config-dir", "mine", "seed=1"]
    assert _argv_with_user_config_dir(["train", "--config-dir", "other"]) == ["train", "--config-dir", "other"]
    assert _argv_with_user_config_dir(["train", "-cd", "other"]) == ["train", "-cd", "other"]
    monkeypatch.delenv(CONFIG_DIR_ENV)
    assert _argv_with_user_config_dir(["train", "seed=1"]) == ["train", "seed=1"]


@pytest.mark.slow
def test_a_user_experiment_trains_the_users_network_and_eval_needs_trust(project, tmp_path):
    importable = {"PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}
    run_script("train.py", "experiment=quick", cwd=tmp_path,
               env={CONFIG_DIR_ENV: str(project / "myconf"), **importable})
    [run] = run_dirs(tmp_path / "outputs")
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert config.model == {"_target_": "mymodels.ResMLP", "width": 24, "blocks": 3}
    assert config.data.num_features == 6 and config.trainer.max_epochs == 3
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state["net.stem.weight"].shape == (24, 6) and "net.blocks.2.1.weight" in state
    assert read_metrics(run)["metrics"]["test/acc"] > 0.6  # 3 separable blobs: far above chance (1/3)

    # A checkpoint is a file: the network it names is built only when the user trusts it
    stored = load_checkpoint(checkpoint)
    with pytest.raises(UntrustedTargetError, match=r"model._target_ = 'mymodels.ResMLP'.*trust_targets"):
        _stored_config(stored, OmegaConf.create({"ckpt_path": str(checkpoint), "trust_targets": []}))
    best = read_metrics(run)["best_checkpoint"]
    run_script("eval.py", f"ckpt_path={best}", "trust_targets=[mymodels.*]", cwd=tmp_path, env=importable)
    [evaluated] = run_dirs(tmp_path / "outputs" / "eval")
    assert read_metrics(evaluated)["metrics"]["test/acc"] == pytest.approx(read_metrics(run)["metrics"]["test/acc"])


def test_a_user_network_set_over_the_mlp_options_gets_a_clear_error(compose, tmp_path, monkeypatch, project):
    monkeypatch.syspath_prepend(str(project))
    cfg = compose("model._target_=mymodels.ResMLP", "paths.output_dir=unused")
    with pytest.raises(ValueError, match=r"does not take `hidden_sizes`: it kept model=mlp's options.*"
                                         r"model/<name>\.yaml.*--config-dir"):
        build_module(cfg, 6, 3)


def test_a_user_option_declares_its_own_keys(compose, project, monkeypatch):
    """A user option without a schema composes with keys of its own; a schema-backed one still refuses typos."""
    monkeypatch.syspath_prepend(str(project))
    searchpath = f"hydra.searchpath=[file://{project / 'myconf'}]"
    cfg = compose(searchpath, "model=resmlp", "model.width=8", "data=blobs", "paths.output_dir=unused")
    module = build_module(cfg, 6, 3)
    assert module.net.stem.out_features == 8 and len(module.net.blocks) == 3
    assert instantiate(cfg.data).num_classes == 3
    with pytest.raises(Exception, match="num_featurez"):
        compose(searchpath, "data=blobs", "data.num_featurez=3")
