"""A tiny byte-level LM task shared by the parallel tests."""

import jax
import numpy as np

from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.core import trainer
from jaxlib_models.lm import pretrain

MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2)
SEQ = 16


def config():
  return pretrain.model_config({**MODEL, "seq_len": SEQ})


def tc(**kw):
  base = dict(num_steps=4, batch_size=16, learning_rate=3e-3, optimizer="adam",
              checkpoint_every=2, progress=False, console=False, log_every=1,
              async_checkpoint=False)
  base.update(kw)
  return trainer.TrainConfig.from_dict(base)


def task(t):
  return pretrain.make_task(config(), t, seq_len=SEQ, max_bytes=100_000)


def mesh(sizes):
  n = int(np.prod(list(sizes.values())))
  return mesh_lib.make_mesh(sizes, jax.devices()[:n])


def run(tmp_path, name, sizes, **kw):
  t = tc(mesh=sizes, **kw)
  state = trainer.train(task(t), t, str(tmp_path / name), mesh=mesh(sizes))
  return state


def losses(workdir):
  import json
  import os

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
