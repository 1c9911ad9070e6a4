"""Tests for attention over own keys plus masked extra keys
(kernels/bank_attention).

The oracle is a float64 NumPy formula written here (independent of the
module); `reference.dense`, `reference.chunked` (the "xla" implementation) and
the Pallas kernel in interpret mode are each compared to it, and the kernel
also to `reference.dense` directly. `TestPallasGpu` reruns the kernel
compiled, on larger shapes (marked `gpu`, skipped without one); on a GPU
machine run

  JAX_PLATFORMS=cuda,cpu .venv/bin/python -m pytest \
      tests/kernels/test_bank_attention.py -m gpu

B: batch, N: queries, S: own keys, M: extra keys, C: width, H: heads.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlib_models.kernels import bank_attention as ba
from jaxlib_models.kernels.bank_attention import pallas_gpu, reference

# Max |error| relative to max(1, max |target|). float32: measured <= 4e-7
# on CPU (every implementation); 1e-5 as briefed. 16-bit inputs, compared
# with the float32 oracle on the same rounded inputs: measured 2.3e-3 (bf16)
# and 2.7e-4 (f16), mostly the rounding of the output; the kernel also casts
# the probabilities to the value dtype for the second dot (flash attention's
# rule). Bounds 1e-2 and 2e-3.
_TOL = {np.float32: 1e-5, jnp.bfloat16: 1e-2, np.float16: 2e-3}


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, flags, mask pattern, tile sizes."""

  name: str
  b: int = 2
  n: int = 21  # Queries: 3 blocks of 8, the last ragged.
  s: int = 19  # Own keys: ragged over blocks of 8.
  m: int | None = 13  # Extra keys (None: no extra); ragged.
  heads: int = 2
  k: int = 16  # Head dim.
  include_self: bool = True
  # "none": extra_valid=None; "random": ~half valid, plus slots 0..7 of
  # batch 0 invalid (a whole key block) and every slot of batch 1 invalid
  # (rows whose extra keys are all invalid); "vector": an (M,) mask.
  mask: str = "random"
  block_q: int = 8
  block_k: int = 8

  def data(self, dtype=np.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = self.heads * self.k
    arr = lambda t: (rng.standard_normal((self.b, t, c)) * 1.5).astype(dtype)
    q, ks, vs = arr(self.n), arr(self.s), arr(self.s)
    ke = ve = valid = None
    if self.m is not None:
      ke, ve = arr(self.m), arr(self.m)
      if self.mask == "random":
        valid = rng.random((self.b, self.m)) < 0.5
        valid[0, :8] = False
        valid[0, -1] = True
        valid[1:] = False
      elif self.mask == "vector":
        valid = np.arange(self.m) % 3 != 1
    return q, ks, vs, ke, ve, valid

  def kwargs(self):
    return dict(heads=self.heads, include_self=self.include_self)


def _oracle(q, ks, vs, ke, ve, valid, *, heads, include_self):
  """float64 NumPy: concatenate, mask, softmax; rows with no valid key -> 0."""
  b, n, c = q.shape
  split = lambda x: np.asarray(x, np.float64).reshape(
      x.shape[0], x.shape[1], heads, c // heads)
  keys, vals, masks = [], [], []
  if include_self:
    keys.append(split(ks))
    vals.append(split(vs))
    masks.append(np.ones((b, ks.shape[1]), bool))
  if ke is not None:
    keys.append(split(ke))
    vals.append(split(ve))
    masks.append(np.ones((b, ke.shape[1]), bool) if valid is None else
                 np.broadcast_to(valid, (b, ke.shape[1])))
  k, v, mask = (np.concatenate(x, axis=1) for x in (keys, vals, masks))
  logits = np.einsum("bnhk,blhk->bhnl", split(q), k) / np.sqrt(c // heads)
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  e = np.where(mask[:, None, None, :], np.exp(logits - np.where(
      np.isfinite(top), top, 0.0)), 0.0)
  tot = e.sum(-1, keepdims=True)
  p = e / np.where(tot > 0, tot, 1.0)
  return np.einsum("bhnl,blhk->bnhk", p, v).reshape(b, n, c)


def _jnp_oracle(q, ks, vs, ke, ve, valid, *, heads, include_self):
  """jnp version of _oracle for jax.grad (float32, HIGHEST precision)."""
  b, n, c = q.shape
  split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, c // heads)
  keys, vals, masks = [], [], []
  if include_self:
    keys += [split(ks)]
    vals += [split(vs)]
    masks.append(jnp.ones((b, ks.shape[1]), bool))
  if ke is not None:
    keys += [split(ke)]
    vals += [split(ve)]
    masks.append(jnp.broadcast_to(valid, (b, ke.shape[1])))
  k, v, mask = (jnp.concatenate(x, axis=1) for x in (keys, vals, masks))
  logits = jnp.einsum("bnhk,blhk->bhnl", split(q), k,
                      precision="highest") / np.sqrt(c // heads)
  logits = jnp.where(mask[:, None, None, :], logits, -1e9)
  # Rows with no valid key: zeros (the softmax alone would be uniform).
  p = jnp.where(mask[:, None, None, :], jax.nn.softmax(logits, axis=-1), 0.0)
  return jnp.einsum("bhnl,blhk->bnhk", p, v,
                    precision="highest").reshape(b, n, c)


def _err(got, want) -> float:
  got = np.asarray(got).astype(np.float64)  # bfloat16 via ml_dtypes.
  want = np.asarray(want).astype(np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.all(np.isfinite(got)), "non-finite values"
  return float(np.max(np.abs(got - want))) / max(1.0, float(
      np.max(np.abs(want))))


def _call(case, arrays, impl, interpret=True, **extra):
  q, ks, vs, ke, ve, valid = (None if a is None else jnp.asarray(a)
                              for a in arrays)
  if impl == "pallas":
    bs = ba.PallasBlockSizes(block_q=case.block_q, block_k=case.block_k)
  else:
    bs = ba.BlockSizes(block_k=case.block_k, block_q=case.block_q)
  return ba.bank_attention(q, ks, vs, ke, ve, extra_valid=valid,
                           implementation=impl, interpret=interpret,
                           block_sizes=bs, **case.kwargs(), **extra)


_CASES = (
    Case("self_extra_masked"),
    Case("extra_only_masked", include_self=False, mask="vector", heads=4,
         k=8),
    Case("self_only", m=None, mask="none", heads=3),
    Case("extra_only_unmasked", include_self=False, mask="none", s=5),
    # K = 40 (SD's first level) pads to 64 in the kernel.
    Case("head_dim_40", b=1, n=9, s=17, m=30, heads=2, k=40, block_q=16,
         block_k=16),
)
_BY_NAME = {c.name: c for c in _CASES}


@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
def test_forward_matches_oracle_float32(case, impl):
  """Every implementation equals the float64 oracle (float32, 1e-5); the
  kernel also equals reference.dense.

  Planted bugs caught (mutated copies, run once by hand): the extra mask
  dropped in the kernel / the chunked scan (self_extra_masked,
  extra_only_masked), own-key tail not masked (self_extra_masked: S = 19
  over blocks of 8), running sum not rescaled by alpha (every case),
  scale 1/sqrt(Kp) instead of 1/sqrt(K) (head_dim_40).
  """
  arrays = case.data(np.float32)
  out = _call(case, arrays, impl)
  assert out.dtype == jnp.float32 and out.shape == arrays[0].shape
  want = _oracle(*arrays, **case.kwargs())
  assert _err(out, want) <= 1e-5
  if impl == "pallas":
    dense = reference.dense(*(None if a is None else jnp.asarray(a)
                              for a in arrays[:5]),
                            extra_valid=arrays[5], **case.kwargs())
    assert _err(out, dense) <= 1e-5


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16],
                         ids=["bf16", "f16"])
def test_forward_16bit(impl, dtype):
  """16-bit inputs: output in the input dtype, close to the float32 oracle
  on the same (rounded) inputs."""
  case = _BY_NAME["self_extra_masked"]
  arrays = case.data(dtype, seed=4)
  out = _call(case, arrays, impl)
  assert out.dtype == dtype
  want = _oracle(*(None if a is None else np.asarray(a, np.float32)
                   if a.dtype != bool else a for a in arrays),
                 **case.kwargs())
  assert _err(out, want) <= _TOL[dtype]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_no_valid_key_gives_zeros(impl):
  """include_self=False with every extra slot of batch 1 invalid: batch 1
  gets zeros (not NaN), batch 0 is unaffected."""
  case = Case("dead_rows", include_self=False, n=9, m=20)
  arrays = case.data(np.float32)
  out = np.asarray(_call(case, arrays, impl))
  assert np.all(out[1] == 0.0)
  assert _err(out, _oracle(*arrays, **case.kwargs())) <= 1e-5


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_duplicate_kv_invariance(impl):
  """Extra keys equal to the own keys leave attention unchanged, with and
  without include_self (duplicating every key keeps the softmax), against
  plain attention over the own keys computed by the same implementation.

  A property test, independent of any oracle. Planted bug caught: the
  accumulator not rescaled between the own and the extra loop (the second
  loop then double-counts the first one's weights, include_self=True).
  """
  case = Case("dup", m=None, mask="none", s=21)
  q, ks, vs, _, _, _ = case.data(np.float32, seed=2)
  plain = _call(case, (q, ks, vs, None, None, None), impl)
  for include_self in (True, False):
    dup = _call(dataclasses.replace(case, include_self=include_self),
                (q, ks, vs, ks, vs, None), impl)
    assert _err(dup, plain) <= 1e-5, include_self


def _objective(op, c_BNC):
  def f(q, ks, vs, ke, ve):
    out = op(q, ks, vs, ke, ve)
    return jnp.sum(c_BNC * out) + 0.5 * jnp.sum(jnp.sin(out) * out)
  return f


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("include_self", [True, False], ids=["self", "noself"])
def test_grad_matches_autodiff_of_oracle(impl, include_self):
  """jax.grad through bank_attention's custom VJP (whichever forward ran)
  equals jax.grad of the jnp oracle, for q and all four key/value inputs.

  Planted bugs caught: cotangents returned in the wrong order (dk_self <->
  dk_extra), include_self not passed to the backward reference.
  """
  case = Case("grad", n=10, s=11, m=9, include_self=include_self)
  q, ks, vs, ke, ve, valid = (jnp.asarray(a) for a in case.data(np.float32,
                                                                 seed=5))
  c_BNC = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape),
                      jnp.float32)
  want = jax.grad(_objective(
      lambda *a: _jnp_oracle(*a, valid, **case.kwargs()), c_BNC),
                  argnums=(0, 1, 2, 3, 4))(q, ks, vs, ke, ve)
  got = jax.grad(_objective(
      lambda *a: _call(case, (*a, valid), impl), c_BNC),
                 argnums=(0, 1, 2, 3, 4))(q, ks, vs, ke, ve)
  for name, g, w in zip(("dq", "dk_self", "dv_self", "dk_extra", "dv_extra"),
                        got, want):
    assert g.dtype == jnp.float32, name
    if not include_self and name.endswith("_self"):
      assert np.all(np.asarray(g) == 0), name
    assert _err(g, w) <= 1e-4, name


def test_dispatcher_falls_back_and_refuses():
  """float64 is refused by the kernel (NotImplementedError); 'pallas' alone
  raises an ExceptionGroup holding it; ('pallas', 'xla') falls back. The
  compiled kernel refuses a CPU; head dims above 256 are refused."""
  case = Case("f64", m=None, mask="none")
  with jax.enable_x64(True):
    arrays = tuple(jnp.asarray(a, jnp.float64) for a in case.data()[:3])
    with pytest.raises(ExceptionGroup) as info:
      ba.bank_attention(*arrays, heads=2, implementation="pallas",
                        interpret=True)
    assert info.group_contains(NotImplementedError, match="float32/bfloat16")
    out = ba.bank_attention(*arrays, heads=2, implementation=("pallas", "xla"),
                            interpret=True)
    assert out.dtype == jnp.float64
    assert _err(out, _oracle(*arrays, None, None, None, heads=2,
                             include_self=True)) <= 1e-12
  q = jnp.ones((1, 4, 32), jnp.float32)
  with pytest.raises(NotImplementedError, match="needs a GPU"):
    pallas_gpu.forward(q, q, q, heads=2)
  q = jnp.ones((1, 4, 300), jnp.float32)
  with pytest.raises(NotImplementedError, match="head dims up to 256"):
    pallas_gpu.forward(q, q, q, heads=1, interpret=True)


_Q = np.ones((2, 5, 8), np.float32)
_E = np.ones((2, 7, 8), np.float32)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((_Q, _Q, _Q), dict(implementation="cuda"), "unknown implementation"),
        ((_Q, _Q, _Q), dict(implementation=("xla", "triton")),
         "unknown implementation"),
        ((_Q, _Q, _Q), dict(heads=3), r"C=8 .* heads=3"),
        ((_Q[0], _Q, _Q), {}, r"queries must be \(B, N, C\)"),
        ((_Q, _Q[:, :, :4], _Q[:, :, :4]), {}, r"own keys \(2, 5, 4\)"),
        ((_Q, _Q, _Q[:, :3]), {}, r"values \(2, 3, 8\)"),
        ((_Q, _Q, _Q, _E, _E[:1]), {}, r"extra keys \(2, 7, 8\) / values "
         r"\(1, 7, 8\)"),
        ((_Q, _Q, _Q, _E, _E), dict(extra_valid=np.ones((2, 6), bool)),
         r"extra_valid shape \(2, 6\)"),
        ((_Q, _Q, _Q), dict(extra_valid=np.ones(7, bool)),
         "extra_valid given without extra keys"),
        ((_Q, _Q, _Q), dict(include_self=False), "nothing to attend to"),
        ((_Q, _Q, _Q, _E[:, :0], _E[:, :0]), {}, "empty"),
    ],
    ids=["unknown", "unknown_in_list", "heads", "q_2d", "own_width",
         "own_v_shape", "extra_v_shape", "mask_shape", "mask_no_extra",
         "nothing", "empty_extra"],
)
def test_bad_inputs_raise_value_error(args, kwargs, message):
  """Bad inputs raise ValueError naming the shapes, before any kernel."""
  kwargs = {"heads": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    ba.bank_attention(*(jnp.asarray(a) for a in args), interpret=True,
                      **kwargs)


class _BackendIsGpu:
  """`jax` as pallas_gpu sees it, with default_backend() == 'gpu'."""

  def __getattr__(self, name):
    return getattr(jax, name)

  @staticmethod
  def default_backend():
    return "gpu"


@pytest.mark.parametrize("dtype,c,heads", [(jnp.float32, 320, 8),
                                           (jnp.bfloat16, 640, 8),
                                           (jnp.float16, 256, 2)],
                         ids=["f32_k40", "bf16_k80", "f16_k128"])
def test_pallas_lowers_to_triton_for_cuda(monkeypatch, dtype, c, heads):
  """The compiled kernel lowers for CUDA on this CPU machine to one Triton
  custom call named after the kernel (abstract shapes: N = 100 and S = 70
  ragged, M = 50 masked, padded head dims 64 / 128 / 128)."""
  monkeypatch.setattr(pallas_gpu, "jax", _BackendIsGpu())
  q = jax.ShapeDtypeStruct((2, 100, c), dtype)
  k = jax.ShapeDtypeStruct((2, 70, c), dtype)
  e = jax.ShapeDtypeStruct((2, 50, c), dtype)
  v = jax.ShapeDtypeStruct((2, 50), jnp.bool_)
  fwd = jax.jit(lambda q, k, e, v: pallas_gpu.forward(
      q, k, k, e, e, heads=heads, extra_valid=v))
  text = fwd.trace(q, k, e, v).lower(lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
  assert calls.count("__gpu$xla.gpu.triton") == 1, calls
  assert 'name = "bank_attention_fwd"' in text


def _largest_aval(closed_jaxpr) -> int:
  sizes = []

  def walk(jaxpr):
    for v in list(jaxpr.invars) + list(jaxpr.constvars):
      sizes.append(int(np.prod(v.aval.shape)))
    for eqn in jaxpr.eqns:
      sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return max(sizes)


def test_chunked_never_concatenates():
  """At SD-like sizes (B 4, N = S = M = 4096, C 320, H 8) the "xla" path
  holds no array as large as the concatenated keys nor any (N, S + M)
  logits: its largest arrays are the inputs and one (B, H, Q, T) block.
  reference.dense is the negative control. Abstract shapes only."""
  b, n, c, h = 4, 4096, 320, 8
  x = jax.ShapeDtypeStruct((b, n, c), jnp.float32)
  valid = jax.ShapeDtypeStruct((b, n), jnp.bool_)
  bs = ba.BlockSizes.get_default()
  fwd = jax.jit(lambda q, k, v, ke, ve, m: ba.bank_attention(
      q, k, v, ke, ve, heads=h, extra_valid=m))
  largest = _largest_aval(fwd.trace(x, x, x, x, x, valid).jaxpr)
  assert largest <= max(b * n * c, b * h * bs.block_q * bs.block_k), largest
  dense = jax.jit(lambda q, k, v, ke, ve, m: reference.dense(
      q, k, v, ke, ve, heads=h, extra_valid=m))
  assert _largest_aval(dense.trace(x, x, x, x, x, valid).jaxpr) >= (
      b * h * n * 2 * n)


@pytest.mark.gpu
class TestPallasGpu:
  """The compiled Triton kernel against reference.dense (a GPU only)."""

  @pytest.fixture(autouse=True)
  def _needs_gpu(self):
    if jax.default_backend() != "gpu":
      pytest.skip("needs a GPU; on a GPU machine run `JAX_PLATFORMS=cuda,cpu "
                  "pytest tests/kernels/test_bank_attention.py -m gpu`")

  @pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16],
                           ids=["f32", "bf16", "f16"])
  @pytest.mark.parametrize("case", [
      Case("sd_k40", b=2, n=1000, s=1000, m=777, heads=8, k=40,
           block_q=64, block_k=64),
      Case("noself_k64", b=2, n=300, s=300, m=1100, heads=4, k=64,
           include_self=False, mask="vector", block_q=64, block_k=64),
      Case("k160_self_only", b=1, n=256, s=333, m=None, mask="none",
           heads=2, k=160, block_q=32, block_k=32),
  ], ids=lambda c: c.name)
  def test_compiled_matches_reference(self, case, dtype):
    arrays = case.data(dtype, seed=7)
    out = _call(case, arrays, "pallas", interpret=False)
    assert out.dtype == dtype
    f32 = tuple(None if a is None else jnp.asarray(a, jnp.float32)
                if a.dtype != bool else jnp.asarray(a) for a in arrays)
    want = reference.dense(*f32[:5], extra_valid=f32[5], **case.kwargs())
    assert _err(out, want) <= _TOL[dtype]

  def test_compiled_grad(self):
    case = Case("grad", n=200, s=150, m=130, heads=2, k=64, block_q=32,
                block_k=32)
    q, ks, vs, ke, ve, valid = (jnp.asarray(a) for a in case.data(seed=8))
    c_BNC = jnp.ones_like(q)
    want = jax.grad(_objective(
        lambda *a: _jnp_oracle(*a, valid, **case.kwargs()), c_BNC),
                    argnums=(0, 3))(q, ks, vs, ke, ve)
    got = jax.grad(_objective(
        lambda *a: _call(case, (*a, valid), "pallas", interpret=False),
        c_BNC), argnums=(0, 3))(q, ks, vs, ke, ve)
    for g, w in zip(got, want):
      assert _err(g, w) <= 1e-4
