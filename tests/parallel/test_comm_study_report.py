"""The convergence study's horizon-free column: steps the exact run needed
to reach a compressed run's final training loss."""

from benchmarks import comm_study


def test_steps_to_match_reads_the_smoothed_curves():
  base = [(s, 10.0 - s / 10) for s in range(10, 110, 10)]  # 9.0 ... 0.0
  slower = [(s, 10.0 - s / 20) for s in range(10, 110, 10)]  # ... 5.0
  # Window 1: slower's final 5.0; exact reaches 5.0 at step 50.
  assert comm_study.steps_to_match(base, slower, window=1) == 50
  # Window 3: slower's final mean (6.0 + 5.5 + 5.0) / 3 = 5.5; exact's
  # moving mean is 6.0 at step 50 (7, 6, 5) and 5.0 at step 60 (6, 5, 4).
  assert comm_study.steps_to_match(base, slower, window=3) == 60
  assert comm_study.steps_to_match(base, base, window=1) == 100
  never = [(10, -1.0)]
  assert comm_study.steps_to_match(base, never, window=1) is None
  assert comm_study.steps_to_match([], slower) is None


def test_byte_counts_include_the_exact_start_steps():
  """start_iter's exact steps are averaged into the per-step bytes: with one
  exact step in 300, payload = (299 x top-k + 1 x exact) / 300 (planted: the
  exact steps left out, which would report 49.6x instead of 42.7x)."""
  counts = {}
  for name in ("none", "topk", "topk_ef21"):
    c = comm_study.make_config(300, comm_study.VARIANTS[name][1])
    counts[name] = comm_study.byte_counts(c)["payload_per_step"]
  want = (299 * counts["topk"] + counts["none"]) / 300
  assert abs(counts["topk_ef21"] - want) < 1e-6 * want
  assert counts["topk_ef21"] > counts["topk"]
