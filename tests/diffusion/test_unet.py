"""UNet2DConditionModel port vs diffusers 0.39.0 (PyTorch), tiny configs.

Parity tolerance: max abs diff <= 1e-4 in float32 (UNet-sized graphs,
brief §8; observed ~1e-6 on these tiny configs). Weights always travel
through files: diffusers `save_pretrained` (safetensors) -> numpy ->
`convert.params_from_torch_state` into our abstract tree. The public API is
NHWC; the tests transpose to and from diffusers' NCHW at the boundary.

Planted-bug checks done while writing these tests (each made a test fail;
max abs diff in brackets): flip_sin_to_cos ignored (0.20), Downsample2D
padded (0, 1) or 'SAME' instead of (1, 1) (0.97), heads read as the head
width (0.06), skips consumed in the wrong order (shape error); in the
block-level test at 1e-5: resnet GroupNorm eps 1e-6 (0.035), transformer
GroupNorm eps 1e-5 (0.056), tanh GELU in GEGLU (3.8e-5). The whole-UNet
test at 1e-4 alone misses the last three (7e-5, 1.7e-5, 4e-5), hence the
block-level test with small inputs. A LayerNorm eps 1e-6 gives only
1.1e-5 there: not reliably caught.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.diffusion import convert, unet
from jaxlib_models.diffusion.attention import SelfAttnHooks

pytestmark = pytest.mark.usefixtures("fast_compile")

# Tiny SD-like diffusers config: 2 blocks (cross-attn + plain), 8 heads of
# width 4, context width 32.
TINY = dict(block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            sample_size=16)
VARIANTS = {
    "4ch": {},
    # InstructPix2Pix: latent ++ image latent.
    "8ch": dict(in_channels=8),
    # SD 2 style: Dense proj_in/out, per-block heads (2, 4), 2 resnets.
    "linear": dict(use_linear_projection=True, attention_head_dim=(2, 4),
                   layers_per_block=2),
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b)).max())


def _nchw(x):
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def _nhwc(x):
  return jnp.transpose(jnp.asarray(x), (0, 2, 3, 1))


def _reference(tmp_path, **overrides):
  """A random diffusers UNet saved to tmp_path; returns it, our config and
  params loaded from its folder."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from safetensors.numpy import load_file
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(**dict(TINY, **overrides)).eval()
  ref.save_pretrained(tmp_path)
  with open(os.path.join(tmp_path, "config.json")) as fh:
    cfg = unet.UNetConfig.from_diffusers_dict(json.load(fh))
  state = load_file(os.path.join(tmp_path, WEIGHTS))
  params = unet.unet_params_from_state(cfg, state, source=str(tmp_path))
  return ref, cfg, params, state


def _inputs(cfg, h=16, w=16, b=2, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(b, cfg.in_channels, h, w).astype(np.float32)
  ctx = rng.randn(b, 7, cfg.cross_attention_dim).astype(np.float32)
  return x, np.array([999, 10][:b]), ctx


def _apply(cfg, params, x_nchw, t, ctx, hooks=None, **kw):
  model = unet.UNet2DConditionModel(cfg, **({} if hooks is None
                                            else dict(hooks=hooks)))
  return model.apply({"params": params}, _nhwc(x_nchw), t, ctx, **kw)


@pytest.mark.oracle
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unet_matches_diffusers(tmp_path, variant):
  """4 / 8 input channels and linear projection; 4ch also at an odd size
  (diffusers' forward_upsample_size path)."""
  torch = pytest.importorskip("torch")
  ref, cfg, params, _ = _reference(tmp_path, **VARIANTS[variant])
  # 4ch also runs an odd size with a scalar timestep (broadcast to B).
  sizes = [(16, 16), (13, 11)] if variant == "4ch" else [(16, 16)]
  for h, w in sizes:
    x, t, ctx = _inputs(cfg, h, w)
    if h == 13:
      t = 321
    with torch.no_grad():
      want = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample
    got = jax.jit(lambda p, x, t, c: _apply(cfg, p, x, t, c))(
        params, x, t, ctx)
    assert got.shape == (2, h, w, 4) and got.dtype == jnp.float32
    assert _max_diff(_nchw(got), want.numpy()) <= 1e-4, (h, w)
  if variant == "linear":
    assert cfg.heads == (2, 4) and cfg.layers == (2, 2)
    assert params["down_blocks_0"]["attentions_0"]["proj_in"][
        "kernel"].shape == (32, 32)


@pytest.mark.oracle
def test_unet_cpu_fast_paths_match_diffusers(tmp_path, monkeypatch):
  """The whole UNet with every CPU route of `unet_blocks.Conv2D` forced on
  at tiny sizes (channel chunks of 16, sub-pixel upsampling from 1 pixel,
  no im2col) still matches diffusers."""
  torch = pytest.importorskip("torch")
  from jaxlib_models.diffusion import unet_blocks
  monkeypatch.setattr(unet_blocks, "SPLIT_CHUNKS", (16, 16))
  monkeypatch.setattr(unet_blocks, "SUBPIXEL_MIN_PIXELS", 1)
  monkeypatch.setattr(unet_blocks, "IM2COL_MAX_PIXELS", 0)
  ref, cfg, params, _ = _reference(tmp_path)
  x, t, ctx = _inputs(cfg, 16, 16)
  with torch.no_grad():
    want = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample
  got = jax.jit(lambda p, x, t, c: _apply(cfg, p, x, t, c))(params, x, t, ctx)
  assert _max_diff(_nchw(got), want.numpy()) <= 1e-4


@pytest.mark.parametrize("tile", ["auto", 2])
def test_unet_winograd_params_match_diffusers(tmp_path, tile):
  """The whole UNet from Winograd-prepared parameters (every stride-1 3x3
  convolution on the Winograd route) still matches diffusers."""
  torch = pytest.importorskip("torch")
  from jaxlib_models.diffusion import winograd
  ref, cfg, params, _ = _reference(tmp_path)
  prepared = winograd.prepare_params(params, tile)
  # conv_in, conv_out and two 3x3 convolutions per resnet; not the samplers.
  resnets = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(
      params)[0] if "conv1" in str(path) and "kernel" in str(path))
  assert winograd.prepared_count(prepared) == 2 + 2 * resnets
  x, t, ctx = _inputs(cfg, 16, 24)
  with torch.no_grad():
    want = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample
  got = jax.jit(lambda p, x, t, c: _apply(cfg, p, x, t, c))(prepared, x, t,
                                                             ctx)
  assert _max_diff(_nchw(got), want.numpy()) <= 1e-4


def _block_params(module, abstract):
  state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
  return convert.params_from_torch_state(state.__getitem__, state.keys(),
                                         abstract)


@pytest.mark.oracle
@pytest.mark.parametrize("block", ["resnet", "transformer"])
def test_blocks_match_diffusers_on_small_inputs(block):
  """Block-level parity at 1e-5 with inputs of std 0.01, where the norm
  epsilons matter (1e-5 vs 1e-6 moves the output by ~1e-2) and so does
  exact vs tanh GELU in GEGLU."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from diffusers.models.resnet import ResnetBlock2D
  from diffusers.models.transformers.transformer_2d import Transformer2DModel

  from jaxlib_models.diffusion import unet_blocks
  torch.manual_seed(0)
  rng = np.random.RandomState(0)
  x = 0.01 * rng.randn(2, 16, 6, 5).astype(np.float32)
  if block == "resnet":
    ref = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=24,
                        groups=8, eps=1e-5).eval()
    other = rng.randn(2, 24).astype(np.float32)
    ours = unet_blocks.ResnetBlock2D(32, groups=8, eps=1e-5)
  else:
    ref = Transformer2DModel(num_attention_heads=2, attention_head_dim=8,
                             in_channels=16, norm_num_groups=8,
                             cross_attention_dim=12).eval()
    other = rng.randn(2, 5, 12).astype(np.float32)
    ours = unet_blocks.Transformer2DModel(
        2, 8, common=unet_blocks.BlockCommon(groups=8))
  with torch.no_grad():
    if block == "resnet":
      want = ref(torch.tensor(x), torch.tensor(other))
    else:
      want = ref(torch.tensor(x), encoder_hidden_states=torch.tensor(
          other)).sample
  abstract = jax.eval_shape(ours.init, jax.random.key(0), _nhwc(x),
                            other)["params"]
  params = _block_params(ref, abstract)
  got = ours.apply({"params": params}, _nhwc(x), other)
  assert _max_diff(_nchw(got), want.numpy()) <= 1e-5


@pytest.mark.oracle
def test_round_trip_keys_and_values(tmp_path):
  """diffusers keys -> our tree -> torch keys: identity on keys and values
  (needs UNET_LITERAL for time_embedding.linear_1/2)."""
  _, _, params, state = _reference(tmp_path)
  back = convert.torch_state_from_params(params, literal=unet.UNET_LITERAL)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert "time_embedding.linear_1.weight" in back
  assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" \
      ".weight" in back


@pytest.mark.oracle
def test_sd15_tree_matches_diffusers_keys_and_shapes():
  """Full SD 1.5 architecture: same keys and shapes as diffusers' (built on
  the meta device), 859,520,964 parameters, 16 self-attention layers."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = unet.sd15_unet_config()
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(cross_attention_dim=768)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  abstract = unet.abstract_unet_params(cfg)
  got = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = [str(p.key) for p in path]
    shape = tuple(leaf.shape)
    if names[-1] == "kernel":
      shape = shape[::-1] if len(shape) == 2 else shape[::-1][:2] + shape[:2]
    got[convert.path_to_torch_key(names, unet.UNET_LITERAL)] = shape
    assert leaf.dtype == jnp.float32
  assert got == want
  assert sum(int(np.prod(s)) for s in got.values()) == 859_520_964
  assert cfg.num_self_attention_layers == 16


SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
    "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}


def test_config_from_diffusers_dict():
  assert unet.UNetConfig.from_diffusers_dict(SD15_CONFIG) == \
      unet.sd15_unet_config()
  ip2p = unet.UNetConfig.from_diffusers_dict(dict(SD15_CONFIG, in_channels=8),
                                             dtype="bfloat16")
  assert ip2p.in_channels == 8 and ip2p.dtype == "bfloat16"
  # Absent keys take diffusers' defaults, not SD 1.5's.
  assert unet.UNetConfig.from_diffusers_dict({}).cross_attention_dim == 1280
  sd2 = unet.UNetConfig.from_diffusers_dict(dict(
      SD15_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
      use_linear_projection=True, upcast_attention=True))
  assert sd2.heads == (5, 10, 20, 20) and sd2.use_linear_projection
  for key, value in [("class_embed_type", "timestep"),
                     ("time_cond_proj_dim", 256),
                     ("addition_embed_type", "text_time"),
                     ("resnet_time_scale_shift", "scale_shift"),
                     ("only_cross_attention", [True, False, False, False]),
                     ("act_fn", "gelu"), ("num_attention_heads", 8),
                     ("some_future_key", 1)]:
    with pytest.raises(ValueError, match=key):
      unet.UNetConfig.from_diffusers_dict(dict(SD15_CONFIG, **{key: value}),
                                          source="cfg.json")
  with pytest.raises(ValueError, match="up_block_types"):
    unet.UNetConfig(up_block_types=("UpBlock2D",))
  with pytest.raises(ValueError, match="AttnDownBlock2D"):
    unet.UNetConfig(down_block_types=("AttnDownBlock2D",) * 4)
  with pytest.raises(ValueError, match="attention heads"):
    unet.UNetConfig(attention_head_dim=(8, 8))
  with pytest.raises(ValueError, match="norm_num_groups"):
    unet.UNetConfig(block_out_channels=(32, 48, 64, 64), norm_num_groups=32)


def _tiny_cfg(**kw):
  d = dict(TINY)
  d.pop("sample_size")
  return unet.UNetConfig(**dict(d, **kw))


@pytest.fixture(scope="module")
def tiny():
  cfg = _tiny_cfg()
  return cfg, unet.init_unet_params(cfg, jax.random.key(0))


def test_random_init_is_deterministic_and_scaled(tiny):
  cfg, params = tiny
  again = unet.init_unet_params(cfg, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  k = np.asarray(params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])
  assert k.shape == (3, 3, 32, 32) and 0.5 < k.std() * np.sqrt(288) < 1.5
  assert not np.asarray(params["conv_out"]["bias"]).any()
  np.testing.assert_array_equal(params["conv_norm_out"]["scale"], 1.0)


def test_conversion_errors_name_the_tensor(tiny):
  cfg, params = tiny
  state = convert.torch_state_from_params(params, literal=unet.UNET_LITERAL)
  again = unet.unet_params_from_state(cfg, state)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))
  key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  bad = dict(state)
  bad[key] = bad[key][:, :-1]
  with pytest.raises(convert.ConversionError, match=key.replace(".", r"\.")):
    unet.unet_params_from_state(cfg, bad)
  missing = {k: v for k, v in state.items()
             if k != "time_embedding.linear_2.bias"}
  with pytest.raises(convert.ConversionError, match="linear_2.bias"):
    unet.unet_params_from_state(cfg, missing)
  with pytest.raises(convert.ConversionError, match="unexpected"):
    unet.unet_params_from_state(cfg, dict(state, **{"extra.w": state[key]}))


def _capture_to_extra(tree, fn):
  """{..: {attn1: {k, v, o}}} -> the same nesting with fn(k, v, o)."""
  if set(tree) == {"k", "v", "o"}:
    return fn(tree["k"], tree["v"], tree["o"])
  return {name: _capture_to_extra(sub, fn) for name, sub in tree.items()}


def _attn1_paths(tree, prefix=()):
  if set(tree) == {"k", "v", "o"}:
    return [prefix]
  return [p for n, s in tree.items() for p in _attn1_paths(s, prefix + (n,))]


def test_self_attention_hooks_capture_and_duplicate_kv(tiny):
  """capture yields one k/v/o per attn1 (none for attn2); feeding the
  captured k/v back as extra keys (include_self) changes nothing
  (duplicate-KV invariance) while random extra k/v do change the output;
  fuse_paths matches the top-level block name."""
  cfg, params = tiny
  # attn1 count: down block 0 has 1, mid 1, up block 1 has 1 + 1 = 2.
  assert cfg.num_self_attention_layers == 4
  x, t, ctx = _inputs(cfg, 8, 8)
  run = jax.jit(lambda variables, hooks: unet.UNet2DConditionModel(
      cfg, hooks).apply(variables, _nhwc(x), t, ctx,
                        mutable=["attn_capture"] if hooks.capture else False),
                static_argnums=1)
  # Capturing leaves the output alone (Attention's own contract), so the
  # capturing run doubles as the plain one.
  plain, cap = run({"params": params}, SelfAttnHooks(capture=True))
  paths = _attn1_paths(cap["attn_capture"])
  assert len(paths) == 4 and all(p[-1] == "attn1" for p in paths)
  assert {p[0] for p in paths} == {"down_blocks_0", "mid_block",
                                   "up_blocks_1"}

  ones = lambda k: jnp.ones(k.shape[:2], bool)
  same = _capture_to_extra(cap["attn_capture"], lambda k, v, o: dict(
      k=k, v=v, valid=ones(k), o=o))
  ext = SelfAttnHooks(extra=True, include_self=True)
  dup = run({"params": params, "attn_extra": same}, ext)
  assert _max_diff(dup, plain) <= 1e-4

  keys = iter(jax.random.split(jax.random.key(2), 64))
  rand = _capture_to_extra(cap["attn_capture"], lambda k, v, o: dict(
      k=jax.random.normal(next(keys), k.shape),
      v=jax.random.normal(next(keys), v.shape), valid=ones(k),
      o=jax.random.normal(next(keys), o.shape)))
  other = run({"params": params, "attn_extra": rand}, ext)
  assert _max_diff(other, plain) > 1e-3

  # Fusing the mid block's outputs with random bank outputs (threshold -1:
  # always take the match) changes the result: the block is named
  # `mid_block` at the top of the module path.
  fuse = SelfAttnHooks(extra=True, fuse_paths=("mid_block",),
                       fuse_threshold=-1.0, fuse_strength=1.0)
  fused = run({"params": params, "attn_extra": rand}, fuse)
  assert _max_diff(fused, other) > 1e-3


def test_residual_arguments_are_checked(tiny):
  cfg, params = tiny
  x, t, ctx = _inputs(cfg, 8, 8, b=1)
  with pytest.raises(ValueError, match="pairs"):
    _apply(cfg, params, x, t, ctx, down_block_additional_residuals=())
  mid = jnp.zeros((1, 4, 4, 64))
  with pytest.raises(ValueError, match="3 down residuals for 4"):
    _apply(cfg, params, x, t, ctx, mid_block_additional_residual=mid,
           down_block_additional_residuals=(jnp.zeros((1, 8, 8, 32)),) * 3)
  with pytest.raises(ValueError, match="NHWC"):
    _apply(cfg, params, np.zeros((1, 3, 8, 8)), t, ctx)


def test_bfloat16_compute_keeps_float32_params(tiny):
  """Mixed precision: same float32 params, bf16 compute within a loose
  tolerance of float32."""
  cfg, params = tiny
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  x, t, ctx = _inputs(cfg, 8, 8)
  f32 = jax.jit(lambda p: _apply(cfg, p, x, t, ctx))(params)
  bcfg = _tiny_cfg(dtype="bfloat16")
  bf16 = jax.jit(lambda p: _apply(bcfg, p, x, t, ctx))(params)
  assert bf16.dtype == jnp.bfloat16
  scale = float(np.abs(np.asarray(f32)).max())
  assert _max_diff(bf16, f32) <= 0.05 * scale
