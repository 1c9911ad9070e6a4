"""Encoder-side latent refinement: a better bitstream for the same decoder.

The analysis transforms g_a and h_a give amortized latents y = g_a(x),
z = h_a(y); an image's best latents under the model's own rate-distortion
objective are usually elsewhere (the amortization gap; Campos et al., CVPRW
2019, "Content adaptive optimization for neural image compression"; Yang,
Bamler and Mandt, NeurIPS 2020, "Improving inference for neural image
compression", arXiv 2006.04240). Refinement starts from g_a / h_a and takes
`steps` Adam steps on (y, z) against the training loss

    lambda * 255^2 * MSE(x_hat, x) + bpp(y) + bpp(z)

on the image's own pixels (the padding to a multiple of 64 carries no
distortion), with rounding relaxed one of two ways (`relax`):

  "sga" (default; the plain hyperprior and the checkerboard context):
    stochastic Gumbel annealing (Yang et al. sec. 3.2): y - mean is rounded
    down or up by a Gumbel-softmax sample whose logits are
    -atanh(distance) / tau, tau annealed from `tau0` by
    exp(-tau_decay * step / steps) down to `tau_min`; the same soft value
    feeds the rate and the synthesis. z: straight-through rounding around
    the bottleneck's medians. With the checkerboard context the soft
    anchors also feed the 5x5 context that gives the non-anchors' means
    and scales, as the decoded anchors do in the decoder (a mixture family
    rounds y itself, shift 0). The serial context has no SGA path.
  "noise" (any model, context models included): the training relaxation,
    uniform noise for the rates and straight-through rounding into the
    synthesis.

Only the encoder changes: the file format, the decoder and the decode time
are those of the plain codec, and every file still decodes bit-exactly.
The relaxed objective is not the one the coder pays, so after the last step
the refined latents are scored at test-time rounding (estimated bits plus
lambda * 255^2 * MSE of the 8-bit reconstruction) against the amortized
ones and the better pair is coded: refinement never makes an image's own
objective worse than the plain encoder's.

Measured on the shipped q1 model, crops of a held-out photo (objective
change, lower is better): noise 50 steps -2.6 % to +1.0 %, straight-through
on both rate and synthesis +4 % to +30 % (it stalls, as Yang et al. report),
SGA 50 steps at lr 0.01 -5.0 % to -7.0 %, 100 steps -6.0 % to -8.2 %.

Unknowns and defaults: the papers run thousands of steps on a GPU; we
default to 50 (lr 0.01): 68-75 s per held-out photo (0.28 megapixels on
average) on 2 shared CPU cores, against ~2 s for the plain encoder; the
noise keys are fixed per step, so encoding is deterministic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlib_models.compression import checkerboard, entropy

RELAXATIONS = ("sga", "noise")


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """lam: the lambda the model was trained with (its JSON records it);
  steps: Adam steps on (y, z); lr: Adam's learning rate; relax: "sga" or
  "noise" (module docstring); tau0, tau_decay, tau_min: SGA's temperature
  schedule; seed: the noise key."""

  lam: float
  steps: int = 50
  lr: float = 0.01
  relax: str = "sga"
  tau0: float = 0.5
  tau_decay: float = 5.0
  tau_min: float = 0.02
  seed: int = 0

  def __post_init__(self):
    if not self.lam > 0:
      raise ValueError(f"refinement needs the model's training lambda > 0,"
                       f" got lam={self.lam}")
    if self.steps < 1:
      raise ValueError(f"refinement steps must be >= 1, got {self.steps}")
    if not self.lr > 0:
      raise ValueError(f"refinement lr must be > 0, got {self.lr}")
    if self.relax not in RELAXATIONS:
      raise ValueError(f"unknown relaxation {self.relax!r}; choose one of "
                       f"{RELAXATIONS}")
    if not 0 < self.tau_min <= self.tau0:
      raise ValueError(f"need 0 < tau_min <= tau0, got tau_min="
                       f"{self.tau_min}, tau0={self.tau0}")


def _sga_round(y, shift, key, tau):
  """y - shift rounded down or up by a Gumbel-softmax sample (logits
  -atanh(distance) / tau), plus shift: SGA's soft rounding."""
  r = y - shift
  low = jnp.floor(r)
  d = r - low  # In [0, 1): the distance to rounding down.
  eps = 1e-5
  logits = jnp.stack([-jnp.arctanh(jnp.clip(d, 0.0, 1 - eps)),
                      -jnp.arctanh(jnp.clip(1 - d, eps, 1 - eps))]) / tau
  p_up = jax.nn.softmax(logits + jax.random.gumbel(key, logits.shape),
                        axis=0)[1]
  return low + p_up + shift


def _st_hyper(m, z):
  """(likelihood of z, h_s's (scales, means)) with z straight-through
  rounded around the bottleneck's medians."""
  sg = jax.lax.stop_gradient
  med = m.entropy_bottleneck.medians()
  z_t = z + sg(jnp.round(z - med) + med - z)
  return m.entropy_bottleneck.likelihood(z_t), m.hyper_synthesis(z_t)


def _sga_latents(m, y, z, key, tau):
  """(y_lik, z_lik, x_hat) with y soft-rounded by SGA, z straight-through;
  called through `apply(method=...)` on a plain hyperprior."""
  z_lik, (scales, means) = _st_hyper(m, z)
  y_t = _sga_round(y, means, key, tau)
  return (entropy.likelihood(y_t, means, scales, m.cfg.kind), z_lik,
          m.synthesis(y_t))


def _sga_checkerboard_latents(m, y, z, key, tau):
  """SGA through the checkerboard context: the anchors are soft-rounded
  around their means (0 for a mixture family, which codes round(y)), the
  non-anchors' parameters come from the soft anchors through the 5x5
  context, as the decoder computes them from the decoded anchors, and the
  non-anchors are soft-rounded around those."""
  z_lik, (scales, means) = _st_hyper(m, z)
  psi = jnp.concatenate([scales, means], -1)
  ctx = m.ckbd
  fa, fn, mm, k = (ctx.anchor_family, ctx.nonanchor_family, ctx.M, ctx.K)
  ka, kn = jax.random.split(key)

  def shift(prm, fam):
    return 0.0 if entropy.is_mixture(fam) else prm["means"]

  pa = entropy.split_params(ctx.anchor_raw(psi), fa, mm, k)
  ya = _sga_round(y, shift(pa, fa), ka, tau)
  pn = entropy.split_params(ctx.nonanchor_raw(psi, ya), fn, mm, k)
  yn = _sga_round(y, shift(pn, fn), kn, tau)
  h, w = y.shape[-3], y.shape[-2]
  amask = jnp.asarray(checkerboard.anchor_mask(h, w))[None, :, :, None]
  y_t = jnp.where(amask, ya, yn)
  lik = jnp.where(amask, entropy.family_likelihood(ya, pa, fa, k),
                  entropy.family_likelihood(yn, pn, fn, k))
  return lik, z_lik, m.synthesis(y_t)


def _noise_latents(m, y, z, key, tau):
  del tau
  out = m.from_latents(y, z, key, True)
  return out["y_lik"], out["z_lik"], out["x_hat"]


def _test_latents(m, y, z, key, tau):
  del key, tau
  out = m.from_latents(y, z, None, False)
  # What the decoder writes: 8-bit pixels.
  x_hat = jnp.round(jnp.clip(out["x_hat"], 0.0, 1.0) * 255.0) / 255.0
  return out["y_lik"], out["z_lik"], x_hat


_PATHS = {"sga": _sga_latents, "sga_checkerboard": _sga_checkerboard_latents,
          "noise": _noise_latents, "test": _test_latents}


def _objective(model, params, x, y, z, mask, lam, key=None, tau=None,
               path: str = "test"):
  """(lambda 255^2 MSE + bits / pixels, (bits, MSE)) over the mask."""
  y_lik, z_lik, x_hat = model.apply({"params": params}, y, z, key, tau,
                                    method=_PATHS[path])
  pixels = jnp.sum(mask)
  bits = -(jnp.sum(jnp.log2(y_lik)) + jnp.sum(jnp.log2(z_lik)))
  mse = jnp.sum(mask * (x_hat - x) ** 2) / (3.0 * pixels)
  return lam * 255.0**2 * mse + bits / pixels, (bits, mse)


def _fns(codec, cfg: RefineConfig):
  """The jitted refinement loop and scorer, cached on the codec."""
  key = dataclasses.replace(cfg, steps=1, seed=0)
  cache = codec.__dict__.setdefault("_refine_fns", {})
  if key not in cache:
    cache[key] = _build(codec.model, cfg)
  return cache[key]


def _build(model, cfg: RefineConfig):
  opt = optax.adam(cfg.lr)
  lam = cfg.lam

  path = cfg.relax
  if path == "sga" and model.cfg.context == "checkerboard":
    path = "sga_checkerboard"

  def loss(yz, params, x, mask, key, tau):
    return _objective(model, params, x, yz[0], yz[1], mask, lam, key, tau,
                      path)[0]

  @jax.jit
  def run(params, x, mask, y, z, key, steps):
    def body(i, carry):
      yz, st = carry
      frac = i.astype(jnp.float32) / steps
      tau = jnp.maximum(cfg.tau0 * jnp.exp(-cfg.tau_decay * frac),
                        cfg.tau_min)
      g = jax.grad(loss)(yz, params, x, mask, jax.random.fold_in(key, i),
                         tau)
      upd, st = opt.update(g, st, yz)
      return optax.apply_updates(yz, upd), st

    yz = (y, z)
    yz, _ = jax.lax.fori_loop(0, steps, body, (yz, opt.init(yz)))
    return yz

  @jax.jit
  def score(params, x, mask, y, z):
    return _objective(model, params, x, y, z, mask, lam)

  return run, score


def refine_latents(codec, x_1HW3, y, z, h: int, w: int, cfg: RefineConfig):
  """Refined (y, z) for the padded image x (1, H, W, 3) in [0, 1] whose
  top-left (h, w) is the image; returns (y, z, info) with info = dict of the
  test-time objective, bits and MSE before and after, and which was kept."""
  if cfg.relax == "sga" and codec.context not in ("none", "checkerboard"):
    raise ValueError(f"relax='sga' needs the plain hyperprior or the"
                     f" checkerboard context; this model's context is"
                     f" {codec.context!r}: use relax='noise'")
  run, score = _fns(codec, cfg)
  mask = np.zeros(x_1HW3.shape[:3] + (1,), np.float32)
  mask[:, :h, :w] = 1.0
  x = jnp.asarray(x_1HW3, jnp.float32)
  y0, z0 = jnp.asarray(y), jnp.asarray(z)
  y1, z1 = run(codec.params, x, mask, y0, z0, jax.random.key(cfg.seed),
               cfg.steps)
  (j0, (b0, m0)), (j1, (b1, m1)) = (score(codec.params, x, mask, y0, z0),
                                    score(codec.params, x, mask, y1, z1))
  kept = "refined" if float(j1) < float(j0) else "amortized"
  info = {"objective": (float(j0), float(j1)), "bits": (float(b0), float(b1)),
          "mse": (float(m0), float(m1)), "kept": kept}
  if kept == "amortized":
    return np.asarray(y0), np.asarray(z0), info
  return np.asarray(y1), np.asarray(z1), info
