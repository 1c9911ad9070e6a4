"""Video I/O: round trips (mp4 lossy, PNG folder exact), streaming, errors.

mp4 (mp4v) tolerance: mean abs error <= 8 grey levels on a 64x96 synthetic
clip (observed 3.4; max 40 at sharp edges).
"""

import os

import cv2
import numpy as np
import pytest

from jaxlib_models.video import io, synthetic


@pytest.fixture(scope="module")
def clip():
  return synthetic.make_video(6, 64, 96, "mixed").frames


def test_mp4_round_trip(tmp_path, clip):
  path = io.write_video(tmp_path / "sub" / "a.mp4", clip, fps=24)
  assert path == str(tmp_path / "sub" / "a.mp4")
  frames, fps = io.read_video(path)
  assert frames.shape == clip.shape and frames.dtype == np.uint8
  assert fps == pytest.approx(24.0)
  err = np.abs(frames.astype(np.int32) - clip).mean()
  assert err <= 8.0, err
  # RGB order is kept: a red frame stays red.
  red = np.zeros((2, 32, 48, 3), np.uint8)
  red[..., 0] = 200
  back, _ = io.read_video(io.write_video(tmp_path / "red.mp4", red))
  assert back[..., 0].mean() > 150 and back[..., 2].mean() < 50
  assert sorted(os.listdir(tmp_path)) == ["red.mp4", "sub"]  # no temp files


def test_png_folder_round_trip_is_exact(tmp_path, clip):
  out = tmp_path / "frames"
  io.write_video(out, clip)
  frames, fps = io.read_video(out)
  np.testing.assert_array_equal(frames, clip)
  assert fps == 30.0 and io.read_video(out, fps=12)[1] == 12.0
  # Overwriting replaces the whole folder atomically (no stale frames).
  io.write_video(out, clip[:2] / 255.0)  # float input in [0, 1]
  frames, _ = io.read_video(out)
  np.testing.assert_array_equal(frames, clip[:2])
  assert sorted(os.listdir(tmp_path)) == ["frames"]


def test_streaming_max_frames_and_resize(tmp_path, clip):
  io.write_video(tmp_path / "v", clip)
  it = io.iter_frames(tmp_path / "v", max_frames=4, size=(32, 48))
  assert not isinstance(it, (list, np.ndarray))
  frames = list(it)
  assert len(frames) == 4 and frames[0].shape == (32, 48, 3)
  io.write_video(tmp_path / "v.mp4", clip)
  frames, _ = io.read_video(tmp_path / "v.mp4", max_frames=3, size=(48, 72))
  assert frames.shape == (3, 48, 72, 3)


def test_failed_write_keeps_the_previous_video(tmp_path, clip):
  path = tmp_path / "keep.mp4"
  io.write_video(path, clip[:2])
  before = path.read_bytes()
  with pytest.raises(RuntimeError, match="boom"):
    with io.VideoWriter(path) as w:
      w.write(clip[0])
      raise RuntimeError("boom")
  assert path.read_bytes() == before
  with pytest.raises(io.VideoError, match="one size per video"):
    with io.VideoWriter(tmp_path / "x.mp4") as w:
      w.write(clip[0])
      w.write(clip[0, :32])
  with pytest.raises(io.VideoError, match="no frame written"):
    io.write_video(tmp_path / "empty.mp4", [])
  with pytest.raises(io.VideoError, match="unknown video extension"):
    io.VideoWriter(tmp_path / "x.gif")
  assert sorted(os.listdir(tmp_path)) == ["keep.mp4"]


def test_read_errors(tmp_path, clip):
  with pytest.raises(io.VideoError, match="no such file.*check the path"):
    io.read_video(tmp_path / "missing.mp4")
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(np.random.RandomState(0).bytes(2000))
  with pytest.raises(io.VideoError, match="bad.mp4: OpenCV cannot open"):
    io.read_video(bad)
  # A valid container with zero frames: opens, decodes nothing.
  empty = str(tmp_path / "empty.avi")
  w = cv2.VideoWriter(empty, cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 64))
  w.release()
  with pytest.raises(io.VideoError, match="empty.avi: OpenCV decoded no"):
    io.read_video(empty)
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  cv2.imwrite(str(mixed / "0.png"), clip[0])
  cv2.imwrite(str(mixed / "1.png"), clip[1, :32])
  with pytest.raises(io.VideoError, match=r"mixed: frame 1.png is 96x32 but"
                     r" the first frame is 96x64"):
    io.read_video(mixed)
  (tmp_path / "none").mkdir()
  with pytest.raises(io.VideoError, match="holds no"):
    io.iter_frames(tmp_path / "none")
  assert issubclass(io.VideoError, ValueError)


def test_webcam_missing_is_a_clear_error():
  with pytest.raises(io.VideoError, match="camera 97: cannot be opened"):
    io.open_webcam(97)
