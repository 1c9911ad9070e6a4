"""Three-step knowledge distillation for a lighter decoder (Fu et al.,
arXiv 2309.02529; brief learned_image_compression.md §2.3). All structure
here is a library reconstruction: the paper's loss weights, feature points
and pruned blocks are unknown.

  (i)   Train the teacher with the R-D loss (`train.make_task`).
  (ii)  Initialise the student from the teacher (`init_student_from_teacher`:
        same size, or a narrower decoder with the leading channels copied) and
        train it against the teacher with `make_kd_task`:
          L_s = R_s + λ·255²·MSE(x, x̂_s) + β_out·255²·MSE(x̂_t, x̂_s)
                + β_feat·Σ_k mean((P_k f_s^k − f_t^k)²)  (+ the student's aux)
        Defaults β_out = λ, β_feat = 0.1·λ·255² [paper values unknown]; the
        teacher is frozen unless `teacher_trainable` (then it also trains on
        its own R-D loss; the distillation terms never reach it).
  (iii) `prune_decoder`: rank the student's bypassable synthesis blocks by
        how much bypassing each raises the validation R-D loss and bypass the
        cheapest until half remain; then retrain the decoder side with
        `make_kd_task(..., KDConfig(bypass=..., frozen=ENCODER_SIDE))`, which
        keeps g_a (and h_a) fixed and trains g_s, h_s and the entropy models.

Stages, features and bypasses come from Flax method interceptors around the
model's `synthesis` method, so the student's R-D loss is exactly
`train.make_task`'s (whatever it contains) and hyperprior.py is untouched:
  * a stage is one direct submodule call made inside `synthesis`;
  * the feature f^k is the output of the last stage at each spatial
    resolution except the final one (x̂); for the mean-scale hyperprior these
    are the three IGDN outputs at 1/8, 1/4 and 1/2 resolution;
  * a block is a stage whose output shape equals its input shape (IGDNs,
    residual blocks, DRMs); bypassing it returns its input.
Where student and teacher widths differ, P_k is a learned 1x1 projection
(student -> teacher channels, initialised to the identity on the leading
channels, matching the leading-channel copy of the student's weights).

B: batch, H/W: pixels, C: channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlib_models.compression import deform, hyperprior, train
from jaxlib_models.core import trainer

ENCODER_SIDE = ("g_a", "h_a")  # Parameters frozen in step (iii).


@dataclasses.dataclass(frozen=True)
class KDConfig:
  """Distillation settings (paper values unknown; brief §2.3 defaults)."""

  beta_out: float | None = None  # Output-KD weight; None = λ.
  beta_feat: float | None = None  # Feature-KD weight; None = 0.1·λ·255².
  # Teacher also trains on its own R-D loss (the brief's default: "the two
  # trained jointly"; paper value unknown). False freezes it.
  teacher_trainable: bool = True
  bypass: tuple[str, ...] = ()  # Student synthesis blocks cut (step iii).
  frozen: tuple[str, ...] = ()  # Student param prefixes kept fixed.

  def __post_init__(self):
    for name in ("beta_out", "beta_feat"):
      v = getattr(self, name)
      if v is not None and not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name}={v} must be a finite value >= 0")
    object.__setattr__(self, "bypass", tuple(self.bypass))
    object.__setattr__(self, "frozen", tuple(self.frozen))

  def weights(self, lam: float) -> tuple[float, float]:
    """(β_out, β_feat) with the defaults resolved for this λ."""
    out = lam if self.beta_out is None else self.beta_out
    feat = 0.1 * lam * 255.0**2 if self.beta_feat is None else self.beta_feat
    return float(out), float(feat)


@dataclasses.dataclass
class Stage:
  """One direct submodule call inside `synthesis`."""

  name: str
  module: nn.Module
  x: jax.Array
  out: jax.Array
  bypassed: bool


class _Tap:
  """Method interceptor: records `synthesis` stages and the top-level
  `__call__` output of one apply; replaces named stages by the identity."""

  def __init__(self, bypass: Sequence[str] = (), on_leaf=None):
    self.bypass = frozenset(bypass)
    self.on_leaf = on_leaf  # f(module, x, out) for every call in synthesis.
    self.stages: list[Stage] = []
    self.outputs: list = []
    self._in_synthesis = 0

  def __call__(self, next_fun, args, kwargs, ctx):
    mod, method = ctx.module, ctx.method_name
    path = mod.path
    if not path:  # The top-level model.
      if method == "synthesis":
        self._in_synthesis += 1
        try:
          return next_fun(*args, **kwargs)
        finally:
          self._in_synthesis -= 1
      out = next_fun(*args, **kwargs)
      if method == "__call__":
        self.outputs.append(out)
      return out
    if not self._in_synthesis or method != "__call__":
      return next_fun(*args, **kwargs)
    x = args[0]
    if len(path) == 1 and mod.name in self.bypass:
      self.stages.append(Stage(mod.name, mod, x, x, True))
      return x
    out = next_fun(*args, **kwargs)
    if len(path) == 1:
      self.stages.append(Stage(mod.name, mod, x, out, False))
    if self.on_leaf is not None:
      self.on_leaf(mod, x, out)
    return out

  def x_hat(self) -> jax.Array:
    hits = [o["x_hat"] for o in self.outputs
            if isinstance(o, Mapping) and "x_hat" in o]
    if len(hits) != 1:
      raise RuntimeError(f"expected one model call returning x_hat, saw "
                         f"{len(hits)}")
    return hits[0]

  def features(self) -> list[jax.Array]:
    """Last stage output at each resolution, the final (x̂) one excluded."""
    if not self.stages:
      raise RuntimeError("no synthesis stages seen: the model must decode "
                         "through its `synthesis` method")
    feats = []
    for cur, nxt in zip(self.stages[:-1], self.stages[1:]):
      if cur.out.shape[1:3] != nxt.out.shape[1:3]:
        feats.append(cur.out)
    return feats


SYNTHESIS_ORDER = hyperprior.SYNTHESIS_BYPASSABLE


def _model(cfg, model):
  return model if model is not None else hyperprior.Hyperprior(cfg)


def _abstract_params(model, h: int, w: int):
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: model.init(k, x)["params"],
                        jax.random.key(0), x), x


def _abstract_synthesis(model, h: int, w: int, tap: _Tap):
  """Traces synthesis of an (h, w) image's latent under `tap`."""
  params, x = _abstract_params(model, h, w)
  y = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x, method="analysis"),
      params, x)

  def run(p, y):
    with nn.intercept_methods(tap):
      return model.apply({"params": p}, y, method="synthesis")

  return jax.eval_shape(run, params, y)


def synthesis_blocks(cfg, h: int = 64, w: int = 64, model=None
                     ) -> tuple[str, ...]:
  """Names of the bypassable (shape-preserving) synthesis stages, in call
  order; e.g. ('g_s_igdn0', 'g_s_igdn1', 'g_s_igdn2') for the hyperprior."""
  tap = _Tap()
  _abstract_synthesis(_model(cfg, model), h, w, tap)
  return tuple(s.name for s in tap.stages
               if s.x.shape == s.out.shape and s.x.dtype == s.out.dtype)


def feature_shapes(cfg, h: int, w: int, bypass=(), model=None
                   ) -> list[tuple[int, ...]]:
  """Shapes of the distilled synthesis features for an (h, w) input."""
  tap = _Tap(bypass)
  _abstract_synthesis(_model(cfg, model), h, w, tap)
  return [tuple(f.shape) for f in tap.features()]


# ---------------------------------------------------------------- FLOPs


def _own_params(mod) -> dict:
  p = mod.variables.get("params", {})
  return {k: v for k, v in p.items() if not isinstance(v, Mapping)}


def _module_macs(mod, x, out) -> int:
  """Multiply-adds of one call, excluding its submodules' calls."""
  own = _own_params(mod)
  pix_in = math.prod(x.shape[:-1])
  pix_out = math.prod(out.shape[:-1])
  if isinstance(mod, deform.DeformConv):
    kh, kw, c, o = own["kernel"].shape
    t = kh * kw
    # Tap contraction + 4 bilinear corners and the modulation per sample.
    return pix_out * t * c * o + pix_out * t * c * 5
  if isinstance(mod, nn.ConvTranspose):  # Each input pixel meets k² taps.
    kh, kw, c, o = own["kernel"].shape
    return pix_in * kh * kw * c * o
  if isinstance(mod, nn.Conv):  # kernel (kh, kw, C / groups, O).
    kh, kw, c, o = own["kernel"].shape
    return pix_out * kh * kw * c * o
  if isinstance(mod, nn.Dense):
    c, o = own["kernel"].shape
    return pix_in * c * o
  if isinstance(mod, hyperprior.GDN):
    return pix_in * x.shape[-1] ** 2
  if own:
    raise NotImplementedError(
        f"decoder_flops: no multiply-add rule for {type(mod).__name__} "
        f"({mod.name}), which owns parameters {sorted(own)}")
  return 0  # Containers: their submodules are counted.


def decoder_flops(cfg, h: int, w: int, bypass: Sequence[str] = (),
                  model=None) -> int:
  """Multiply-adds of the synthesis transform g_s for one (h, w) image.

  Counts convolutions (transposed: input pixels x k² x C_in x C_out), dense
  layers, (I)GDN (C² per pixel) and deformable convs (tap contraction plus
  five multiplies per sample for bilinear weights and modulation);
  activations, additions and square roots are not multiply-adds. Bypassed
  blocks cost nothing.
  """
  macs = [0]

  def count(mod, x, out):
    macs[0] += _module_macs(mod, x, out)

  _abstract_synthesis(_model(cfg, model), h, w, _Tap(bypass, on_leaf=count))
  return macs[0]


# --------------------------------------------------- student initialisation


def init_student_from_teacher(student_params, teacher_params
                              ) -> tuple[dict, dict]:
  """Copies what fits from the teacher into a (freshly initialised) student.

  Per student leaf with the same path in the teacher: equal shapes are copied;
  a leaf no larger in any dimension gets the teacher's leading slice (the
  first channels of a narrower decoder; GDN's gamma its leading block);
  anything else keeps the student's initialisation.

  Returns:
    (params, counts) with counts of "copied", "sliced" and "kept" leaves.
  """
  t_flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
  counts = {"copied": 0, "sliced": 0, "kept": 0}

  def one(path, s):
    t = t_flat.get(jax.tree_util.keystr(path))
    if t is not None and np.ndim(t) == np.ndim(s):
      if np.shape(t) == np.shape(s):
        counts["copied"] += 1
        return jnp.asarray(t, s.dtype)
      if all(a <= b for a, b in zip(np.shape(s), np.shape(t))):
        counts["sliced"] += 1
        return jnp.asarray(t[tuple(slice(0, n) for n in np.shape(s))],
                           s.dtype)
    counts["kept"] += 1
    return s

  out = jax.tree_util.tree_map_with_path(one, student_params)
  return out, counts


def _freeze(params: Mapping, prefixes: Sequence[str]):
  if not prefixes:
    return params
  return {k: jax.lax.stop_gradient(v)
          if any(k.startswith(p) for p in prefixes) else v
          for k, v in params.items()}


def _lr_tree(scales, like, zero: Callable[[str], bool]) -> dict:
  """Learning-rate multipliers (ones if None), 0 under keys where zero(k)."""
  if scales is None:
    scales = jax.tree.map(lambda _: 1.0, like)
  return {k: jax.tree.map(lambda _: 0.0, v) if zero(k) else v
          for k, v in scales.items()}


def _projection_init(s_shapes, t_shapes) -> dict:
  if len(s_shapes) != len(t_shapes):
    raise ValueError(f"student has {len(s_shapes)} synthesis feature points,"
                     f" the teacher {len(t_shapes)}; feature KD needs the same"
                     " resolution stages")
  proj = {}
  for k, (s, t) in enumerate(zip(s_shapes, t_shapes)):
    if s[1:3] != t[1:3]:
      raise ValueError(f"feature {k}: student {s} vs teacher {t} resolution")
    if s[-1] != t[-1]:
      proj[f"f{k}"] = {"kernel": jnp.eye(s[-1], t[-1], dtype=jnp.float32)}
  return proj


def feature_loss(feats_s, feats_t, proj: Mapping) -> jax.Array:
  """Σ_k mean((P_k f_s^k − f_t^k)²); P_k = identity when proj lacks f{k}."""
  total = jnp.zeros((), jnp.float32)
  for k, (fs, ft) in enumerate(zip(feats_s, feats_t, strict=True)):
    if f"f{k}" in proj:
      fs = jnp.einsum("BHWC,CD->BHWD", fs, proj[f"f{k}"]["kernel"])
    total = total + jnp.mean((fs - ft) ** 2)
  return total


# -------------------------------------------------------------- the task


def make_kd_task(teacher_cfg, teacher_params, student_cfg, images: list,
                 lam: float, tc: trainer.TrainConfig, crop: int,
                 kd: KDConfig = KDConfig(), student_params=None,
                 data_seed: int = 0) -> trainer.Task:
  """Step (ii) (or (iii) with kd.bypass / kd.frozen) as a trainer Task.

  Params are {"student", "teacher", "proj"}: the teacher rides along in the
  checkpoint (so a run resumes on its own) with a zero learning rate unless
  `kd.teacher_trainable`; read the result from `state.params["student"]`.

  Args:
    teacher_cfg, teacher_params: the step-(i) model.
    student_cfg: the student's config (any width the trainer builds).
    images, lam, tc, crop, data_seed: as `train.make_task` (same batches).
    kd: weights and step-(iii) settings.
    student_params: starting point; None = `init_student_from_teacher`.
  """
  s_task = train.make_task(student_cfg, images, lam, tc, crop, data_seed)
  t_task = train.make_task(teacher_cfg, images, lam, tc, crop, data_seed)
  beta_out, beta_feat = kd.weights(lam)
  need_teacher = kd.teacher_trainable or beta_out > 0 or beta_feat > 0
  blocks = synthesis_blocks(student_cfg, crop, crop)
  unknown = set(kd.bypass) - set(blocks)
  if unknown:
    raise ValueError(f"bypass {sorted(unknown)}: not bypassable student "
                     f"synthesis blocks; have {blocks}")
  s_init = s_task.init_params(jax.random.key(tc.seed))
  for p in kd.frozen:
    if not any(k.startswith(p) for k in s_init):
      raise ValueError(f"frozen prefix {p!r} matches no student parameter; "
                       f"have {sorted(s_init)}")
  if student_params is None:
    student_params, _ = init_student_from_teacher(s_init, teacher_params)
  proj = _projection_init(
      feature_shapes(student_cfg, crop, crop, kd.bypass),
      feature_shapes(teacher_cfg, crop, crop)) if beta_feat > 0 else {}

  def init_params(key):
    ks, kt = jax.random.split(key)
    return {"student": s_task.init_params(ks),
            "teacher": t_task.init_params(kt), "proj": proj}

  def pretrained():
    return {"student": student_params, "teacher": teacher_params,
            "proj": proj}

  def loss_fn(params, batch, rng, step):
    ps = _freeze(params["student"], kd.frozen)
    tap_s = _Tap(kd.bypass)
    with nn.intercept_methods(tap_s):
      loss, metrics = s_task.loss_fn(ps, batch, rng, step)
    metrics = dict(metrics)
    if not need_teacher:
      return loss, metrics
    pt = params["teacher"]
    if not kd.teacher_trainable:
      pt = jax.lax.stop_gradient(pt)
    tap_t = _Tap()
    with nn.intercept_methods(tap_t):
      loss_t, aux_t = t_task.loss_fn(pt, batch, rng, step)
    metrics["kd/teacher_psnr"] = aux_t["train/psnr"]
    metrics["kd/student_rd"] = loss
    if kd.teacher_trainable:
      loss = loss + loss_t
      metrics["kd/teacher_rd"] = loss_t
    if beta_out > 0:
      xt = jax.lax.stop_gradient(tap_t.x_hat())
      out_mse = jnp.mean((tap_s.x_hat() - xt) ** 2)
      loss = loss + beta_out * 255.0**2 * out_mse
      metrics["kd/out_mse"] = out_mse
    if beta_feat > 0:
      ft = [jax.lax.stop_gradient(f) for f in tap_t.features()]
      feat = feature_loss(tap_s.features(), ft, params["proj"])
      loss = loss + beta_feat * feat
      metrics["kd/feat"] = feat
    return loss, metrics

  shapes = jax.eval_shape(init_params, jax.random.key(0))
  frozen = lambda k: any(k.startswith(p) for p in kd.frozen)
  lr_scales = {
      "student": _lr_tree(s_task.lr_scales, shapes["student"], frozen),
      "teacher": _lr_tree(t_task.lr_scales, shapes["teacher"],
                          lambda k: not kd.teacher_trainable),
      "proj": jax.tree.map(lambda _: 1.0, shapes["proj"]),
  }
  axes = jax.tree.map(lambda s: (None,) * s.ndim, shapes)
  meta = {"lambda": lam, "beta_out": beta_out, "beta_feat": beta_feat,
          "teacher_trainable": kd.teacher_trainable,
          "bypass": list(kd.bypass), "frozen": list(kd.frozen),
          "student": dataclasses.asdict(student_cfg),
          "teacher": dataclasses.asdict(teacher_cfg)}
  return trainer.Task(init_params, loss_fn, axes, s_task.batches,
                      lr_scales=lr_scales, meta=meta, pretrained=pretrained)


def retrain_config(kd: KDConfig, bypass: Sequence[str]) -> KDConfig:
  """Step (iii)'s settings: the pruned blocks cut, g_a and h_a frozen."""
  return dataclasses.replace(kd, bypass=tuple(bypass), frozen=ENCODER_SIDE)


# ------------------------------------------------ evaluation and pruning


def synthesize(cfg, params, y_hat, bypass: Sequence[str] = (), model=None
               ) -> jax.Array:
  """x̂ = g_s(ŷ) with the named blocks bypassed (a pruned student's decoder).
  """
  with nn.intercept_methods(_Tap(bypass)):
    return _model(cfg, model).apply({"params": params}, y_hat,
                                    method="synthesis")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_forward(model, bypass: tuple[str, ...], params, x_BHW3):
  with nn.intercept_methods(_Tap(bypass)):
    out = model.apply({"params": params}, x_BHW3)
  bits = -(jnp.sum(jnp.log2(out["y_lik"])) + jnp.sum(jnp.log2(out["z_lik"])))
  return out["x_hat"], bits


def rd_loss(cfg, params, x_BHW3, lam: float, bypass: Sequence[str] = (),
            model=None) -> dict:
  """Validation R-D loss λ·255²·MSE + bpp (test-time rounding, estimated
  rate) of a batch in [0, 1] whose sides are multiples of 64."""
  x = jnp.asarray(x_BHW3, jnp.float32)
  x_hat, bits = _eval_forward(_model(cfg, model), tuple(bypass), params, x)
  mse = float(jnp.mean((x_hat - x) ** 2))
  bpp = float(bits) / math.prod(x.shape[:3])
  return {"loss": lam * 255.0**2 * mse + bpp, "bpp": bpp, "mse": mse}


def prune_decoder(cfg, params, x_val, lam: float, keep_fraction: float = 0.5,
                  greedy: bool = False, model=None
                  ) -> tuple[tuple[str, ...], dict[str, float]]:
  """Step (iii): the synthesis blocks to bypass, cheapest first.

  Each bypassable block is scored by the rise of `rd_loss` on `x_val` when
  it alone is bypassed (one shot; `greedy=True` re-scores after each cut
  with the earlier cuts in place); the lowest scores are cut until
  floor(n · keep_fraction) blocks remain.

  Returns:
    (bypass names, {block: loss rise when cut}).
  """
  if not 0.0 <= keep_fraction <= 1.0:
    raise ValueError(f"{keep_fraction=} must lie in [0, 1]")
  blocks = synthesis_blocks(cfg, x_val.shape[1], x_val.shape[2], model)
  n_cut = len(blocks) - math.floor(len(blocks) * keep_fraction)
  loss = functools.partial(rd_loss, cfg, params, x_val, lam, model=model)
  cut: list[str] = []
  rises: dict[str, float] = {}
  base = loss(())["loss"]
  if greedy:
    for _ in range(n_cut):
      cur = loss(tuple(cut))["loss"]
      trial = {b: loss(tuple(cut) + (b,))["loss"] - cur
               for b in blocks if b not in cut}
      best = min(trial, key=trial.get)
      cut.append(best)
      rises[best] = trial[best]
  else:
    rises = {b: loss((b,))["loss"] - base for b in blocks}
    cut = sorted(blocks, key=rises.get)[:n_cut]
  order = [b for b in blocks if b in cut]  # Call order, for readability.
  return tuple(order), rises


def prune_params(params: Mapping, bypass: Sequence[str]) -> dict:
  """The parameter tree of a pruned student: bypassed stages removed."""
  unknown = [b for b in bypass if b not in params]
  if unknown:
    raise ValueError(f"bypass {unknown}: no such stage in the params (have"
                     f" {sorted(k for k in params if k.startswith('g_s'))})")
  return {k: v for k, v in params.items() if k not in set(bypass)}


def pruned_model(cfg, params, bypass: Sequence[str]):
  """(config, params) of the pruned student as a standalone model: the
  bypass is part of the config (and of the .jlic model id), the bypassed
  stages' weights are gone; `codec.Codec.from_params` writes real files."""
  bypass = tuple(b for b in SYNTHESIS_ORDER if b in set(bypass)) + tuple(
      b for b in bypass if b not in SYNTHESIS_ORDER)
  new_cfg = dataclasses.replace(
      cfg, synthesis_bypass=tuple(cfg.synthesis_bypass) + bypass)
  return new_cfg, prune_params(params, bypass)


def rd_point(cfg, params, images, bypass: Sequence[str] = (),
             model=None) -> dict:
  """(bpp, PSNR) of a model on uint8 RGB images, from the likelihoods
  (estimated rate, test-time rounding); images are edge-padded to multiples
  of 64, rate and PSNR use the unpadded size, PSNR is the mean of per-image
  PSNRs of the 8-bit reconstructions. Works for pruned students, which the
  bitstream codec does not know about (use `train.evaluate` for real
  bitstreams of unpruned models)."""
  if isinstance(images, Mapping):
    images = list(images.values())
  mod = _model(cfg, model)
  bpps, psnrs = [], []
  for img in images:
    img = np.asarray(img)
    h, w = img.shape[:2]
    x = np.pad(img, ((0, -h % 64), (0, -w % 64), (0, 0)), mode="edge")
    x = jnp.asarray(x[None].astype(np.float32) / 255.0)
    x_hat, bits = _eval_forward(mod, tuple(bypass), params, x)
    rec = np.clip(np.round(np.asarray(x_hat[0, :h, :w]) * 255.0), 0, 255)
    mse = float(np.mean((rec - img.astype(np.float64)) ** 2))
    bpps.append(float(bits) / (h * w))
    psnrs.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
  return {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs))}


def kd_bd_rate(teacher_points: Sequence[Mapping],
               student_points: Sequence[Mapping], method: str = "pchip"):
  """BD-rate loss of the student against the teacher (percent; positive =
  the student needs more bits), from one `rd_point` per λ and model.
  Needs `compression.bdrate` (imported here, when called)."""
  try:
    from jaxlib_models.compression import bdrate
  except ImportError as e:
    raise ImportError("kd_bd_rate needs jaxlib_models.compression.bdrate"
                      ) from e

  def curve(points):
    pts = sorted(points, key=lambda p: p["bpp"])
    return [p["bpp"] for p in pts], [p["psnr"] for p in pts]

  return bdrate.bd_rate(*curve(teacher_points), *curve(student_points),
                        method=method)


__all__ = ["ENCODER_SIDE", "KDConfig", "decoder_flops", "feature_loss",
           "feature_shapes", "init_student_from_teacher", "kd_bd_rate",
           "make_kd_task", "prune_decoder", "rd_loss", "rd_point",
           "retrain_config", "synthesis_blocks", "synthesize"]
