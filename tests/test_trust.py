"""A checkpoint or a run directory cannot run code: every ``_target_`` read from a file is checked first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from xentlit.cli import _stored_config
from xentlit.entry import _argv_for_resume
from xentlit.trust import UntrustedTargetError, check_targets

from conftest import run_dirs, run_script

SAFE = {
    "model": {"_target_": "xentlit.MLP", "hidden_sizes": [8]},
    "loss": {"_target_": "xentlit.CrossEntropyLoss"},
    "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001},
    "scheduler": {"scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1}},
    "module": {"_target_": "xentlit.XentModule"},
    "data": {"_target_": "xentlit.DigitsDataModule"},
}


def _exploits(tmp_path: Path) -> dict[str, dict]:
    marker = tmp_path / "pwned"
    return {
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
        "Path.write_text": {"_target_": "pathlib.Path.write_text",
                            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]}, "data": "x"},
        "read_pickle": {"_target_": "pandas.read_pickle",
                        "filepath_or_buffer": {"_target_": "io.BytesIO", "_args_": ["payload"]}},
        "a function inside xentlit": {"_target_": "xentlit.atomic.write_atomic", "path": str(marker), "data": "x"},
        "nested in a trusted class": {"_target_": "xentlit.MLP", "activation": {"_target_": "os.system",
                                                                               "command": f"touch {marker}"}},
        "interpolated": {"_target_": "${oc.env:XENTLIT_TEST_TARGET,os.system}", "command": f"touch {marker}"},
    }


@pytest.mark.parametrize("name", list(_exploits(Path("/x"))))
def test_every_exploit_in_a_stored_config_fails_before_any_call(tmp_path, name):
    config = {**SAFE, "model": _exploits(tmp_path)[name]}
    checkpoint = {"state_dict": {}, "xentlit": {"config": config}}
    cfg = OmegaConf.create({"ckpt_path": "evil.ckpt", "trust_targets": []})
    expected = (r"checkpoint evil\.ckpt: model\._target_ holds an interpolation" if name == "interpolated" else
                r"checkpoint evil\.ckpt: model.*is not a class xentlit builds.*Nothing was run.*trust_targets=\[")
    with pytest.raises(UntrustedTargetError, match=expected):
        _stored_config(checkpoint, cfg)
    assert not (tmp_path / "pwned").exists()


def test_the_shipped_targets_pass_and_a_user_pattern_admits_its_own_classes():
    check_targets(OmegaConf.create(SAFE), "ok")
    mine = {**SAFE, "model": {"_target_": "mymodels.ResMLP"}}
    with pytest.raises(UntrustedTargetError, match=r"'mymodels\.ResMLP'.*trust_targets=\[mymodels\.ResMLP\]"):
        check_targets(mine, "ckpt")
    check_targets(mine, "ckpt", trust_targets=["mymodels.*"])
    with pytest.raises(UntrustedTargetError):  # a pattern admits what it names, nothing else
        check_targets({**mine, "loss": {"_target_": "os.system"}}, "ckpt", trust_targets=["mymodels.*"])


@pytest.mark.slow
def test_eval_and_predict_refuse_a_doctored_checkpoint_and_run_nothing(tmp_path):
    run_script("train.py", "trainer.max_epochs=1", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["xentlit"]["config"]["model"] = {"_target_": "os.system", "command": f"touch {marker}"}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    (tmp_path / "rows.csv").write_text(",".join(f"p{i}" for i in range(64)) + "\n" + ",".join(["0"] * 64) + "\n")
    for script, extra in (("eval.py", ()), ("predict.py", ("input=rows.csv",))):
        result = run_script(script, f"ckpt_path={tmp_path / 'evil.ckpt'}", *extra, cwd=tmp_path, check=False)
        assert result.returncode != 0
        assert "model._target_ = 'os.system' is not a class xentlit builds" in result.stderr
        assert not marker.exists()


def test_resume_refuses_recorded_overrides_that_move_the_run_or_widen_trust(tmp_path):
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    for override in ("callbacks.model_checkpoint.dirpath=/tmp/elsewhere", "paths.output_dir=/tmp/x",
                     "trust_targets=[os.*]", "+logger.csv.save_dir=/tmp/y"):
        (hydra_dir / "overrides.yaml").write_text(f"- trainer.max_epochs=3\n- {override}\n")
        with pytest.raises(SystemExit, match=r"its recorded override .* sets where the run writes or what it trusts"):
            _argv_for_resume(["train.py", f"resume={tmp_path / 'run'}"])
    (hydra_dir / "overrides.yaml").write_text("just: a mapping\n")
    with pytest.raises(SystemExit, match="is not a YAML list of overrides"):
        _argv_for_resume(["train.py", f"resume={tmp_path / 'run'}"])


@pytest.mark.slow
def test_resume_checks_the_targets_a_run_directory_recorded(tmp_path):
    run_script("train.py", "trainer.max_epochs=1", cwd=tmp_path)
    [run] = run_dirs(tmp_path / "outputs")
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_epochs=2\n- model._target_=os.system\n")
    result = run_script("train.py", f"resume={run}", cwd=tmp_path, check=False)
    # refused by the check, before instantiate could call os.system(...)
    assert result.returncode != 0 and "resume=" in result.stderr
    assert "model._target_ = 'os.system' is not a class xentlit builds" in result.stderr


def test_resume_applies_the_recorded_overrides_and_a_new_one_wins(tmp_path, compose):
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text("- trainer.max_epochs=3\n- optimizer.lr=0.01\n- resume=old\n")
    argv = _argv_for_resume(["train.py", f"resume={tmp_path / 'run'}", "trainer.max_epochs=5"])
    run = str((tmp_path / "run").resolve())
    assert argv == ["train.py", "trainer.max_epochs=3", "optimizer.lr=0.01", "trainer.max_epochs=5",
                    f"resume={run}", f"hydra.run.dir={run}"]
    cfg = compose(*[a for a in argv[1:] if not a.startswith("hydra.")])
    assert cfg.trainer.max_epochs == 5 and cfg.optimizer.lr == 0.01 and cfg.resume == run


@pytest.mark.parametrize("value", ["${oc.create:{_target_: builtins.print, _args_: [PWNED]}}",
                                   "\\${oc.create:{_target_: builtins.print, _args_: [PWNED]}}"])
def test_an_interpolation_in_a_stored_config_is_refused_before_anything_is_built(value, capsys):
    checkpoint = {"state_dict": {}, "xentlit": {"config": {**SAFE, "model": {"_target_": "xentlit.MLP",
                                                                              "activation": value}}}}
    cfg = OmegaConf.create({"ckpt_path": "evil.ckpt", "trust_targets": []})
    with pytest.raises(UntrustedTargetError, match=r"model\.activation holds an interpolation"):
        _stored_config(checkpoint, cfg)
    assert "PWNED" not in capsys.readouterr().out


def test_resume_refuses_a_recorded_interpolation(tmp_path):
    hydra_dir = tmp_path / "run" / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(
        "- 'model.activation=\\${oc.create:{_target_: builtins.print, _args_: [PWNED]}}'\n")
    with pytest.raises(SystemExit, match="holds an interpolation"):
        _argv_for_resume(["train.py", f"resume={tmp_path / 'run'}"])


def test_targets_in_lists_classes_outside_the_trusted_packages_and_non_strings_are_refused():
    with pytest.raises(UntrustedTargetError, match=r"model\.hidden_sizes\[0\]\._target_ = 'os\.system'"):
        check_targets({"model": {"_target_": "xentlit.MLP", "hidden_sizes": [{"_target_": "os.system"}]}}, "f")
    with pytest.raises(UntrustedTargetError, match=r"'subprocess\.Popen' is not a class xentlit builds"):
        check_targets({"model": {"_target_": "subprocess.Popen", "args": ["true"]}}, "f")  # a class, untrusted
    with pytest.raises(UntrustedTargetError, match="not a dotted class name"):
        check_targets({"model": {"_target_": 42}}, "f")
