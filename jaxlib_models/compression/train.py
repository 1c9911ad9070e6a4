"""Training and evaluation of the hyperprior codec with the foundation's
trainer (checkpoints, resume, parallel layouts by config).

Loss = lambda * 255^2 * MSE + bpp + aux, where bpp counts y and z from the
likelihoods and aux (the bottleneck's quantile loss) only reaches the
quantiles, which get a 10x learning rate (CompressAI trains them with a
separate optimiser). With `cfg.l1_weight` = alpha_1 > 0 the loss gains Fu et
al.'s channel-sparsity term alpha_1 * sum|y^| / (H W) (per image, averaged
over the batch; arXiv 2309.02529 technique 4). The context model is chosen
by `cfg.context`.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import codec, data, hyperprior
from jaxlib_models.core import trainer


def make_task(cfg: hyperprior.HyperpriorConfig, images: list, lam: float,
              tc: trainer.TrainConfig, crop: int, data_seed: int = 0):
  model = hyperprior.Hyperprior(cfg)

  def init_params(key):
    return model.init(key, jnp.zeros((1, crop, crop, 3)))["params"]

  def loss_fn(params, batch, rng, step):
    x = batch["x"]
    out = model.apply({"params": params}, x, rng, True)
    pixels = x.shape[0] * x.shape[1] * x.shape[2]
    bpp = -(jnp.sum(jnp.log2(out["y_lik"])) +
            jnp.sum(jnp.log2(out["z_lik"]))) / pixels
    mse = jnp.mean((out["x_hat"] - x) ** 2)
    aux = model.apply({"params": params}, method="aux_loss")
    loss = lam * 255.0**2 * mse + bpp + aux
    metrics = {"train/bpp": bpp, "train/mse": mse, "train/aux": aux,
               "train/psnr": -10 * jnp.log10(jnp.maximum(mse, 1e-10))}
    if cfg.l1_weight > 0:
      l1 = jnp.sum(jnp.abs(out["y_hat"])) / pixels
      loss = loss + cfg.l1_weight * l1
      metrics["train/l1"] = l1
    return loss, metrics

  def batches(start):
    step = start
    while True:
      yield {"x": data.crops(images, tc.batch_size, crop, data_seed, step)}
      step += 1

  shapes = jax.eval_shape(init_params, jax.random.key(0))
  axes = jax.tree.map(lambda s: (None,) * s.ndim, shapes)
  scales = jax.tree_util.tree_map_with_path(
      lambda p, _: 10.0 if "quantiles" in str(p) else 1.0, shapes)
  meta = {"N": cfg.N, "M": cfg.M, "lambda": lam}
  if cfg.context != "none":
    meta["context"] = cfg.context
  return trainer.Task(init_params, loss_fn, axes, batches, lr_scales=scales,
                      meta=meta)


def evaluate(cfg, params, photos: dict) -> dict:
  """Real-bitstream bpp, PSNR and timings per held-out photo (+ mean)."""
  cod = codec.Codec.from_params(cfg, params)
  rows = {}
  for name, img in photos.items():
    t0 = time.perf_counter()
    blob, recon = codec.compress(cod, img)
    t1 = time.perf_counter()
    out = codec.decompress(cod, blob)
    t2 = time.perf_counter()
    if not np.array_equal(out, recon):
      raise AssertionError(f"{name}: decoded image differs from the "
                           "encoder's reconstruction")
    mse = np.mean((out.astype(np.float64) - img) ** 2)
    rows[name] = {"bpp": 8 * len(blob) / (img.shape[0] * img.shape[1]),
                  "psnr": 10 * math.log10(255**2 / max(mse, 1e-12)),
                  "encode_s": t1 - t0, "decode_s": t2 - t1,
                  "bytes": len(blob)}
  mean = {k: float(np.mean([r[k] for r in rows.values()]))
          for k in ("bpp", "psnr", "encode_s", "decode_s")}
  return {"images": rows, "mean": mean}
