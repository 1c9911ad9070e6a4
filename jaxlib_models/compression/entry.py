"""Entry points of the codec (dispatched by core.cli).

  python -m train --config=configs/compression/hyperprior.py:tiny --workdir=runs/c
  python -m eval --config=configs/compression/hyperprior.py:tiny --workdir=runs/c
"""

from __future__ import annotations

import os

import jax
import ml_collections

from jaxlib_models.compression import data, hyperprior, train
from jaxlib_models.core import io, trainer


def _photos(d):
  """(train, eval) photo dicts for a config's data section.

  source "corpus": train on libjxl-testdata (or data.train_folder), evaluate
  on the 12 held-out package photos (data.eval_photos); "builtin": the
  package photos split by data.eval_names (a smoke test: few, JPEG-sourced);
  data.folder (a user's PNGs, e.g. Kodak) overrides both, split by
  eval_names.
  """
  if d.folder:
    return data.split(data.load_folder(d.folder), tuple(d.eval_names))
  if d.get("source", "builtin") == "corpus":
    tr = data.training_photos(d.get("train_folder", "") or None)
    names = tuple(d.eval_names) or None
    return tr, data.eval_photos(names)
  photos = {k: data.load_image(p) for k, p in data.builtin_photos().items()}
  return data.split(photos, tuple(d.eval_names))


def _setup(config):
  cfg = hyperprior.HyperpriorConfig(**config.model.to_dict())
  tr, ev = _photos(config.data)
  if config.data.eval_crop:
    c = config.data.eval_crop
    ev = {k: v[:c, :c] for k, v in ev.items()}
  tc = trainer.TrainConfig.from_dict(config.train.to_dict())
  task = train.make_task(cfg, list(tr.values()), config.loss.lam, tc,
                         config.data.crop, config.data.seed)
  return cfg, ev, tc, task


def train_main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir), then evaluates on the held-out set."""
  cfg, ev, tc, task = _setup(config)
  trainer.train(task, tc, workdir, config_json=config.to_json())
  return eval_main(config, workdir)


def eval_main(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Real bitstreams for the held-out photos from the newest checkpoint."""
  cfg, ev, tc, task = _setup(config)
  state, _, step = trainer.restore_params(task, workdir, tc=tc)
  res = train.evaluate(cfg, jax.device_get(state.params), ev)
  res["step"] = int(step)
  io.write_json(os.path.join(workdir, "eval.json"), res)
  m = res["mean"]
  print(f"held-out ({len(ev)} photos): {m['bpp']:.3f} bpp, "
        f"{m['psnr']:.2f} dB PSNR, encode {m['encode_s']:.2f} s, "
        f"decode {m['decode_s']:.2f} s", flush=True)
  return res
