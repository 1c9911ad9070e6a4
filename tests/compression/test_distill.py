"""Three-step knowledge distillation (brief learned_image_compression.md §2.3,
§8 test 12): KD without its terms is plain student training bit for bit; the
distillation terms against an independent oracle (flax
capture_intermediates); decoder multiply-adds against the closed form;
pruning and decoding with bypassed blocks against a stage-by-stage decode;
the whole (ii) -> (iii) flow through the trainer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.compression import deform, distill, hyperprior, train
from jaxlib_models.core import metrics as metrics_lib
from jaxlib_models.core import trainer

pytestmark = pytest.mark.usefixtures("fast_compile")

LAM = 0.01
CROP = 64
TEACHER = hyperprior.HyperpriorConfig(N=8, M=12)


def _narrow(cfg, n):
  """A student with an n-channel decoder: N_dec where the config has it,
  else N (narrower hyper transforms too)."""
  if "N_dec" in {f.name for f in dataclasses.fields(cfg)}:
    return dataclasses.replace(cfg, N_dec=n)
  return dataclasses.replace(cfg, N=n)


STUDENT = _narrow(TEACHER, 4)


def _image():
  """A smooth synthetic 96x96 photo-like image (uint8)."""
  i, j = np.mgrid[0:96, 0:96] / 96.0
  img = np.stack([0.5 + 0.4 * np.sin(6 * i + 2 * j),
                  0.5 + 0.4 * np.cos(5 * j - 3 * i * j),
                  i * (1 - j) + 0.2 * np.sin(9 * i)], -1)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _params(cfg, seed):
  model = hyperprior.Hyperprior(cfg)
  return model.init(jax.random.key(seed), jnp.zeros((1, CROP, CROP, 3)))[
      "params"]


def _tc(**kw):
  return trainer.TrainConfig(num_steps=2, batch_size=8, log_every=1,
                             checkpoint_every=2, progress=False,
                             console=False, async_checkpoint=False, **kw)


def _run(task, tc, workdir):
  state = trainer.train(task, tc, workdir)
  hist = metrics_lib.read_metrics(workdir)
  return jax.device_get(state.params), hist


def test_kd_without_terms_is_plain_student_training(tmp_path):
  """β_out = β_feat = 0 with a frozen teacher: the same loss values and
  student params as `train.make_task` on the student from the same start,
  bit for bit; the teacher does not move. Fails if the KD task perturbs the
  student's rng, batches, learning rates or loss."""
  teacher = _params(TEACHER, 0)
  start, counts = distill.init_student_from_teacher(_params(STUDENT, 1),
                                                    teacher)
  assert counts["sliced"] > 0 and counts["kept"] == 0
  tc = _tc()
  plain = train.make_task(STUDENT, [_image()], LAM, tc, CROP)
  plain.pretrained = lambda: start
  p_plain, h_plain = _run(plain, tc, str(tmp_path / "plain"))
  kd = distill.KDConfig(beta_out=0.0, beta_feat=0.0, teacher_trainable=False)
  task = distill.make_kd_task(TEACHER, teacher, STUDENT, [_image()], LAM, tc,
                              CROP, kd, student_params=start)
  p_kd, h_kd = _run(task, tc, str(tmp_path / "kd"))
  assert [h["step"] for h in h_kd] == [1, 2]
  for a, b in zip(h_plain, h_kd, strict=True):
    for k in ("train/loss", "train/bpp", "train/mse"):
      assert a[k] == b[k], (k, a[k], b[k])
  jax.tree.map(np.testing.assert_array_equal, p_kd["student"], p_plain)
  jax.tree.map(np.testing.assert_array_equal, p_kd["teacher"], teacher)
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(a != b)), p_plain, start))
  assert any(moved)  # Training did something.


def _oracle_terms(cfg_s, ps, cfg_t, pt, x, rng):
  """(out MSE, feature MSE sum) from flax's own capture_intermediates: the
  IGDN outputs of g_s and x_hat, both models in training mode with the
  same rng (what the KD loss feeds them)."""

  def run(cfg, p):
    out, st = hyperprior.Hyperprior(cfg).apply(
        {"params": p}, x, rng, True, capture_intermediates=True,
        mutable=["intermediates"])
    inter = st["intermediates"]
    return out["x_hat"], [inter[f"g_s_igdn{i}"]["__call__"][0]
                          for i in range(3)]

  xs, fs = run(cfg_s, ps)
  xt, ft = run(cfg_t, pt)
  feat = sum(float(jnp.mean((a - b) ** 2)) for a, b in zip(fs, ft))
  return float(jnp.mean((xs - xt) ** 2)), feat


def test_distillation_terms():
  """Student = teacher: out and feature terms exactly 0. A perturbed
  same-width student: the terms equal the capture_intermediates oracle and
  the loss is R-D + β_out·255²·out + β_feat·feat with the default
  weights. Fails if the wrong stages are taken as features."""
  teacher = _params(TEACHER, 0)
  tc = _tc()
  task = distill.make_kd_task(TEACHER, teacher, TEACHER, [_image()], LAM,
                              tc, CROP, distill.KDConfig(
                                  teacher_trainable=False))
  batch = next(task.batches(0))
  rng = jax.random.key(5)
  params = task.pretrained()
  assert params["proj"] == {}
  _, m = task.loss_fn(params, batch, rng, 0)
  assert float(m["kd/feat"]) == 0.0 and float(m["kd/out_mse"]) == 0.0

  other = jax.tree.map(
      lambda p: p * 1.1 if p.ndim == 4 else p, teacher)
  params = dict(params, student=other)
  loss, m = task.loss_fn(params, batch, rng, 0)
  out, feat = _oracle_terms(TEACHER, other, TEACHER, teacher,
                            jnp.asarray(batch["x"]), rng)
  assert feat > 1e-6 and out > 1e-8
  np.testing.assert_allclose(float(m["kd/feat"]), feat, rtol=1e-5)
  np.testing.assert_allclose(float(m["kd/out_mse"]), out, rtol=1e-5)
  b_out, b_feat = distill.KDConfig().weights(LAM)  # default weights
  assert (b_out, b_feat) == (LAM, 0.1 * LAM * 255.0**2)
  want = (float(m["kd/student_rd"]) + b_out * 255.0**2 * out
          + b_feat * feat)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)

  # teacher_trainable: the teacher's gradient is that of its own R-D loss
  # (the distillation terms never reach it); frozen: exactly zero.
  joint = distill.make_kd_task(TEACHER, teacher, TEACHER, [_image()], LAM,
                               tc, CROP, distill.KDConfig(
                                   teacher_trainable=True))
  g = jax.jit(jax.grad(lambda p: joint.loss_fn(p, batch, rng, 0)[0]))(params)
  own = train.make_task(TEACHER, [_image()], LAM, tc, CROP)
  g_own = jax.jit(jax.grad(lambda p: own.loss_fn(p, batch, rng, 0)[0]))(
      teacher)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               g["teacher"], g_own)
  g = jax.jit(jax.grad(lambda p: task.loss_fn(p, batch, rng, 0)[0]))(params)
  assert not any(np.any(np.asarray(a)) for a in jax.tree.leaves(
      g["teacher"]))


def _closed_form_macs(n, m, h, w):
  """g_s of the mean-scale hyperprior: 4 transposed 5x5 convs (input
  pixels x 25 x C_in x C_out) and 3 IGDNs (C² per pixel)."""
  p = (h // 16) * (w // 16)
  deconv = 25 * (p * m * n + 4 * p * n * n + 16 * p * n * n + 64 * p * n * 3)
  igdn = (4 * p + 16 * p + 64 * p) * n * n
  return deconv + igdn, 64 * p * n * n


def test_decoder_flops():
  """Closed form for the teacher; a half-width decoder costs <= half; a
  bypassed IGDN removes exactly its C² per pixel."""
  cfg = hyperprior.HyperpriorConfig(N=16, M=24)
  full, igdn2 = _closed_form_macs(16, 24, 128, 192)
  assert distill.decoder_flops(cfg, 128, 192) == full
  assert distill.decoder_flops(_narrow(cfg, 8), 128, 192) <= full / 2
  assert (distill.decoder_flops(cfg, 128, 192, bypass=("g_s_igdn2",))
          == full - igdn2)


class _ToyCodec(nn.Module):
  """A decoder with a DRM and a 1x1 conv, for the multiply-add rules."""

  def setup(self):
    self.drm = deform.DeformResidualModule()
    self.out = nn.Conv(3, (1, 1))

  def analysis(self, x):
    return jnp.concatenate([x, x[..., :1]], -1)

  def synthesis(self, y):
    return self.out(self.drm(y))

  def __call__(self, x):
    return self.synthesis(self.analysis(x))


def test_decoder_flops_of_a_drm():
  """DRM = deformable conv (9·C·C taps + 5 per sample for bilinear weights
  and modulation, plus its 3x3 offset conv to 27 channels) + 3x3 conv; a
  bypassed DRM costs nothing and is the only bypassable block."""
  toy, pix, c = _ToyCodec(), 16 * 24, 4
  drm = pix * (9 * c * c + 9 * c * 5 + 9 * c * 27 + 9 * c * c)
  assert distill.decoder_flops(None, 16, 24, model=toy) == drm + pix * c * 3
  assert distill.decoder_flops(None, 16, 24, ("drm",), toy) == pix * c * 3
  assert distill.synthesis_blocks(None, 16, 24, toy) == ("drm",)


def test_pruning_and_bypassed_decoding():
  """synthesize() with a bypassed block equals a stage-by-stage decode that
  skips that layer (model.apply with method=); an IGDN made exactly the
  identity (beta 1, gamma 0) has a zero loss rise and is cut first; the cut
  blocks are those with the smallest rises, down to half."""
  params = _params(TEACHER, 3)
  params = dict(params, g_s_igdn1={"beta": jnp.ones(8),
                                   "gamma": jnp.zeros((8, 8))})
  model = hyperprior.Hyperprior(TEACHER)
  y = jax.random.normal(jax.random.key(0), (2, 4, 4, 12))

  def manual(skip):
    h = y
    for i in range(7):
      name = model.apply({"params": params}, method=lambda m, i=i:
                         m.g_s[i].name)
      if name != skip:
        h = model.apply({"params": params}, h,
                        method=lambda m, h, i=i: m.g_s[i](h))
    return h

  got = distill.synthesize(TEACHER, params, y, bypass=("g_s_igdn0",))
  np.testing.assert_allclose(got, manual("g_s_igdn0"), atol=1e-6)
  assert float(jnp.abs(got - manual(None)).max()) > 1e-4

  x = jnp.asarray(np.stack([_image()[:64, :64], _image()[32:, 32:]])
                  / 255.0, jnp.float32)
  cut, rises = distill.prune_decoder(TEACHER, params, x, LAM,
                                     keep_fraction=0.5)
  assert set(rises) == {"g_s_igdn0", "g_s_igdn1", "g_s_igdn2"}
  assert rises["g_s_igdn1"] == 0.0
  assert len(cut) == 2 and "g_s_igdn1" in cut
  assert sorted(cut, key=rises.get) == sorted(rises, key=rises.get)[:2]
  gcut, _ = distill.prune_decoder(TEACHER, params, x, LAM, greedy=True)
  assert len(gcut) == 2 and "g_s_igdn1" in gcut


# Smoke test of the three trainer runs (~80 s on 2 cores); the KD terms,
# pruning and bypassed decoding have their own default tests.
@pytest.mark.slow
def test_three_step_flow_with_trainer(tmp_path, capsys):
  """Smoke plus invariants: (ii) default KD of a narrower student trains 2
  steps (projections learned, teacher frozen); (iii) prune to half and
  retrain 2 steps with g_a and h_a frozen while g_s changes."""
  teacher = _params(TEACHER, 0)
  tc = _tc()
  task = distill.make_kd_task(TEACHER, teacher, STUDENT, [_image()], LAM,
                              tc, CROP, distill.KDConfig(
                                  teacher_trainable=False))
  start = task.pretrained()
  p, hist = _run(task, tc, str(tmp_path / "kd"))
  assert len(hist) == 2 and all(np.isfinite(h["kd/feat"]) for h in hist)
  _, hist = _run(task, dataclasses.replace(tc, num_steps=3),
                 str(tmp_path / "kd"))  # Resumes from the step-2 checkpoint.
  assert "resumed from step 2" in capsys.readouterr().out
  assert [h["step"] for h in hist] == [1, 2, 3]
  jax.tree.map(np.testing.assert_array_equal, p["teacher"], teacher)
  assert any(jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(a != b)), p["proj"], start["proj"])))

  student = p["student"]
  x = jnp.asarray(_image()[None, :64, :64] / 255.0, jnp.float32)
  cut, _ = distill.prune_decoder(STUDENT, student, x, LAM)
  assert len(cut) == 2
  kd3 = distill.retrain_config(distill.KDConfig(), cut)
  task3 = distill.make_kd_task(TEACHER, teacher, STUDENT, [_image()], LAM,
                               tc, CROP, kd3, student_params=student)
  p3, _ = _run(task3, tc, str(tmp_path / "retrain"))
  s3 = p3["student"]
  for k in student:
    same = all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), s3[k], student[k])))
    if k.startswith(("g_a", "h_a")):
      assert same, k
    elif k in ("g_s0", "g_s3", "h_s0"):
      assert not same, k
  full = distill.decoder_flops(TEACHER, 256, 256)
  assert distill.decoder_flops(STUDENT, 256, 256, bypass=cut) <= full / 2
  with pytest.raises(ValueError, match="not bypassable"):
    distill.make_kd_task(TEACHER, teacher, STUDENT, [_image()], LAM, tc,
                         CROP, distill.KDConfig(bypass=("g_s0",)))


def test_pruned_student_writes_real_bitstreams(tmp_path):
  """A pruned student (step iii) is a standalone model: its config carries
  the bypass (so its .jlic files have their own model id), its params lack
  the bypassed stages, its decoder equals the bypass-by-interceptor decode
  used in training, and compress/decompress round-trip bit-exactly."""
  from jaxlib_models.compression import codec
  params = _params(STUDENT, 5)
  bypass = ("g_s_igdn2", "g_s_igdn0")
  cfg_p, params_p = distill.pruned_model(STUDENT, params, bypass)
  assert cfg_p.synthesis_bypass == ("g_s_igdn0", "g_s_igdn2")
  assert not set(bypass) & set(params_p)
  y = jax.random.normal(jax.random.key(1), (1, 4, 4, 12))
  want = distill.synthesize(STUDENT, params, y, bypass=bypass)
  got = hyperprior.Hyperprior(cfg_p).apply({"params": params_p}, y,
                                           method="synthesis")
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert float(jnp.abs(got - distill.synthesize(STUDENT, params, y)).max()
               ) > 1e-4
  full = codec.Codec.from_params(STUDENT, params)
  pruned = codec.Codec.from_params(cfg_p, params_p)
  assert pruned.model_id != full.model_id
  img = _image()[:80, :72]
  blob, recon = codec.compress(pruned, img)
  np.testing.assert_array_equal(codec.decompress(pruned, blob), recon)
  assert codec.model_id_of(blob) == pruned.model_id
  with pytest.raises(codec.FormatError):
    codec.decompress(full, blob)  # another model id
  assert (distill.decoder_flops(cfg_p, 128, 128)
          < distill.decoder_flops(STUDENT, 128, 128))
  with pytest.raises(ValueError, match="bypassed stages"):
    codec.Codec.from_params(cfg_p, params)
  # Saved in the shipped-model format and loaded back by its config.
  from jaxlib_models.compression import pretrained, ship
  folder = tmp_path / "models"
  folder.mkdir()
  ship.save_model(str(folder / "hyperprior_lam0.01"), cfg_p, params_p,
                  {"note": "pruned student"})
  loaded = pretrained.load("hyperprior-q1", str(folder))
  assert loaded.model.cfg == cfg_p
  blob2, recon2 = codec.compress(loaded, img)
  np.testing.assert_array_equal(codec.decompress(loaded, blob2), recon2)
  with pytest.raises(ValueError, match="shape-preserving"):
    hyperprior.HyperpriorConfig(synthesis_bypass=("g_s0",))
