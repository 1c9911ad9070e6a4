"""Every training script switches layout and gradient sync by config alone.

Each case runs `python -m train` in-process on a `:tiny` config with only
command-line overrides, and checks that the run used the requested layout
(the layout line the trainer prints) and trained to a finite loss.
"""

import math
import os

import pytest

from jaxlib_models.core import cli
from jaxlib_models.core import metrics as metrics_lib

pytestmark = pytest.mark.usefixtures("fast_compile")

CASES = [
    ("configs/spike_slab/sim.py:tiny",
     ["--config.train.comm.name=powersgd", "--config.train.comm.rank=2",
      "--config.train.mesh.data=8", "--config.train.num_steps=4"],
     "comm=powersgd"),
    ("configs/spike_slab/sim.py:tiny",
     ["--config.train.mesh.data=1", "--config.train.mesh.fsdp=8",
      "--config.train.num_steps=4"],
     "fsdp=8"),
    ("configs/decoding/amateur.py:tiny",
     ["--config.train.comm.name=topk", "--config.train.comm.ratio=0.05",
      "--config.train.mesh.data=8", "--config.train.num_steps=2"],
     "comm=topk"),
    ("configs/lm/pretrain.py:tiny",
     ["--config.train.mesh.node=8", "--config.train.mesh.data=1",
      "--config.train.diloco.sync_every=2", "--config.train.num_steps=4"],
     "diloco(H=2"),
    ("configs/lm/pretrain.py:tiny",
     ["--config.train.zero1=True", "--config.train.mesh.data=8",
      "--config.train.num_steps=2"],
     "zero1"),
]


@pytest.mark.parametrize("config,overrides,expect", CASES,
                         ids=[f"{c.split('/')[-1]}-{e}" for c, _, e in CASES])
def test_training_script_takes_parallel_settings_from_the_command_line(
    config, overrides, expect, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  assert cli.run("python -m train", "", "train_main",
                 [f"--config={config}", f"--workdir={workdir}",
                  "--config.train.progress=False",
                  "--config.train.log_every=1", *overrides]) == 0
  out = capsys.readouterr().out
  layout = [l for l in out.splitlines() if l.startswith("layout:")]
  assert layout and expect in layout[0], out[-2000:]
  losses = [m.get("train/loss", m.get("loss"))
            for m in metrics_lib.read_metrics(workdir)
            if "train/loss" in m or "loss" in m]
  assert losses and all(math.isfinite(x) for x in losses)
  assert os.path.isdir(os.path.join(workdir, "ckpt"))


def test_unknown_communicator_on_the_command_line_names_the_choices(tmp_path):
  with pytest.raises(ValueError, match="comm.name='fp8'.*choose one of"):
    cli.run("python -m train", "", "train_main",
            ["--config=configs/lm/pretrain.py:tiny",
             f"--workdir={tmp_path}", "--config.train.comm.name=fp8"])


def _train(tmp_path, *overrides):
  return cli.run("python -m train", "", "train_main",
                 ["--config=configs/lm/pretrain.py:tiny",
                  f"--workdir={tmp_path}", "--config.train.progress=False",
                  *overrides])


def test_batch_that_does_not_split_over_the_data_axis_names_the_numbers(tmp_path):
  with pytest.raises(ValueError, match=r"batch_size=12 .*microbatch 12.*8"
                     r" batch-parallel devices \(node=1 x data=8 x fsdp=1\)"):
    _train(tmp_path, "--config.train.batch_size=12",
           "--config.train.mesh.data=8")


def test_mesh_that_does_not_match_the_device_count_names_the_numbers(tmp_path):
  with pytest.raises(ValueError, match="needs 6 devices, 8 are available"):
    _train(tmp_path, "--config.train.mesh.data=3",
           "--config.train.mesh.fsdp=2")
  with pytest.raises(ValueError, match="8 devices are not divisible by"
                     " the fixed axes' product 3"):
    _train(tmp_path, "--config.train.mesh.tensor=3")


def test_unknown_layout_names_are_errors(tmp_path):
  from jaxlib_models.core import trainer

  with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
    trainer.train(None, trainer.TrainConfig(mesh=(("model", 2),)),
                  str(tmp_path))
  with pytest.raises(ValueError, match="logical axis 'embed' maps to unknown"
                     r" mesh axes \['fdsp'\]"):
    trainer.TrainConfig(rules={"embed": "fdsp"})
  with pytest.raises(ValueError, match="unknown train settings"):
    trainer.TrainConfig.from_dict({"layout": "fsdp"})
