"""ControlNetModel port vs diffusers 0.39.0 (PyTorch), tiny configs.

Parity tolerance: max abs diff <= 1e-4 in float32 (brief §8; observed
~1e-6). Weights travel through files (diffusers `save_pretrained` ->
safetensors -> numpy -> `convert.params_from_torch_state`). diffusers
zero-initialises the residual convs and the condition embedding's conv_out;
the tests randomise them, otherwise every residual is zero and a broken
encoder could not fail the parity test.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import controlnet as cn
from jaxlib_models.diffusion import convert, unet

pytestmark = pytest.mark.usefixtures("fast_compile")

BACKBONE = dict(block_out_channels=(32, 64), layers_per_block=1,
                cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
TINY_CN = dict(BACKBONE, conditioning_embedding_out_channels=(4, 8, 8, 16))
TINY_UNET = dict(BACKBONE, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
WEIGHTS = "diffusion_pytorch_model.safetensors"
ZERO_INIT = ("controlnet_down_blocks", "controlnet_mid_block",
             "controlnet_cond_embedding.conv_out")


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b)).max())


def _nchw(x):
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _nhwc(x):
  return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


def _load(folder):
  from safetensors.numpy import load_file
  with open(os.path.join(folder, "config.json")) as fh:
    d = json.load(fh)
  return d, load_file(os.path.join(folder, WEIGHTS))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """diffusers ControlNet (zero convs randomised) and UNet, saved and loaded
  back into our trees."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  t_cn = diffusers.ControlNetModel(**TINY_CN).eval()
  with torch.no_grad():
    for name, p in t_cn.named_parameters():
      if name.startswith(ZERO_INIT):
        assert not p.any(), name  # diffusers' zero init
        p.normal_(0.0, 0.2)
  t_unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
  out = {}
  for name, model in (("cn", t_cn), ("unet", t_unet)):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    out[name] = _load(folder)
  d, state = out["cn"]
  cn_cfg = cn.ControlNetConfig.from_diffusers_dict(d)
  cn_params = cn.controlnet_params_from_state(cn_cfg, state)
  d, ustate = out["unet"]
  u_cfg = unet.UNetConfig.from_diffusers_dict(d)
  u_params = unet.unet_params_from_state(u_cfg, ustate)
  return dict(torch=torch, diffusers=diffusers, t_cn=t_cn, t_unet=t_unet,
              cn_cfg=cn_cfg, cn_params=cn_params, cn_state=state,
              u_cfg=u_cfg, u_params=u_params)


def _inputs(h=16, w=16, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(2, 4, h, w).astype(np.float32)
  ctx = rng.randn(2, 7, 32).astype(np.float32)
  cond = rng.rand(2, 3, 8 * h, 8 * w).astype(np.float32)
  return x, np.array([999, 10]), ctx, cond


@functools.lru_cache
def _cn_fn(cfg, guess_mode):
  return jax.jit(lambda p, x, t, ctx, c, s: cn.ControlNetModel(cfg).apply(
      {"params": p}, x, t, ctx, c, s, guess_mode=guess_mode))


def _run_cn(cfg, params, x, t, ctx, cond, scale=1.0, guess_mode=False):
  return _cn_fn(cfg, guess_mode)(params, _nhwc(x), t, ctx, _nhwc(cond),
                                 scale)


@pytest.mark.oracle
@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_matches_diffusers(ref, guess_mode):
  torch = ref["torch"]
  x, t, ctx, cond = _inputs()
  with torch.no_grad():
    down_w, mid_w = ref["t_cn"](
        torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
        torch.tensor(cond), conditioning_scale=0.7, guess_mode=guess_mode,
        return_dict=False)
  cfg = ref["cn_cfg"]
  down, mid = _run_cn(cfg, ref["cn_params"], x, t, ctx, cond, 0.7,
                      guess_mode)
  assert len(down) == len(down_w) == cfg.num_down_residuals == 4
  for i, (a, b) in enumerate(zip(down, down_w)):
    assert _max_diff(_nchw(a), b.numpy()) <= 1e-4, i
    assert float(b.abs().max()) > 1e-2, i  # not trivially zero
  assert _max_diff(_nchw(mid), mid_w.numpy()) <= 1e-4


@pytest.mark.oracle
def test_residual_injection_matches_diffusers(ref):
  """diffusers UNet(diffusers residuals) == our UNet(our residuals), and the
  residuals visibly change the output."""
  torch = ref["torch"]
  x, t, ctx, cond = _inputs(seed=1)
  tx, tt, tctx = torch.tensor(x), torch.tensor(t), torch.tensor(ctx)
  with torch.no_grad():
    down_w, mid_w = ref["t_cn"](tx, tt, tctx, torch.tensor(cond),
                                return_dict=False)
    want = ref["t_unet"](tx, tt, tctx,
                         down_block_additional_residuals=down_w,
                         mid_block_additional_residual=mid_w).sample.numpy()
    plain = ref["t_unet"](tx, tt, tctx).sample.numpy()
  assert _max_diff(want, plain) > 1e-2
  down, mid = _run_cn(ref["cn_cfg"], ref["cn_params"], x, t, ctx, cond)
  u_cfg = ref["u_cfg"]
  got = jax.jit(lambda p, d, m: unet.UNet2DConditionModel(u_cfg).apply(
      {"params": p}, _nhwc(x), t, ctx, d, m))(ref["u_params"], down, mid)
  assert _max_diff(_nchw(got), want) <= 1e-4


@pytest.mark.oracle
def test_round_trip_and_conversion_errors(ref):
  params, state = ref["cn_params"], ref["cn_state"]
  back = convert.torch_state_from_params(params,
                                         literal=cn.CONTROLNET_LITERAL)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert "controlnet_cond_embedding.blocks.5.weight" in back
  cfg = ref["cn_cfg"]
  missing = {k: v for k, v in state.items()
             if k != "controlnet_mid_block.weight"}
  with pytest.raises(convert.ConversionError,
                     match=r"controlnet_mid_block\.weight"):
    cn.controlnet_params_from_state(cfg, missing)
  key = "controlnet_down_blocks.3.weight"
  bad = dict(state, **{key: state[key][:, :-1]})
  with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.")):
    cn.controlnet_params_from_state(cfg, bad)


@pytest.mark.oracle
def test_from_unet_matches_diffusers(ref):
  """Config and weights of diffusers' `ControlNetModel.from_unet`."""
  want = ref["diffusers"].ControlNetModel.from_unet(ref["t_unet"])
  d = dict(want.config)
  cfg = cn.ControlNetConfig.from_unet_config(ref["u_cfg"])
  assert cfg == cn.ControlNetConfig.from_diffusers_dict(d)
  init = cn.init_controlnet_params(cfg, jax.random.key(0))
  params = cn.controlnet_params_from_unet(ref["u_params"], init)
  got = convert.torch_state_from_params(params, literal=cn.CONTROLNET_LITERAL)
  for k, v in want.state_dict().items():
    if k.startswith(("conv_in", "time_embedding", "down_blocks",
                     "mid_block")) or k.startswith(ZERO_INIT):
      np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_config_parsing():
  d = dict(TINY_CN, _class_name="ControlNetModel", upcast_attention=False,
           num_attention_heads=4)
  cfg = cn.ControlNetConfig.from_diffusers_dict(d)
  # diffusers' ControlNet, unlike its UNet, accepts num_attention_heads.
  assert cfg.heads == (4, 4) and cfg.cond_downscale == 8
  assert cn.ControlNetConfig.from_diffusers_dict({}).cross_attention_dim == \
      1280
  for key, value in [("addition_embed_type", "text_time"),
                     ("class_embed_type", "timestep"),
                     ("encoder_hid_dim", 64), ("unknown_key", 0)]:
    with pytest.raises(ValueError, match=key):
      cn.ControlNetConfig.from_diffusers_dict(dict(d, **{key: value}))
  with pytest.raises(ValueError, match="bgr"):
    cn.ControlNetConfig(controlnet_conditioning_channel_order="brg")


def test_fresh_controlnet_is_a_no_op_and_bgr_flips_channels():
  """Zero-initialised residual convs: a fresh ControlNet leaves the UNet
  unchanged; "bgr" reverses the condition's channels; a condition of the
  wrong size raises."""
  ccfg = cn.ControlNetConfig(**TINY_CN)
  params = cn.init_controlnet_params(ccfg, jax.random.key(0))
  x, t, ctx, cond = _inputs(8, 8)
  down, mid = _run_cn(ccfg, params, x, t, ctx, cond)
  assert all(not np.asarray(r).any() for r in down + (mid,))
  ucfg = unet.UNetConfig(**TINY_UNET)
  uparams = unet.init_unet_params(ucfg, jax.random.key(1))
  model = unet.UNet2DConditionModel(ucfg)
  f = jax.jit(lambda d, m: model.apply({"params": uparams}, _nhwc(x), t, ctx,
                                       d, m))
  g = jax.jit(lambda: model.apply({"params": uparams}, _nhwc(x), t, ctx))
  np.testing.assert_allclose(f(down, mid), g(), atol=1e-6)

  # Randomise every leaf (zero convs too) to compare rgb with bgr.
  rng = np.random.RandomState(3)
  rnd = jax.tree.map(
      lambda l: 0.2 * rng.randn(*l.shape).astype(np.float32), params)
  bgr = cn.ControlNetConfig(**TINY_CN,
                            controlnet_conditioning_channel_order="bgr")
  a = _run_cn(ccfg, rnd, x, t, ctx, cond)
  b = _run_cn(bgr, rnd, x, t, ctx, cond[:, ::-1])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), a, b)
  assert _max_diff(a[1], _run_cn(bgr, rnd, x, t, ctx, cond)[1]) > 1e-4
  with pytest.raises(ValueError, match="8x the latent size"):
    cn.ControlNetModel(ccfg).apply({"params": params}, _nhwc(x), t, ctx,
                                   _nhwc(cond[:, :, :32]))
