r"""Spike-and-slab BNN on the variable-selection simulation (one fit).

  python -m train --config=configs/spike_slab/sim.py --workdir=runs/sim
  python -m eval --config=configs/spike_slab/sim.py --workdir=runs/sim

Default: p = 2000 inputs (5 relevant), n_train = 10000, 2000-50-50-1 ReLU
net, 12000 Adam steps (inclusion logits at 30x the learning rate), prior
pi0 = 1e-4 (a node has any incoming edge with prior probability 1e-4);
about 1-1.5 min on a 2-core CPU. Expected (benchmarks/RESULTS.md, 10 seeds):
the 5 true features, <= 1 false positive, ~ 20-25 % of hidden nodes kept,
test RMSE ~ 1.5-1.8 (noise sd 1; the dense BNN underfits at ~ 3.2).
tiny: p = 50, n_train = 512, 20-20 hidden, 60 steps; seconds (smoke test).
"""

import ml_collections

from jaxlib_models.core.trainer import parallel_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "spike_slab"
  c.loss_impl = "core"  # "core" (closed-form fast path) | "numpyro".
  c.theta_lr_mult = 30.0  # Learning-rate factor of the inclusion logits.
  c.data = dict(
      name="variable_selection", seed=1,
      kwargs=dict(p=2000, n_train=10000, n_val=1000, n_test=1000),
  )
  c.model = dict(
      hidden=(50, 50), activation="relu", kind="spike_slab", pi0=0.0001,
      sigma0=1.0, sigma_b=1.0, tau=0.5, estimator="concrete",
      kl_warmup_frac=0.1, init_theta=3.0, init_rho=-6.0,
      node_pip="in_and_out", node_rule="pip", threshold=0.5,
  )
  c.train = dict(
      num_steps=12000, batch_size=128, learning_rate=3e-3, accum_steps=1,
      seed=0, log_every=100, checkpoint_every=1000, keep_checkpoints=2,
      async_checkpoint=True, progress=True, console=True, grad_clip=0.0,
      optimizer="adam", weight_decay=0.0,
      **parallel_defaults(),
  )
  c.prune = dict(threshold=0.5, finetune_steps=0)
  if arg == "tiny":
    c.data.kwargs = dict(p=50, n_train=512, n_val=0, n_test=256)
    c.model.hidden = (20, 20)
    c.train.num_steps = 60
    c.train.batch_size = 64
    c.train.log_every = 10
    c.train.checkpoint_every = 30
    c.prune.finetune_steps = 10
  elif arg not in (None, ""):
    raise ValueError(f"unknown config arg {arg!r}; use '' or 'tiny'")
  return c
