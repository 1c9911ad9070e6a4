r"""Byte-level Llama pretraining on the Python standard library's source.

  python -m train --config=configs/lm/pretrain.py --workdir=runs/lm_pretrain
  python -m train --config=configs/lm/pretrain.py:tiny --workdir=/tmp/lm_tiny

Any parallel layout or gradient sync is a config change, e.g.
  --config.train.mesh.data=8 --config.train.comm.name=powersgd \
  --config.train.comm.rank=4
  --config.train.mesh.node=8 --config.train.mesh.data=1 \
  --config.train.diloco.sync_every=20
  --config.train.mesh.fsdp=8 --config.train.mesh.data=1   (FSDP)
  --config.train.zero1=True                               (ZeRO-1)
See docs/scaling.md.

default: 4 layers, d=128, seq 128, batch 32, 600 steps (the model of the
  communication study, benchmarks/comm_study.py).
tiny: 2 layers, d=32, seq 32, batch 16, 6 steps on 200 kB of text (smoke).
"""

import ml_collections

from jaxlib_models.core.trainer import parallel_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "lm"
  c.model = dict(hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
  c.data = dict(seq_len=128, seed=0, corpus_root="", max_bytes=0)
  c.train = dict(num_steps=600, batch_size=32, learning_rate=3e-3,
                 optimizer="adamw", weight_decay=0.0, grad_clip=1.0,
                 log_every=50, checkpoint_every=200, progress=True,
                 **parallel_defaults())
  if arg == "tiny":
    c.model = dict(hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
    c.data.seq_len = 32
    c.data.max_bytes = 200_000
    c.train.num_steps = 6
    c.train.batch_size = 16
    c.train.log_every = 2
    c.train.checkpoint_every = 3
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}: choose '' or 'tiny'")
  return c
