"""StreamV2V end to end: tiny SD UNet + TAESD + CLIP text, and the CLI.

Random weights (no pretrained diffusion weights exist offline): these tests
check plumbing, invariants and errors, never image quality.

Planted-bug checks done while writing these tests (each made a test fail):
emitting the priming outputs (frame count off by 3), a FIFO bank that grows
by one frame per update (test_streamv2v.py).
"""

import os

import numpy as np
import pytest

from tests.conftest import missing_asset

import jax.numpy as jnp

from jaxlib_models.video import io as vio
from jaxlib_models.video import synthetic
from jaxlib_models.video.streamv2v import cli, pipeline as pl, stream

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def models():
  try:
    return pl.random_models("tiny")
  except FileNotFoundError as e:
    missing_asset(str(e))


def _video(n=8, h=64, w=64):
  return synthetic.make_video(num_frames=n, height=h, width=w,
                              motion="mixed", canvas_scale=2.5).frames


def test_identical_frames_bank_equals_per_frame(models):
  frame = _video(2)[0]
  fifo = stream.StreamConfig(bank=stream.BankConfig(merge=False,
                                                    interval=1))
  off = stream.StreamConfig(bank=stream.BankConfig(enabled=False))
  a = pl.StreamV2VPipeline(models, fifo, height=64, width=64, prompt="x")
  b = pl.StreamV2VPipeline(models, off, height=64, width=64, prompt="x")
  outs_a = [np.asarray(a(frame), np.int16) for _ in range(16)]
  outs_b = [np.asarray(b(frame), np.int16) for _ in range(16)]
  # After the transient (slots fill, each layer's bank entry settles).
  for x, y in zip(outs_a[-4:], outs_b[-4:]):
    assert np.abs(x - y).max() <= 1
  # On a moving video the bank changes the output.
  vid = _video(16)
  a.reset(), b.reset()
  moving_a = [np.asarray(a(f), np.int16) for f in vid]
  moving_b = [np.asarray(b(f), np.int16) for f in vid]
  assert max(np.abs(x - y).max() for x, y in zip(moving_a[4:],
                                                 moving_b[4:])) > 1


def test_winograd_route_on_cpu_matches_xla_convolutions(models):
  """The default pipeline on CPU runs the UNet from Winograd-prepared
  kernels; its frames match the XLA-convolution pipeline's to one level."""
  from jaxlib_models.diffusion import winograd
  fast = pl.StreamV2VPipeline(models, height=64, width=64, prompt="x")
  plain = pl.StreamV2VPipeline(models, height=64, width=64, prompt="x",
                               winograd="off")
  assert winograd.prepared_count(fast._params["unet"]) > 0
  assert winograd.prepared_count(plain._params["unet"]) == 0
  assert winograd.prepared_count(models.unet) == 0  # not modified
  for f in _video(6):
    a, b = np.asarray(fast(f), np.int16), np.asarray(plain(f), np.int16)
    assert np.abs(a - b).max() <= 1
  with pytest.raises(ValueError, match="winograd=3"):
    pl.StreamV2VPipeline(models, height=64, width=64, winograd=3)


def test_one_compilation_constant_bank_and_prompt_switch(models):
  pipe = pl.StreamV2VPipeline(models, stream.StreamConfig(
      bank=stream.BankConfig(interval=2)), height=64, width=64, prompt="a")
  frames = _video(30)
  sizes = set()
  for i, f in enumerate(frames):
    if i == 15:
      pipe.set_prompt("a watercolor painting")
    out = pipe(f)
    if i > 0:
      sizes.add(pipe.bank_bytes)
  assert out.dtype == jnp.uint8 and out.shape == (64, 64, 3)
  assert len(sizes) == 1
  assert pipe._step.run_fn._cache_size() == 1
  assert pipe._step.seed_fn._cache_size() == 1


def test_resolution_and_frame_errors(models):
  with pytest.raises(ValueError, match="multiples of 16"):
    pl.StreamV2VPipeline(models, height=72, width=64)
  pipe = pl.StreamV2VPipeline(models, height=64, width=64)
  with pytest.raises(ValueError, match="uint8"):
    pipe(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
    pipe(np.zeros((32, 64, 3), np.uint8))


def test_cli_edits_a_folder_and_keeps_the_frame_count(tmp_path, models,
                                                      capsys):
  src = tmp_path / "in"
  vio.write_video(str(src), _video(7))
  out = tmp_path / "out"
  rc = cli.main([str(src), str(out), "--prompt", "a cat", "--random", "tiny",
                 "--no-progress"])
  assert rc == 0
  got, _ = vio.read_video(str(out))
  assert got.shape == (7, 64, 64, 3)
  err = capsys.readouterr().err
  assert "7 frames in, 7 out" in err and "FPS" in err and "RANDOM" in err


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
  rc = cli.main([str(tmp_path / "missing.mp4"), str(tmp_path / "o.mp4"),
                 "--prompt", "x", "--random", "tiny"])
  assert rc == 1
  assert "missing.mp4" in capsys.readouterr().err
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(os.urandom(2000))
  assert cli.main([str(bad), str(tmp_path / "o.mp4"), "--prompt", "x",
                   "--random", "tiny"]) == 1
  assert "bad.mp4" in capsys.readouterr().err
  src = tmp_path / "odd"
  vio.write_video(str(src), _video(2, h=72, w=64))
  assert cli.main([str(src), str(tmp_path / "o"), "--prompt", "x",
                   "--random", "tiny"]) == 1
  assert "multiples of" in capsys.readouterr().err
  assert cli.main([str(src), str(tmp_path / "o"), "--prompt", "x"]) == 2
  assert "--model" in capsys.readouterr().err
  assert not (tmp_path / "o").exists() and not (tmp_path / "o.mp4").exists()
  with pytest.raises(SystemExit):
    cli.main(["--help"])
