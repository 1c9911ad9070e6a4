r"""How much of each weight gradient a rank-r message keeps (PowerSGD ranks).

Loads a comm-study run's newest checkpoint (and the initial parameters),
takes the mean gradient over one global batch of the study's data, and prints
per tensor (per layer for scanned stacks) the fraction of its squared
Frobenius norm held by the top r singular values. Tensors whose late-training
spectrum is flat are the ones a fixed PowerSGD rank hurts most; they are the
candidates for `comm.rank_overrides`.

  .venv/bin/python benchmarks/grad_spectrum.py \
      --workdir runs/cs_lr01_s0/none --set learning_rate=0.1 --set seed=0

The `--set` values must be those the run was trained with (the study's
`study_settings.json` lists them).
"""

import argparse
import io as io_mod
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  import comm_study

  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True,
                  help="a comm-study variant folder with ckpt/ inside")
  ap.add_argument("--preset", choices=sorted(comm_study.PRESETS),
                  default="sgd")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="train settings the run used (as in comm_study.py)")
  ap.add_argument("--steps", type=int, default=300,
                  help="the run's --steps (default 300)")
  ap.add_argument("--batch-at", type=int, default=150,
                  help="data position of the global batch used (default 150)")
  ap.add_argument("--ranks", default="4,8,16,32",
                  help="comma-separated ranks r to report"
                  " (default %(default)s)")
  ap.add_argument("--json", help="also write the rows here")
  ap.add_argument("--png", help="also plot the top-r shares per tensor here")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from jaxlib_models.core import trainer
  from jaxlib_models.lm import pretrain
  from jaxlib_models.parallel import comm as comm_lib

  ranks = [int(r) for r in args.ranks.split(",")]
  train_set = dict(comm_study.PRESETS[args.preset])
  train_set.update(comm_study.parse_sets(args.set))
  c = comm_study.make_config(args.steps, {}, train_set)
  tc = trainer.TrainConfig.from_dict(c.train.to_dict())
  cfg = pretrain.model_config({**c.model.to_dict(),
                               "seq_len": c.data.seq_len})
  task = pretrain.make_task(cfg, tc, seq_len=c.data.seq_len, seed=0)
  state, _, step = trainer.restore_params(task, args.workdir, tc=tc)
  batch = next(task.batches(args.batch_at))

  def grad(p):
    return jax.grad(lambda p: task.loss_fn(p, batch, jax.random.key(0),
                                           jnp.asarray(0))[0])(p)

  out = {}
  for tag, params in (("init", task.init_params(jax.random.key(tc.seed))),
                      (f"step {step}", jax.device_get(state.params))):
    rows = comm_lib.lowrank_energy(grad(params), ranks)
    out[tag] = rows
    print(f"\n{tag}: share of |grad|^2 in the top r singular values")
    print("| tensor | layer | norm | " + " | ".join(f"r={r}" for r in ranks)
          + " |")
    print("|---|---:|---:|" + "---:|" * len(ranks))
    for r in rows:
      print(f"| {r['tensor']} | {r['layer']} | {r['norm']:.3g} | "
            + " | ".join(f"{r['top'][str(k)]:.3f}" for k in ranks) + " |")
  if args.json:
    from jaxlib_models.core import io
    io.write_json(args.json, out)
  if args.png:
    _plot(out, ranks, args.png)


def _plot(out: dict, ranks, path: str) -> None:
  """One panel per checkpoint: share of energy per tensor, a bar per rank."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  from jaxlib_models.core import io

  fig, axes = plt.subplots(1, len(out), figsize=(6 * len(out), 5),
                           sharey=True, squeeze=False)
  for ax, (tag, rows) in zip(axes[0], out.items()):
    labels = [f"{r['tensor'].removeprefix('model_')}[{r['layer']}]"
              for r in rows]
    x = np.arange(len(rows))
    w = 0.8 / len(ranks)
    for i, k in enumerate(ranks):
      ax.bar(x + i * w, [r["top"][str(k)] for r in rows], w, label=f"r={k}")
    ax.set_xticks(x + 0.4 - w / 2, labels, rotation=90, fontsize=7)
    ax.set_title(tag)
    ax.set_ylim(0, 1)
  axes[0][0].set_ylabel("top-r share of |grad|^2")
  axes[0][0].legend()
  fig.tight_layout()
  buf = io_mod.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  io.write_bytes(path, buf.getvalue())


if __name__ == "__main__":
  main()
