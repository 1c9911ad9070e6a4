"""Entry points on tiny configs: train (neural DSM) + resume + eval, and the
rate study writing its report (smoke tests of the wiring; the numbers are
checked elsewhere)."""

import json
import os

import pytest

from jaxlib_models.core import cli

pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
NEURAL = os.path.join(ROOT, "configs", "score", "neural.py") + ":tiny"
RATES = os.path.join(ROOT, "configs", "score", "rates.py") + ":tiny"


def test_train_resume_eval(tmp_path, capsys):
  wd = str(tmp_path / "nn")
  base = [f"--config={NEURAL}", f"--workdir={wd}"]
  assert cli.run("python -m train", "", "train_main", base) == 0
  assert cli.run("python -m train", "", "train_main",
                 base + ["--config.train.num_steps=9"]) == 0
  assert "resumed from step 6" in capsys.readouterr().out
  assert cli.run("python -m eval", "", "eval_main", base) == 0
  res = json.load(open(os.path.join(wd, "eval.json")))
  assert res["step"] == 9 and set(res["mse"]) == {"t0.01", "t0.1", "t1"}


def test_eval_without_checkpoint_says_how_to_train(tmp_path):
  from jaxlib_models.core.checkpoint import CheckpointError

  wd = str(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="train first"):
    cli.run("python -m eval", "", "eval_main",
            [f"--config={NEURAL}", f"--workdir={wd}"])


def test_study_tiny_writes_report_and_resumes(tmp_path, capsys):
  wd = str(tmp_path / "study")
  assert cli.run("python -m eval.study", "", "study_main",
                 [f"--config={RATES}", f"--workdir={wd}"]) == 0
  report = open(os.path.join(wd, "report.md")).read()
  for section in ("E1", "E2", "E3", "E4", "E5"):
    assert f"## {section}" in report
  for png in ("e1_mse_vs_n.png", "e2_mse_vs_t.png", "e3_tv_vs_n.png",
              "e4_samplers.png"):
    assert os.path.getsize(os.path.join(wd, png)) > 1000
  capsys.readouterr()
  assert cli.run("python -m eval.study", "", "study_main",
                 [f"--config={RATES}", f"--workdir={wd}"]) == 0
  assert "e1: reusing" in capsys.readouterr().out


def test_bad_config_values_fail_clearly():
  with pytest.raises(ValueError, match="unknown target"):
    from jaxlib_models.score import targets

    targets.make("cauchy")
