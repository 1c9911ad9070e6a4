"""Codec core: discretised likelihoods and real range coding (issue 6,
first part): normalisation, parity with scipy, bit-exact round trips, real
bits against the ideal rate, corrupt streams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlib_models.compression import coder, entropy


@pytest.mark.parametrize("kind", entropy.KINDS)
@pytest.mark.parametrize("scale", [0.11, 0.7, 5.0, 60.0])
def test_likelihood_sums_to_one_and_matches_scipy(kind, scale):
  """Sum over all integers is 1; each bin equals the scipy CDF difference
  (an independent oracle). Catches a swapped +-1/2 or a wrong scale."""
  with jax.enable_x64(True):
    v = jnp.arange(-4000, 4001, dtype=jnp.float64)
    p = np.asarray(entropy.likelihood(v + 0.3, 0.3, scale, kind))
  dist = {"gaussian": stats.norm, "laplace": stats.laplace,
          "logistic": stats.logistic}[kind](scale=scale)
  want = dist.cdf(np.arange(-4000, 4001) + 0.5) - dist.cdf(
      np.arange(-4000, 4001) - 0.5)
  np.testing.assert_allclose(p, np.maximum(want, entropy.P_MIN), rtol=1e-9,
                             atol=1e-15)
  big = want > 1e-6
  np.testing.assert_allclose(np.sum(want[big]), np.sum(p[big]), rtol=1e-12)
  assert abs(np.sum(np.where(want > entropy.P_MIN, p, 0)) - 1) < 1e-6


def test_far_tail_is_not_cancelled():
  """At 30 sigma the Gaussian bin is ~1e-197, not 0 from 1 - 1: the stable
  side is used (before the P_MIN floor)."""
  with jax.enable_x64(True):
    p = entropy._interval("gaussian", jnp.float64(30.0), 1.0)
  assert 0 < float(p) < 1e-190


def test_mixture_of_one_equals_component():
  with jax.enable_x64(True):
    y = jnp.linspace(-5, 5, 11)
    m = entropy.mixture_likelihood(y,
                                   jnp.zeros((11, 2)), jnp.ones((11, 2)),
                                   jnp.asarray([[0.0, -1e9]] * 11),
                                   ("laplace", "gaussian"))
    np.testing.assert_allclose(m, entropy.likelihood(y, 0.0, 1.0, "laplace"),
                               rtol=1e-12)
  with pytest.raises(ValueError, match="2 kinds for 3"):
    entropy.mixture_likelihood(y, jnp.zeros((11, 3)), jnp.ones((11, 3)),
                               jnp.zeros((11, 3)), ("laplace", "gaussian"))


def test_scale_index_rounds_up():
  table = entropy.default_scale_table()
  s = np.asarray([0.01, 0.11, 0.5, 3.3, 256.0, 1e4])
  idx = np.asarray(entropy.scale_index(s, table))
  assert idx[0] == 0 and idx[-1] == len(table) - 1
  assert np.all(table[idx[1:-1]] >= s[1:-1] * (1 - 1e-6))
  assert np.all(idx[1:-1] == 0) or np.all(table[np.maximum(idx[1:-1] - 1, 0)]
                                           < s[1:-1] + 1e-9)


@pytest.mark.parametrize("kind", entropy.KINDS)
def test_round_trip_is_bit_exact_and_rate_matches(kind):
  """decode(encode(q)) == q exactly, including escaped outliers; the real
  size is within 0.5 % of the ideal -sum log2 P under the same tables
  (issue 6 asks for 2 % at >= 0.1 bpp)."""
  table = coder.CodingTable.build(kind)
  rng = np.random.default_rng(0)
  n = 200_000
  idx = rng.integers(0, 50, n)
  q = np.round(rng.laplace(size=n) * table.scales[idx]).astype(np.int64)
  q[[3, 10, 99]] = [70_000, -123_456, 2**30]
  data = coder.encode(q.reshape(400, 500), idx.reshape(400, 500), table)
  out = coder.decode(data, idx.reshape(400, 500), table)
  np.testing.assert_array_equal(out, q.reshape(400, 500))
  ideal = table.ideal_bits(q, idx)
  assert abs(8 * len(data) - 12 * 8 - ideal) / ideal < 5e-3


def test_table_survives_save_and_load():
  table = coder.CodingTable.build("gaussian")
  again = coder.CodingTable.from_arrays(table.to_arrays())
  rng = np.random.default_rng(1)
  idx = rng.integers(0, 64, 5000)
  q = np.round(rng.normal(size=5000) * table.scales[idx]).astype(np.int64)
  data = coder.encode(q, idx, table)
  np.testing.assert_array_equal(coder.decode(data, idx, again), q)


def test_corrupt_truncated_and_foreign_streams_fail_clearly():
  table = coder.CodingTable.build("gaussian")
  idx = np.full(1000, 20)
  q = np.round(np.random.default_rng(2).normal(size=1000) * 3).astype(int)
  data = coder.encode(q, idx, table)
  with pytest.raises(coder.CorruptStream, match="truncated"):
    coder.decode(data[:-5], idx, table)
  bad = bytearray(data)
  bad[20] ^= 0xFF
  with pytest.raises(coder.CorruptStream, match="checksum"):
    coder.decode(bytes(bad), idx, table)
  with pytest.raises(coder.CorruptStream, match="shorter than"):
    coder.decode(b"JLIC", idx, table)
  with pytest.raises(ValueError, match="scale index out of range"):
    coder.encode(q, np.full(1000, 99), table)
  with pytest.raises(ValueError, match="unknown distribution"):
    coder.CodingTable.build("cauchy")


def test_encode_bytes_are_unchanged():
  """Golden regression: the stream of a fixed seeded input, hashed before
  the chunked StreamEncoder refactor (issue 6 context models). If this
  change is intended (a new stream layout), update the reference value and
  the .jlic format version."""
  import hashlib

  t = coder.CodingTable.build("gaussian")
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 64, 20000)
  q = np.round(rng.laplace(size=20000) * t.scales[idx]).astype(np.int64)
  digest = hashlib.sha256(coder.encode(q, idx, t)).hexdigest()
  assert digest[:16] == "6512b49a4dd8e493"


def test_chunked_stream_mixes_tables_and_mixtures():
  """One stream, several chunks under different models (scale-table groups
  and mixture rows), read back chunk by chunk exactly; reading a chunk with
  other parameters does not silently return the same symbols."""
  t = coder.CodingTable.build("laplace")
  grid = entropy.MixtureGrid()
  scales = entropy.default_scale_table()
  rng = np.random.default_rng(3)
  chunks = []
  enc = coder.StreamEncoder()
  for i in range(4):
    if i % 2 == 0:
      idx = rng.integers(0, 30, (5, 7))
      q = np.round(rng.laplace(size=(5, 7)) * t.scales[idx]).astype(int)
      q[0, 0] = 10**6  # Escaped.
      enc.table(q, idx, t)
      chunks.append(("t", q, idx))
    else:
      n = 40
      wq = rng.integers(1, 30, (n, 2))
      mq = rng.integers(-100, 100, (n, 2))
      sq = rng.integers(0, 30, (n, 2))
      q = np.round(mq[:, 0] / 16 + rng.normal(size=n) * 3).astype(int)
      enc.mixture(q, wq, mq, sq, ("gaussian", "gaussian"), scales, grid)
      chunks.append(("m", q, (wq, mq, sq)))
  data = enc.finish()
  dec = coder.StreamDecoder(data)
  for kind, q, prm in chunks:
    if kind == "t":
      np.testing.assert_array_equal(dec.table(prm, t), q)
    else:
      out = dec.mixture(*prm, ("gaussian", "gaussian"), scales, grid)
      np.testing.assert_array_equal(out, q)
  dec.finish()
  dec = coder.StreamDecoder(data)
  wrong = dec.table(chunks[0][2] + 5, t)
  assert not np.array_equal(wrong, chunks[0][1])
