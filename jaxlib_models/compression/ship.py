r"""Trains the small hyperprior codecs shipped in `compression/pretrained/`.

  python -m jaxlib_models.compression.ship --out DIR [--seconds 50]
      [--lams 0.0035,0.0067,0.013,0.025] [--N 64 --M 96] [--crop 256]
      [--batch 8] [--lr 3e-4]

One model per lambda (loss lambda * 255^2 * MSE + bpp + aux, the training
Task of `compression.train`), each trained for a fixed wall-clock budget with
the foundation's jitted train step (`core.trainer.make_train_step`) on one
device: Adam (quantiles at 10x, `Task.lr_scales`), global-norm clip 1.0, the
learning rate dropped 10x for the last 20 % of the budget. Crops: a pool of
`--pool` random crops (with random flips) of the training photos
(`data.training_photos()`: libjxl-testdata, or `--train-folder`, e.g. the
27 photos of `compression.corpus`; never the evaluation photos),
drawn with probability proportional to photo area and kept on the device;
each step gathers `--batch` of them.

Each model is written as `hyperprior_lam{lam}.npz` (parameters cast to
float16, so the four fit the repository's 20 MB budget; the codec then uses
those float16 values as its float32 weights: the cast happens once, here,
and the model id hashes the weights actually used) with a JSON beside it
(lambda, N, M, steps, seconds, device, final training metrics).

Checkerboard heads on frozen hyperpriors (the shipped `checkerboard-qK`):

  python -m jaxlib_models.compression.ship --context checkerboard
      --base jaxlib_models/compression/pretrained --out DIR
      --train-folder CORPUS [--seconds 600] [--crop 256] [--batch 16]

trains only Fu et al.'s two parameter networks and the 5x5 context
(`checkerboard.CheckerboardContext`, params `ckbd`) on top of each
`hyperprior_lam{lam}` in --base, whose transforms, hyper path and
bottleneck stay as they are. With the transforms frozen, the loss is the
rate of y alone: the synthesis sees STE-rounded y - mu + mu, whose gradient
with respect to mu is zero, and z's bits do not change. So each crop's y and
psi = h_s(z^) (z rounded as at test time) are computed once, and training
runs on the latents (16 x 16 x M for a 256^2 crop), fast on a CPU. The file
`checkerboard_lam{lam}.npz` holds the head only (float16, ~1.7 MB at
M = 96), and its JSON names the base file and its sha256: `pretrained.load`
merges the two and refuses a base that changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlib_models.compression import (checkerboard, data, entropy,
                                       hyperprior, train)
from jaxlib_models.core import io, trainer
from jaxlib_models.core import mesh as mesh_lib


def crop_pool(photos: list, n: int, size: int, seed: int) -> np.ndarray:
  """(n, size, size, 3) uint8 random crops with random flips, photos drawn
  with probability proportional to their area."""
  rng = np.random.default_rng(seed)
  ok = [p for p in photos if min(p.shape[:2]) >= size]
  if not ok:
    raise ValueError(f"no training photo is at least {size}x{size}")
  area = np.array([p.shape[0] * p.shape[1] for p in ok], np.float64)
  which = rng.choice(len(ok), n, p=area / area.sum())
  out = np.empty((n, size, size, 3), np.uint8)
  for k, w in enumerate(which):
    img = ok[w]
    i = rng.integers(img.shape[0] - size + 1)
    j = rng.integers(img.shape[1] - size + 1)
    c = img[i:i + size, j:j + size]
    if rng.random() < 0.5:
      c = c[:, ::-1]
    if rng.random() < 0.5:
      c = c[::-1]
    out[k] = c
  return out


def flatten_params(params) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in flat}


def save_model(stem: str, cfg, params, info: dict | None = None) -> None:
  """`stem.npz` (float16 weights) + `stem.json` (config and `info`), both
  written atomically; `pretrained.load` reads them back (any config,
  e.g. a pruned student from `distill.pruned_model`)."""
  flat = {k: v.astype(np.float16) for k, v in flatten_params(params).items()}
  buf = __import__("io").BytesIO()
  np.savez_compressed(buf, **flat)
  io.write_bytes(stem + ".npz", buf.getvalue())
  io.write_json(stem + ".json", dict(info or {},
                                     config=dataclasses.asdict(cfg)))


def unflatten_params(arrays: dict, like) -> dict:
  """Inverse of flatten_params onto the structure of `like` (abstract ok)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, ref in flat:
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    if key not in arrays:
      raise KeyError(f"parameter {key} missing from the stored model")
    a = np.asarray(arrays[key], np.float32)
    if a.shape != tuple(ref.shape):
      raise ValueError(f"parameter {key}: stored shape {a.shape}, the model"
                       f" needs {tuple(ref.shape)}")
    leaves.append(a)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def train_one(cfg, lam: float, pool_dev, args, init=None) -> tuple[dict, dict]:
  """Trains one model for args.seconds; returns (params, info)."""
  tc = trainer.TrainConfig(num_steps=10**9, batch_size=args.batch,
                           learning_rate=args.lr, optimizer="adam",
                           grad_clip=1.0,
                           mesh=(("data", 1), ("fsdp", 1), ("tensor", 1)),
                           progress=False, console=False)
  task = train.make_task(cfg, [np.zeros((args.crop, args.crop, 3), np.uint8)],
                         lam, tc, args.crop)
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  # Two optimizers as CompressAI does: the main parameters with global-norm
  # clipping, the bottleneck's quantiles (aux loss only) at 10x the rate and
  # outside the clip. One clip over both lets the aux gradient (norm ~30-50
  # early on) shrink every main update ~40x: the first shipped run lost its
  # GPU budget to exactly that.
  lr = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr)
  labels = jax.tree.map(lambda s: "aux" if s == 10.0 else "main",
                        task.lr_scales)
  tx = optax.multi_transform(
      {"main": optax.chain(optax.clip_by_global_norm(1.0), lr),
       "aux": optax.adam(10 * args.lr)}, labels)
  init_fn, shardings = trainer.init_state(task, tx, mesh, seed=args.seed)
  x0 = np.zeros((args.batch, args.crop, args.crop, 3), np.float32)
  bsh = trainer.batch_shardings_for({"x": x0}, mesh)
  step_fn = trainer.make_train_step(task.loss_fn, mesh, shardings, bsh)
  n = pool_dev.shape[0]

  @jax.jit
  def gather(key):
    idx = jax.random.randint(key, (args.batch,), 0, n)
    return {"x": pool_dev[idx].astype(jnp.float32) / 255.0}

  def set_lr(state, value):
    main = state.opt_state.inner_states["main"]
    inner = main.inner_state[1]
    hp = dict(inner.hyperparams, learning_rate=jnp.asarray(value, jnp.float32))
    main = main._replace(inner_state=(main.inner_state[0],
                                      inner._replace(hyperparams=hp)))
    states = dict(state.opt_state.inner_states, main=main)
    return state.replace(opt_state=state.opt_state._replace(
        inner_states=states))

  with jax.set_mesh(mesh):
    state = init_fn()
    if init is not None:  # continue from a stored model (fresh optimizer)
      params = unflatten_params(init, state.params)
      state = state.replace(params=jax.device_put(params, shardings.params),
                            opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(
                                jax.device_put(params, shardings.params)))
    key = jax.random.key(args.seed + 1)
    rng = jax.random.key(args.seed + 2)
    t_start = time.perf_counter()
    state, m = step_fn(state, gather(jax.random.fold_in(key, 0)), rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    steps, dropped, hist = 1, False, []
    while True:
      el = time.perf_counter() - t0
      if el >= args.seconds:
        break
      if not dropped and el >= 0.8 * args.seconds:
        state, dropped = set_lr(state, args.lr / 10), True
      state, m = step_fn(state, gather(jax.random.fold_in(key, steps)), rng)
      steps += 1
      if steps % 200 == 0:
        hist.append({k: float(v) for k, v in jax.device_get(m).items()})
    jax.block_until_ready(m)
    final = {k: float(v) for k, v in jax.device_get(m).items()}
  info = {"lambda": lam, "N": cfg.N, "M": cfg.M, "kind": cfg.kind,
          "steps": steps, "train_seconds": time.perf_counter() - t0,
          "compile_seconds": compile_s, "batch": args.batch,
          "crop": args.crop, "lr": args.lr, "pool": int(n),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "final_metrics": final, "history_every_200": hist}
  return jax.device_get(state.params), info


def base_features(cfg, params, pool: np.ndarray, chunk: int = 32):
  """(y, psi) float32 of every uint8 crop of `pool` under a frozen model:
  y = g_a(x), psi = cat(scales, means) of h_s(z^) with z^ rounded as the
  coder rounds it (the entropy bottleneck's test path)."""
  model = hyperprior.Hyperprior(cfg)

  def feats(mdl, x):
    y = mdl.analysis(x)
    z_hat, _ = mdl.entropy_bottleneck(mdl.hyper_analysis(y), None, False)
    return y, jnp.concatenate(mdl.hyper_synthesis(z_hat), -1)

  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=feats))
  ys = psis = None
  for i in range(0, len(pool), chunk):
    x = jnp.asarray(pool[i:i + chunk], jnp.float32) / 255.0
    y, psi = fn(params, x)
    if ys is None:  # Preallocated: no second copy of the whole pool.
      ys = np.empty((len(pool),) + y.shape[1:], np.float32)
      psis = np.empty((len(pool),) + psi.shape[1:], np.float32)
    ys[i:i + chunk], psis[i:i + chunk] = y, psi
  return ys, psis


def base_y_bpp(y_all, psi_all, kind: str, seed: int = 0,
               chunk: int = 64) -> float:
  """Bits of y per pixel under the plain hyperprior's conditional (noisy y,
  as in training): the figure a checkerboard head has to beat."""
  fn = jax.jit(lambda y, psi, k: -jnp.sum(jnp.log2(entropy.likelihood(
      y + jax.random.uniform(k, y.shape, y.dtype, -0.5, 0.5),
      psi[..., y.shape[-1]:], psi[..., :y.shape[-1]], kind))))
  bits = sum(float(fn(y_all[i:i + chunk], psi_all[i:i + chunk],
                      jax.random.key(seed + i)))
             for i in range(0, len(y_all), chunk))
  n, h, w, _ = y_all.shape
  return bits / (n * 16 * h * 16 * w)


def train_context(cfg, y_all, psi_all, args, log=print,
                  init=None) -> tuple[dict, dict]:
  """Trains the checkerboard head `ckbd` of `cfg` (context="checkerboard")
  on fixed latents for args.seconds: Adam at args.lr, dropped 10x for the
  last 20 %; loss = bits of y per pixel of the crops (noisy likelihoods,
  STE-rounded anchors as context, the module's training path)."""
  if cfg.context != "checkerboard":
    raise ValueError(f"train_context needs context='checkerboard', got"
                     f" {cfg.context!r}")
  head = checkerboard.CheckerboardContext(
      cfg.M, cfg.anchor_family, cfg.nonanchor_family, cfg.mixture_components)
  n, h, w, _ = y_all.shape
  pixels = args.batch * (16 * h) * (16 * w)
  params = head.init(jax.random.key(args.seed), jnp.asarray(y_all[:1]),
                     jnp.asarray(psi_all[:1]))["params"]
  if init is not None:  # continue from a stored head (fresh optimizer)
    params = unflatten_params(
        {k[len("ckbd/"):]: v for k, v in init.items()}, params)
  lr = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0), lr)
  opt = tx.init(params)
  y_dev, psi_dev = jax.device_put(y_all), jax.device_put(psi_all)

  def loss_fn(p, y, psi, key):
    _, lik = head.apply({"params": p}, y, psi, key, training=True)
    return -jnp.sum(jnp.log2(lik)) / pixels

  @jax.jit
  def step(p, opt, key, lr_now):
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_idx, (args.batch,), 0, n)
    loss, g = jax.value_and_grad(loss_fn)(p, y_dev[idx], psi_dev[idx],
                                          k_noise)
    hp = dict(opt[1].hyperparams, learning_rate=lr_now)
    opt = (opt[0], opt[1]._replace(hyperparams=hp))
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  key = jax.random.key(args.seed + 1)
  t_start = time.perf_counter()
  params, opt, loss = step(params, opt, jax.random.fold_in(key, 0),
                           jnp.float32(args.lr))
  first = float(loss)
  compile_s = time.perf_counter() - t_start
  t0 = time.perf_counter()
  steps, hist, lr_now = 1, [], jnp.float32(args.lr)
  while time.perf_counter() - t0 < args.seconds:
    if time.perf_counter() - t0 >= 0.8 * args.seconds:
      lr_now = jnp.float32(args.lr / 10)
    params, opt, loss = step(params, opt, jax.random.fold_in(key, steps),
                             lr_now)
    steps += 1
    if steps % 500 == 0:
      hist.append({"step": steps, "y_bpp": float(loss)})
      log(f"  step {steps}: y bpp {float(loss):.4f}")
  info = {"steps": steps, "train_seconds": time.perf_counter() - t0,
          "compile_seconds": compile_s, "batch": args.batch,
          "crop": args.crop, "lr": args.lr, "pool": int(n),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "first_y_bpp": first,
          "final_metrics": {"train/y_bpp": float(loss)},
          "history_every_500": hist}
  return jax.device_get(params), info


def _ship_context(args, photos) -> int:
  """--context checkerboard: one head per base hyperprior in --base."""
  if not args.base:
    raise SystemExit("--context checkerboard needs --base (a folder of"
                     " hyperprior_lam*.npz models to build the heads on)")
  pool = crop_pool(photos, args.pool, args.crop, args.seed)
  for lam in (float(v) for v in args.lams.split(",")):
    stem = os.path.join(args.base, f"hyperprior_lam{lam:g}")
    if not os.path.exists(stem + ".npz"):
      raise SystemExit(f"no base model {stem}.npz for lambda {lam:g}")
    rec = io.read_json(stem + ".json")
    base_cfg = hyperprior.HyperpriorConfig(**rec["config"])
    cfg = dataclasses.replace(base_cfg, context="checkerboard",
                              anchor_family=args.anchor_family,
                              nonanchor_family=args.nonanchor_family)
    like = jax.eval_shape(lambda c=base_cfg: hyperprior.Hyperprior(c).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])
    with np.load(stem + ".npz") as z:
      base = unflatten_params(dict(z), like)
    t0 = time.perf_counter()
    y_all, psi_all = base_features(base_cfg, base, pool)
    print(f"lambda {lam:g}: latents of {len(pool)} crops in"
          f" {time.perf_counter() - t0:.0f} s", flush=True)
    base_bpp = base_y_bpp(y_all, psi_all, base_cfg.kind, args.seed)
    print(f"  the base hyperprior's y bpp on these crops: {base_bpp:.4f}",
          flush=True)
    init, prev = None, {}
    if args.init:
      prev_stem = os.path.join(args.init, f"checkerboard_lam{lam:g}")
      with np.load(prev_stem + ".npz") as z:
        init = dict(z)
      prev = io.read_json(prev_stem + ".json")
    head, info = train_context(cfg, y_all, psi_all, args,
                               log=lambda s: print(s, flush=True), init=init)
    info["base_train_y_bpp"] = base_bpp
    if prev:
      info["continued_from"] = {k: prev.get(k) for k in (
          "steps", "train_seconds", "device", "batch", "crop", "lr",
          "continued_from")}
    with open(stem + ".npz", "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    info.update({"lambda": lam, "corpus": corpus_record(args.train_folder),
                 "base": os.path.basename(stem), "base_sha256": digest,
                 "N": cfg.N, "M": cfg.M, "kind": cfg.kind})
    save_model(os.path.join(args.out, f"checkerboard_lam{lam:g}"), cfg,
               {"ckbd": head}, info)
    print(f"lambda {lam:g}: {info['steps']} steps in"
          f" {info['train_seconds']:.0f} s, y bpp"
          f" {info['final_metrics']['train/y_bpp']:.4f}", flush=True)
  return 0


def corpus_record(folder: str) -> list[dict] | str:
  """What a model was trained on: the folder's MANIFEST.json rows (name,
  package, licence), or a description of the default corpus."""
  if not folder:
    return "libjxl-testdata (data.TRAIN_SET, CC0)"
  path = os.path.join(folder, "MANIFEST.json")
  if not os.path.exists(path):
    return f"PNG folder {folder} (no MANIFEST.json)"
  return [{k: r.get(k) for k in ("name", "package", "version", "licence")}
          for r in io.read_json(path)["photos"]]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--out", required=True, help="folder for the .npz/.json files")
  p.add_argument("--seconds", type=float, default=50.0,
                 help="training wall-clock budget per model (compile excluded)")
  p.add_argument("--lams", default="0.0035,0.0067,0.013,0.025")
  p.add_argument("--N", type=int, default=64)
  p.add_argument("--M", type=int, default=96)
  p.add_argument("--crop", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--pool", type=int, default=2048)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--init", default="",
                 help="folder of earlier hyperprior_lam*.npz (with --context"
                 " checkerboard: checkerboard_lam*.npz) to continue from")
  p.add_argument("--context", default="none",
                 choices=("none", "checkerboard"),
                 help="checkerboard: train only a checkerboard head (two"
                 " parameter networks + context) on each frozen hyperprior"
                 " of --base")
  p.add_argument("--base", default="",
                 help="with --context checkerboard: folder of the"
                 " hyperprior_lam*.npz models to build on")
  p.add_argument("--anchor-family", default="gaussian",
                 help="checkerboard anchors' probability model (default"
                 " %(default)s; gmm/gllmm decode slower and round y"
                 " without the mean, which the frozen synthesis never saw)")
  p.add_argument("--nonanchor-family", default="gaussian",
                 help="checkerboard non-anchors' model (default %(default)s)")
  p.add_argument("--train-folder", default="",
                 help="PNG folder to train on instead of libjxl-testdata"
                 " (the shipped models: `python -m"
                 " jaxlib_models.compression.corpus --out DIR`)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  photos = list(data.training_photos(args.train_folder or None).values())
  if args.context == "checkerboard":
    return _ship_context(args, photos)
  cfg = hyperprior.HyperpriorConfig(N=args.N, M=args.M)
  t0 = time.perf_counter()
  pool = crop_pool(photos, args.pool, args.crop, args.seed)
  pool_dev = jax.device_put(pool)
  print(f"{jax.devices()[0].device_kind}: pool of {len(pool)} crops"
        f" {args.crop}^2 from {len(photos)} photos in"
        f" {time.perf_counter() - t0:.1f} s", flush=True)
  for lam in (float(v) for v in args.lams.split(",")):
    init, prev = None, {}
    if args.init:
      base = os.path.join(args.init, f"hyperprior_lam{lam:g}")
      init = dict(np.load(base + ".npz"))
      prev = io.read_json(base + ".json")
    params, info = train_one(cfg, lam, pool_dev, args, init)
    info["corpus"] = corpus_record(args.train_folder)
    if prev:
      info["continued_from"] = {k: prev.get(k) for k in (
          "steps", "train_seconds", "device", "batch", "crop", "lr",
          "corpus", "continued_from")}
    save_model(os.path.join(args.out, f"hyperprior_lam{lam:g}"), cfg,
               params, info)
    fm = info["final_metrics"]
    print(f"lambda {lam:g}: {info['steps']} steps in"
          f" {info['train_seconds']:.0f} s (compile {info['compile_seconds']:.0f} s),"
          f" loss {fm['train/loss']:.3f} bpp {fm['train/bpp']:.3f}"
          f" psnr {fm['train/psnr']:.2f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
