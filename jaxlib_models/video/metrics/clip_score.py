"""CLIP text alignment (Pro-Ali) and frame consistency (Tem-Con) of a video.

Definitions of FlowVid / StreamV2V `tools/clip_score.py` (behaviour only;
methods brief §5), on our Flax CLIP towers (`diffusion.clip`):

  e_t   = normalised projected image embedding of frame t,
  e_txt = normalised projected text embedding of the prompt,
  Pro-Ali = mean_t cos(e_txt, e_t),
  Tem-Con = 1/(T-1) sum_t cos(e_t, e_{t+1}).

Values are cosines in [-1, 1] (x1; the papers print x100). Preprocessing as
transformers' CLIPImageProcessor: uint8 RGB frame -> PIL -> short side to
`image_size` (224 for ViT-B/32) with PIL bicubic (`RESIZE` records it; the
long side is int(long * 224 / short)) -> centre crop -> /255 -> CLIP
mean/std. The reference model is openai/clip-vit-base-patch32 (others use
ViT-L/14); no CLIP weights are available offline, so every result carries the
model name and numbers from random weights mean nothing.

T: frames, S: CLIP image size, E: projection dim.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from jaxlib_models.diffusion import clip
from jaxlib_models.diffusion import convert
from jaxlib_models.diffusion.clip_tokenizer import CLIPTokenizer

RESIZE = "PIL.Image.BICUBIC short side, centre crop"


@dataclasses.dataclass(frozen=True)
class CLIPModel:
  """Both CLIP towers, the tokenizer and a name for reports."""

  vision_cfg: clip.CLIPVisionConfig
  vision_params: dict
  text_cfg: clip.CLIPTextConfig | None = None
  text_params: dict | None = None
  tokenizer: CLIPTokenizer | None = None
  name: str = "unknown"

  def __post_init__(self):
    if self.vision_cfg.projection_dim is None:
      raise ValueError("the vision tower needs visual_projection (a"
                       " CLIPModel or CLIPVisionModelWithProjection)")
    if self.text_cfg is not None and self.text_cfg.projection_dim is None:
      raise ValueError("the text tower needs text_projection")


def load_clip_model(folder: str, name: str | None = None) -> CLIPModel:
  """Loads a transformers CLIPModel folder (towers, and tokenizer files when
  present). name defaults to config's `_name_or_path` or the folder name."""
  folder = os.fspath(folder)
  vcfg, vparams = convert.load_clip_vision(folder, with_projection=True)
  with open(os.path.join(folder, convert.CONFIG_NAME)) as fh:
    d = json.load(fh)
  tcfg = tparams = tok = None
  if d.get("model_type") == "clip":
    tcfg, tparams = convert.load_clip_text(folder, with_projection=True)
    try:
      tok = CLIPTokenizer.from_pretrained(folder)
    except FileNotFoundError:
      tok = None
  if name is None:
    name = d.get("_name_or_path") or os.path.basename(os.path.normpath(folder))
  return CLIPModel(vcfg, vparams, tcfg, tparams, tok, name)


def preprocess(frames: np.ndarray, image_size: int = 224) -> np.ndarray:
  """uint8 (T, H, W, 3) RGB -> float32 (T, S, S, 3) CLIP-normalised pixels."""
  frames = np.asarray(frames)
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError("frames must be uint8 (T, H, W, 3) RGB, got"
                     f" {frames.dtype} {frames.shape}")
  s = image_size
  out = np.empty((len(frames), s, s, 3), np.float32)
  for k, f in enumerate(frames):
    h, w = f.shape[:2]
    if h <= w:
      nh, nw = s, int(w * s / h)
    else:
      nh, nw = int(h * s / w), s
    img = PIL.Image.fromarray(f).resize((nw, nh), PIL.Image.BICUBIC)
    top, left = (nh - s) // 2, (nw - s) // 2
    out[k] = np.asarray(img)[top:top + s, left:left + s] / np.float32(255.0)
  return np.asarray(clip.normalize_image(out))


@jax.jit
def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(frames: np.ndarray, model: CLIPModel,
                     batch_size: int = 16) -> np.ndarray:
  """Normalised image embeddings (T, E) float32, in fixed-size jitted batches
  (the last one padded, so one compilation serves any T)."""
  pixels = preprocess(frames, model.vision_cfg.image_size)
  t = len(pixels)
  b = min(batch_size, t)
  out = []
  for s in range(0, t, b):
    chunk = pixels[s:s + b]
    n = len(chunk)
    if n < b:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
    emb = clip.encode_image(model.vision_params, model.vision_cfg,
                            chunk).image_embeds
    out.append(np.asarray(_unit(emb))[:n])
  return np.concatenate(out)


def text_embedding(prompt: str | np.ndarray, model: CLIPModel) -> np.ndarray:
  """Normalised text embedding (E,) of a prompt (or of token ids (L,))."""
  if model.text_cfg is None:
    raise ValueError(f"{model.name}: no text tower loaded (give a CLIPModel"
                     " folder for Pro-Ali)")
  if isinstance(prompt, str):
    if model.tokenizer is None:
      raise ValueError(f"{model.name}: no tokenizer files (vocab.json +"
                       " merges.txt or tokenizer.json) in the CLIP folder")
    enc = model.tokenizer(
        prompt, max_length=min(model.tokenizer.model_max_length,
                               model.text_cfg.max_position_embeddings))
    ids, mask = enc["input_ids"], enc["attention_mask"]
  else:
    ids = np.asarray(prompt, np.int32)[None]
    mask = None
  emb = clip.encode_text(model.text_params, model.text_cfg, ids,
                         attention_mask=mask).text_embeds
  return np.asarray(_unit(emb))[0]


@dataclasses.dataclass(frozen=True)
class CLIPScore:
  name: str  # "clip_pro_ali" or "clip_tem_con".
  value: float  # Cosine, x1 (papers print x100).
  per_frame: np.ndarray  # (T,) cos(text, frame) or (T-1,) cos(t, t+1).
  model: str  # CLIP model name.
  resize: str = RESIZE

  def as_dict(self) -> dict:
    key = f"{self.name}[{self.model}]"
    return {key: self.value,
            f"{key}/per_frame": [float(x) for x in self.per_frame],
            f"{key}/resize": self.resize}


def clip_text_alignment(frames: np.ndarray, prompt: str | np.ndarray,
                        model: CLIPModel, batch_size: int = 16
                        ) -> CLIPScore:
  """Pro-Ali = mean_t cos(e_txt, e_t) (x1).

  Args:
    frames: uint8 (T, H, W, 3) RGB.
    prompt: the edit prompt, or its token ids (L,).
    model: `load_clip_model(...)` or a hand-built `CLIPModel`.
    batch_size: frames per jitted image-encoder call.
  """
  e_TE = image_embeddings(frames, model, batch_size)
  e_E = text_embedding(prompt, model)
  cos_T = e_TE.astype(np.float64) @ e_E.astype(np.float64)
  return CLIPScore("clip_pro_ali", float(cos_T.mean()), cos_T, model.name)


def clip_frame_consistency(frames: np.ndarray, model: CLIPModel,
                           batch_size: int = 16) -> CLIPScore:
  """Tem-Con = mean_t cos(e_t, e_{t+1}) (x1); needs T >= 2."""
  if len(frames) < 2:
    raise ValueError(f"Tem-Con needs at least 2 frames, got {len(frames)}")
  e_TE = image_embeddings(frames, model, batch_size).astype(np.float64)
  cos = np.sum(e_TE[:-1] * e_TE[1:], axis=-1)
  return CLIPScore("clip_tem_con", float(cos.mean()), cos, model.name)
