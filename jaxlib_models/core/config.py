"""Experiment configs: `configs/<method>/<exp>.py:<arg>` plus dotted overrides.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`.
`load_config("configs/spike_slab/sim.py:tiny")` calls it with "tiny";
`apply_overrides(cfg, ["train.num_steps=10"])` sets fields by dotted path,
parsing each value with the type of the field it replaces. An unknown key
fails with its name and the nearest valid keys.
"""

import ast
import difflib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, key or value is invalid; the message says which."""


def _split_spec(spec: str) -> tuple[str, str | None]:
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
  path, arg = _split_spec(spec)
  if not os.path.isfile(path):
    raise ConfigError(
        f"config file {path!r} not found (from {spec!r}); pass a path such as"
        " configs/spike_slab/sim.py:tiny"
    )
  name = "_jlm_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None)")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg)
  cfg.lock()
  return cfg


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted leaf key of `cfg`."""
  keys = []
  for k, v in cfg.items():
    full = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, full + "."))
    else:
      keys.append(full)
  return keys


def _parse_value(raw: str, old, key: str):
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if old is None:
      return raw
    raise ConfigError(
        f"--config.{key}={raw!r}: cannot parse as {type(old).__name__}"
    ) from None
  if old is None:
    return value
  if isinstance(old, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"--config.{key}={raw!r}: expected True or False")
    return value
  if isinstance(old, float) and isinstance(value, int):
    return float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  if not isinstance(value, type(old)):
    raise ConfigError(
        f"--config.{key}={raw!r}: expected {type(old).__name__}, got"
        f" {type(value).__name__}"
    )
  return value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
  """Applies `a.b=value` overrides; unknown keys raise with suggestions."""
  valid = flat_keys(cfg)
  with cfg.unlocked():
    for item in overrides:
      key, sep, raw = item.partition("=")
      if not sep:
        raise ConfigError(f"override {item!r} needs the form key=value")
      if key not in valid:
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
      node = cfg
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = _parse_value(raw, node[leaf], key)
  return cfg


def parse_config_args(
    argv: Sequence[str],
) -> tuple[ml_collections.ConfigDict | None, list[str]]:
  """Pulls `--config=SPEC` and `--config.a.b=v` out of argv.

  Returns the config (None when no --config was given) and the other args.
  """
  spec, overrides, rest = None, [], []
  it = iter(argv)
  for arg in it:
    if arg == "--config":
      spec = next(it, None)
      if spec is None:
        raise ConfigError("--config needs a value such as sim.py:tiny")
    elif arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      body = arg[len("--config.") :]
      if "=" not in body:
        value = next(it, None)
        if value is None:
          raise ConfigError(f"{arg} needs a value")
        body = f"{body}={value}"
      overrides.append(body)
    else:
      rest.append(arg)
  if spec is None:
    if overrides:
      raise ConfigError("--config.* overrides need --config=FILE[:arg]")
    return None, rest
  cfg = load_config(spec)
  apply_overrides(cfg, overrides)
  return cfg, rest


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
