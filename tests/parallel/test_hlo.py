"""StableHLO collective parser: kinds, shapes, dtypes, groups and bytes.

Every expectation is written by hand from the program (ring model:
all-reduce 2(n-1)/n S, all-gather (n-1) S_local, reduce-scatter (n-1)/n S).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxlib_models.parallel import hlo

pytestmark = pytest.mark.usefixtures("fast_compile")

C = hlo.Collective


@pytest.fixture(scope="module")
def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.fixture(scope="module")
def mesh24():
  return jax.make_mesh((2, 4), ("node", "data"),
                       axis_types=(AxisType.Auto,) * 2)


def _lower(fn, mesh, x, spec):
  f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P(),
                            check_vma=False))
  return f.lower(x).as_text()


def test_psum_gather_scatter_on_eight_devices(mesh8):
  """Planted bugs caught: group size read from G instead of S in tensor<GxS>,
  the untiled all-gather's added unit dim dropped, reduce_scatter body types
  read as the operand."""

  def fn(x_1AB):
    x_AB = x_1AB[0]
    a = jax.lax.psum(x_AB, "data")
    g = jax.lax.all_gather(x_AB[:3, 0].astype(jnp.int8), "data")
    gt = jax.lax.all_gather(x_AB.reshape(-1), "data", tiled=True)
    s = jax.lax.psum_scatter(x_AB.reshape(-1), "data", tiled=True)
    m = jax.lax.pmax(jnp.max(x_AB), "data")
    return a.sum() + g.sum() + gt.sum() + s.sum() + m

  text = _lower(fn, mesh8, jnp.ones((8, 4, 6)), P("data"))
  got = hlo.collectives(text)
  assert got == [
      C("all_reduce", (4, 6), "f32", 8),
      C("all_gather", (1, 3), "i8", 8),
      C("all_gather", (24,), "f32", 8),
      C("reduce_scatter", (24,), "f32", 8),
      C("all_reduce", (), "f32", 8),
  ]
  expected = [2 * 7 / 8 * 96, 7 * 3, 7 * 96, 7 / 8 * 96, 2 * 7 / 8 * 4]
  np.testing.assert_allclose([c.bytes_on_wire for c in got], expected)
  assert hlo.wire_bytes(text) == round(sum(expected))
  assert not any(c.in_loop for c in got)


def test_sub_axis_groups_on_2x4_mesh(mesh24):
  """Group sizes 4 (data), 2 (node) and 8 (both) on one 2x4 mesh; planted bug
  caught: taking the number of groups (2 / 4) as the group size."""

  def fn(x):
    x_K = x[0, 0]
    a = jax.lax.psum(x_K, "data")
    b = jax.lax.psum(x_K.astype(jnp.bfloat16), "node")
    c = jax.lax.psum(x_K, ("node", "data"))
    s = jax.lax.psum_scatter(x_K, "data", tiled=True)
    g = jax.lax.all_gather(s, "data", tiled=True)
    return a.sum() + b.sum() + c.sum() + g.sum()

  text = _lower(fn, mesh24, jnp.ones((2, 4, 16)), P("node", "data"))
  got = hlo.collectives(text)
  assert got == [
      C("all_reduce", (16,), "f32", 4),
      C("all_reduce", (16,), "bf16", 2),  # Lowered text keeps bf16.
      C("all_reduce", (16,), "f32", 8),
      C("reduce_scatter", (16,), "f32", 4),
      C("all_gather", (4,), "f32", 4),
  ]
  expected = [2 * 3 / 4 * 64, 2 * 1 / 2 * 32, 2 * 7 / 8 * 64, 3 / 4 * 64,
              3 * 16]
  np.testing.assert_allclose([c.bytes_on_wire for c in got], expected)


def test_scan_body_marked_in_loop_and_variadic_psum(mesh8):
  """The all-reduce inside a scan sits in a called function of the while
  body: it must be flagged in_loop; a tuple psum gives one entry per
  operand."""

  def fn(x_1AB):
    x_AB = x_1AB[0]

    def body(c, _):
      return c + jax.lax.psum(x_AB, "data"), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(x_AB), None, length=3)
    a, b = jax.lax.psum((x_AB, x_AB[0]), "data")
    return acc.sum() + a.sum() + b.sum()

  got = hlo.collectives(_lower(fn, mesh8, jnp.ones((8, 4, 6)), P("data")))
  assert sorted(got, key=C.sort_key) == sorted(
      [C("all_reduce", (4, 6), "f32", 8)] * 2
      + [C("all_reduce", (6,), "f32", 8)],
      key=C.sort_key)
  assert [c.in_loop for c in got if c.shape == (4, 6)].count(True) == 1
  assert [c.in_loop for c in got if c.shape == (6,)] == [False]


def test_cond_branch_marked_in_branch(mesh8):
  """A psum under lax.cond sits in a case region; one outside does not."""

  def fn(x_1AB):
    x_AB = x_1AB[0]
    y_AB = jax.lax.cond(x_AB[0, 0] > 0, lambda v: jax.lax.psum(v, "data"),
                        lambda v: 2 * v, x_AB)
    return y_AB.sum() + jax.lax.psum(x_AB[0], "data").sum()

  got = hlo.collectives(_lower(fn, mesh8, jnp.ones((8, 4, 6)), P("data")))
  assert [(c.shape, c.in_branch, c.in_loop) for c in got] == [
      ((4, 6), True, False), ((6,), False, False)]


def test_all_to_all_and_permute(mesh8):

  def fn(x_1AB):
    x_AB = x_1AB[0]
    t = jax.lax.all_to_all(x_AB.reshape(8, 3), "data", 0, 0)
    pp = jax.lax.ppermute(x_AB, "data", [(i, (i + 1) % 8) for i in range(8)])
    return t.sum() + pp.sum()

  got = hlo.collectives(_lower(fn, mesh8, jnp.ones((8, 4, 6)), P("data")))
  assert got == [C("all_to_all", (8, 3), "f32", 8),
                 C("collective_permute", (4, 6), "f32", 8)]
  np.testing.assert_allclose([c.bytes_on_wire for c in got], [7 / 8 * 96, 96])


def test_hand_written_text():
  """Parser on fixed text (no jax): a variadic all-reduce with a reduction
  body whose scalar types must not be read as operands."""
  text = (
      """
  module @m attributes {mhlo.num_partitions = 4 : i32} {
    func.func public @main(%a: tensor<10xi8>, %b: tensor<3x2xf32>) {
      %0:2 = "stablehlo.all_reduce"(%a, %b) <{channel_handle ="""
      " #stablehlo.channel_handle<handle = 1, type = 1>, replica_groups ="
      " dense<[[0, 1], [2, 3]]> : tensor<2x2xi64>, use_global_device_ids}> ({"
      """
      ^bb0(%x: tensor<f32>, %y: tensor<f32>):
        %1 = stablehlo.add %x, %y : tensor<f32>
        stablehlo.return %1 : tensor<f32>
      }) : (tensor<10xi8>, tensor<3x2xf32>) -> (tensor<10xi8>, tensor<3x2xf32>)
      return
    }
  }
  """)
  got = hlo.collectives(text)
  assert got == [C("all_reduce", (10,), "i8", 2),
                 C("all_reduce", (3, 2), "f32", 2)]
  assert hlo.wire_bytes(text) == 10 + 24


def test_dtype_helpers_and_validation():
  assert hlo.dtype_name(jnp.bfloat16) == "bf16"
  assert hlo.dtype_name(np.int32) == "i32"
  names = ("f32", "bf16", "i8", "i1")
  assert [hlo.dtype_bytes(n) for n in names] == [4, 2, 1, 1]
  assert C("all_reduce", (5,), "f32", 1).bytes_on_wire == 0
  with pytest.raises(ValueError, match="kind"):
    C("broadcast", (1,), "f32", 2)
