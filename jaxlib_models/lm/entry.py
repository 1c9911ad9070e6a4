"""Library side of `python -m train` for byte-level LM pretraining.

train: trains the small Llama of `configs/lm/pretrain.py` on the Python
  standard library's source (see `lm.pretrain`) with any parallel layout and
  gradient sync of the train config, then writes `<workdir>/result.json`
  (held-out loss, bytes sent) next to the checkpoints.
"""

import os

import jax
import ml_collections

from jaxlib_models.core import io
from jaxlib_models.core import mesh as mesh_lib
from jaxlib_models.core import trainer
from jaxlib_models.lm import pretrain


def train_main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  tc = trainer.TrainConfig.from_dict(config.train.to_dict())
  d = config.model.to_dict()
  cfg = pretrain.model_config({**d, "seq_len": config.data.seq_len})
  task = pretrain.make_task(cfg, tc, seq_len=config.data.seq_len,
                            seed=config.data.seed,
                            corpus_root=config.data.corpus_root or None,
                            max_bytes=config.data.max_bytes)
  state = trainer.train(task, tc, workdir, config_json=config.to_json())
  _, val = pretrain.load_corpus(config.data.corpus_root or None,
                                config.data.max_bytes)
  mesh = mesh_lib.make_mesh(dict(tc.mesh))
  par = trainer.plan_parallel(tc, mesh)
  wire = par.wire_bytes(jax.eval_shape(lambda: state.params))
  result = {
      "val_loss": pretrain.eval_loss(jax.device_get(state.params), cfg, val,
                                     config.data.seq_len),
      "steps": tc.num_steps,
      "bytes_per_step": float(wire),
      "bytes_total": float(wire) * tc.num_steps,
      "comm": tc.comm.name,
      "diloco_H": tc.diloco.sync_every,
      "mesh": dict(mesh.shape),
  }
  if jax.process_index() == 0:
    io.write_json(os.path.join(workdir, "result.json"), result)
    print(f"held-out loss {result['val_loss']:.4f} nats/byte;"
          f" {result['bytes_total']:,.0f} gradient bytes sent per device",
          flush=True)
  return result
