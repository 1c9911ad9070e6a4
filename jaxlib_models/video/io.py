"""Video input/output: files (OpenCV), folders of images, webcam.

Frames are always uint8 RGB (T, H, W, 3) (OpenCV's BGR is converted at this
boundary). A "video" is either a file OpenCV/FFmpeg can decode (.mp4, .avi,
...) or a folder of images (.png, .jpg, .jpeg, .bmp), read in sorted file-name
order. Writes are atomic: the video (file or folder) is written under a
temporary name in the destination folder and renamed into place when
complete, so a reader never sees a half-written video.
"""

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import cv2
import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")
DEFAULT_FPS = 30.0


class VideoError(ValueError):
  """A video that cannot be read or written; the message names the path."""


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """uint8 as is; floats are read as [0, 1], clipped, rounded to 0-255."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames
  if np.issubdtype(frames.dtype, np.floating):
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
  raise ValueError(f"frames of dtype {frames.dtype}: give uint8 or float in"
                   " [0, 1]")


def _resize(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  if size is None or frame.shape[:2] == tuple(size):
    return frame
  h, w = size
  shrink = h * w < frame.shape[0] * frame.shape[1]
  return cv2.resize(frame, (w, h), interpolation=(
      cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))


def _image_files(folder: str) -> list[str]:
  names = sorted(n for n in os.listdir(folder)
                 if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."))
  if not names:
    raise VideoError(f"{folder}: the folder holds no {'/'.join(IMAGE_EXTS)}"
                     " images; give a video file or a folder of frames")
  return [os.path.join(folder, n) for n in names]


def _read_image(path: str) -> np.ndarray:
  bgr = cv2.imread(path, cv2.IMREAD_COLOR)
  if bgr is None:
    raise VideoError(f"{path}: OpenCV cannot decode this image; re-save it"
                     " as PNG or JPEG")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_path(path) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such file or folder; check the path")
  if not os.path.isdir(path) and not os.access(path, os.R_OK):
    raise VideoError(f"{path}: not readable; check its permissions")
  return path


def _folder_frames(folder: str, files: list[str], max_frames, size
                   ) -> Iterator[np.ndarray]:
  first_shape = None
  for k, f in enumerate(files):
    if max_frames is not None and k >= max_frames:
      return
    img = _read_image(f)
    if first_shape is None:
      first_shape = img.shape
    elif img.shape != first_shape:
      raise VideoError(
          f"{folder}: frame {os.path.basename(f)} is {img.shape[1]}x"
          f"{img.shape[0]} but the first frame is {first_shape[1]}x"
          f"{first_shape[0]}; all frames of a folder video must have one"
          " size (resize them, or pass size= only after fixing the folder)")
    yield _resize(img, size)


def _capture_frames(cap, path: str, max_frames, size, *, release=True
                    ) -> Iterator[np.ndarray]:
  n = 0
  try:
    while max_frames is None or n < max_frames:
      ok, bgr = cap.read()
      if not ok:
        break
      n += 1
      yield _resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)
  finally:
    if release:
      cap.release()
  if n == 0 and max_frames != 0:
    raise VideoError(f"{path}: OpenCV decoded no frame; the file is not a"
                     " video OpenCV/FFmpeg can read (re-encode it, e.g."
                     " `ffmpeg -i IN -c:v libx264 OUT.mp4`)")


def _open_capture(path: str):
  cap = cv2.VideoCapture(path)
  if not cap.isOpened():
    cap.release()
    raise VideoError(f"{path}: OpenCV cannot open this file as a video"
                     " (re-encode it, e.g. `ffmpeg -i IN -c:v libx264"
                     " OUT.mp4`, or give a folder of PNG frames)")
  return cap


def video_fps(path, fps: float | None = None) -> float:
  """Frame rate of a video file (as stored), or `fps`/30 for a folder."""
  path = _check_path(path)
  if os.path.isdir(path):
    return float(fps or DEFAULT_FPS)
  cap = _open_capture(path)
  try:
    stored = cap.get(cv2.CAP_PROP_FPS)
  finally:
    cap.release()
  return float(fps or stored or DEFAULT_FPS)


def iter_frames(path, max_frames: int | None = None,
                size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
  """Streams frames one at a time (constant memory).

  Args:
    path: video file or folder of images.
    max_frames: stop after this many frames (None: all).
    size: (height, width) to resize to (INTER_AREA when shrinking, else
      INTER_LINEAR), or None for the stored size.

  Yields:
    (H, W, 3) uint8 RGB frames.

  Raises:
    VideoError: missing or unreadable path, undecodable file (on the first
      `next`), images of different sizes in a folder.
  """
  path = _check_path(path)
  if os.path.isdir(path):
    return _folder_frames(path, _image_files(path), max_frames, size)
  return _capture_frames(_open_capture(path), path, max_frames, size)


def read_video(path, max_frames: int | None = None,
               size: tuple[int, int] | None = None,
               fps: float | None = None) -> tuple[np.ndarray, float]:
  """Reads a whole video into memory.

  Args:
    path: video file or folder of images (sorted by name).
    max_frames: keep the first max_frames frames.
    size: (height, width) to resize to, or None.
    fps: frame rate to report for a folder (default 30) or to override the
      file's.

  Returns:
    (frames uint8 (T, H, W, 3) RGB, fps).
  """
  rate = video_fps(path, fps)
  frames = list(iter_frames(path, max_frames, size))
  if not frames:
    raise VideoError(f"{os.fspath(path)}: no frame read (max_frames="
                     f"{max_frames})")
  return np.stack(frames), rate


def open_webcam(index: int = 0, max_frames: int | None = None,
                size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
  """Opens camera `index` now and returns a frame generator (RGB uint8).

  The camera is released when the generator finishes or is closed.

  Raises:
    VideoError: no camera at that index (e.g. none attached, or the process
      cannot access /dev/video*).
  """
  cap = cv2.VideoCapture(index)
  if not cap.isOpened():
    cap.release()
    raise VideoError(f"camera {index}: cannot be opened (no camera at this"
                     " index, or no permission for /dev/video*); use a video"
                     " file or a folder of frames instead")
  return _capture_frames(cap, f"camera {index}", max_frames, size)


def _is_folder_target(path: str) -> bool:
  ext = os.path.splitext(path)[1].lower()
  if ext in VIDEO_EXTS:
    return False
  if ext and ext not in IMAGE_EXTS:
    raise VideoError(f"{path}: unknown video extension {ext!r}; use one of"
                     f" {VIDEO_EXTS} or a folder name without extension")
  return True


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


class VideoWriter:
  """Writes frames to an .mp4 (codec mp4v) / .avi file or a PNG folder.

  Use as a context manager; the destination appears only on a clean exit
  (atomic rename), an exception leaves any previous video at that path
  untouched:

    with VideoWriter("out.mp4", fps=24) as w:
      for frame in frames:
        w.write(frame)

  A path without a video extension is a folder of frame_000000.png, ...
  (lossless). mp4 is lossy: expect a few grey levels of error.
  """

  def __init__(self, path, fps: float = DEFAULT_FPS, fourcc: str = "mp4v"):
    self.path = os.path.abspath(os.fspath(path))
    self.fps = float(fps)
    self.fourcc = fourcc
    self.is_folder = _is_folder_target(self.path)
    self.count = 0
    self._shape = None
    self._cv = None
    self._tmp = None

  def __enter__(self) -> "VideoWriter":
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(self.path)
    if self.is_folder:
      self._tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{base}-")
    else:
      ext = os.path.splitext(base)[1]
      fd, self._tmp = tempfile.mkstemp(dir=parent, prefix=f".tmp-{base}-",
                                       suffix=ext)
      os.close(fd)
    return self

  def write(self, frame: np.ndarray) -> None:
    """Appends one (H, W, 3) RGB frame (uint8, or float in [0, 1])."""
    if self._tmp is None:
      raise RuntimeError("use VideoWriter as a context manager")
    frame = to_uint8(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
      raise VideoError(f"{self.path}: frames must be (H, W, 3) RGB, got"
                       f" {frame.shape}")
    if self._shape is None:
      self._shape = frame.shape
    elif frame.shape != self._shape:
      raise VideoError(f"{self.path}: frame {self.count} is {frame.shape},"
                       f" the first was {self._shape}; one size per video")
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    if self.is_folder:
      name = os.path.join(self._tmp, f"frame_{self.count:06d}.png")
      if not cv2.imwrite(name, bgr):
        raise VideoError(f"{name}: OpenCV could not write the PNG")
    else:
      if self._cv is None:
        h, w = frame.shape[:2]
        self._cv = cv2.VideoWriter(
            self._tmp, cv2.VideoWriter_fourcc(*self.fourcc), self.fps,
            (w, h))
        if not self._cv.isOpened():
          raise VideoError(f"{self.path}: OpenCV cannot encode"
                           f" {self.fourcc!r} video here; write a PNG folder"
                           " instead (a path without extension)")
      self._cv.write(bgr)
    self.count += 1

  def _discard(self) -> None:
    if self._tmp is None:
      return
    if os.path.isdir(self._tmp):
      shutil.rmtree(self._tmp, ignore_errors=True)
    elif os.path.exists(self._tmp):
      os.remove(self._tmp)
    self._tmp = None

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._cv is not None:
      self._cv.release()
      self._cv = None
    if exc_type is not None or self.count == 0:
      self._discard()
      if exc_type is None:
        raise VideoError(f"{self.path}: no frame written; nothing saved")
      return
    # mkdtemp / mkstemp create 0700 / 0600; give the usual permissions.
    os.chmod(self._tmp, (0o777 if self.is_folder else 0o666) & ~_umask())
    if self.is_folder and os.path.isdir(self.path):
      # os.replace cannot replace a non-empty folder: move the old one aside
      # first, then delete it once the new one is in place.
      old = tempfile.mkdtemp(dir=os.path.dirname(self.path), prefix=".old-")
      os.replace(self.path, os.path.join(old, "v"))
      os.replace(self._tmp, self.path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(self._tmp, self.path)
    self._tmp = None


def write_video(path, frames: Iterable[np.ndarray],
                fps: float = DEFAULT_FPS, fourcc: str = "mp4v") -> str:
  """Writes frames (uint8 RGB, or float in [0, 1]) atomically; see
  `VideoWriter`. Returns the absolute path written."""
  with VideoWriter(path, fps=fps, fourcc=fourcc) as w:
    for frame in frames:
      w.write(frame)
  return w.path
