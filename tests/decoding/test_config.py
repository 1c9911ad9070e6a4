"""Decoding configs: buckets, presets, exit layers, checks (brief §2.6, §3)."""

import dataclasses

import pytest

from jaxlib_models.decoding import config as config_lib

DecodingConfig = config_lib.DecodingConfig


def test_dola_buckets_hf_rule():
  """SmolLM2 (30, tied) and DoLa's LLaMA-7B sets (32, untied) [code]."""
  b30 = config_lib.dola_buckets(30, tied=True)
  assert b30["high"] == (15, 17, 19, 21, 23, 25, 27, 29)
  assert b30["low"] == (2, 4, 6, 8, 10, 12, 14)
  b32 = config_lib.dola_buckets(32, tied=False)
  assert b32["high"] == tuple(range(16, 31, 2))
  assert b32["low"] == tuple(range(0, 15, 2))
  b48 = config_lib.dola_buckets(48, tied=True)
  assert b48 == {"low": tuple(range(2, 20, 2)), "high": tuple(range(28, 48, 2))}


def test_presets_exit_layers_30_tied():
  want = {
      "base": (30,),
      "icd_tqa": (30,),
      "cd": (30,),
      "dola_tqa_high": (15, 17, 19, 21, 23, 25, 27, 29, 30),
      "sled": tuple(range(2, 31)),
      "lol_default": (22, 30),
      "lol_principled": (22, 30),
  }
  assert set(want) == set(config_lib.PRESETS)
  for name, layers in want.items():
    cfg = config_lib.preset(name, 30, tied=True)
    assert cfg.exit_layers(30, tied=True) == layers, name
  assert config_lib.preset("lol_default", 32, False).lol.layers == (24,)
  assert config_lib.preset("sled", 30, False).sled.layers == tuple(range(1, 30))


def test_preset_values():
  icd = config_lib.preset("icd_tqa", 30, True)
  assert (icd.method, icd.relative_top, icd.post_softmax) == ("icd", 0.0, False)
  assert icd.amateur == "prompt" and icd.needs_amateur
  lol = config_lib.preset("lol_default", 30, True)
  assert (lol.relative_top, lol.post_softmax) == (0.0, False)
  assert lol.lol.weights == (0.5,) and lol.lol.layer_select == "static"
  principled = config_lib.preset("lol_principled", 30, True)
  assert (principled.relative_top, principled.post_softmax) == (0.1, True)
  dola = config_lib.preset("dola_tqa_high", 30, True)
  assert dola.dola.mode == "dynamic" and not dola.needs_amateur
  assert dola.dola.premature_layers == config_lib.dola_buckets(30, True)["high"]
  cd = config_lib.preset("cd", 30, True)
  assert (cd.amateur, cd.relative_top, cd.cd.beta) == (
      "smaller_model",
      0.1,
      0.5,
  )
  sled = config_lib.preset("sled", 30, True)
  assert (sled.sled.k, sled.sled.rate, sled.sled.tau) == (75, 2.5, 1.0)
  assert (sled.sled.eta_mc, sled.sled.eta_gen) == (-1000.0, -1e9)
  factor = config_lib.preset("lol_default", 30, True, relative_top=0.1)
  assert factor.relative_top == 0.1
  with pytest.raises(ValueError, match="unknown preset"):
    config_lib.preset("pli", 30, True)


def test_lol_js_max_needs_candidates_and_amateur_same_exits():
  cfg = DecodingConfig(
      method="lol", lol=config_lib.LolConfig(layer_select="js_max")
  )
  assert cfg.needs_tied
  assert cfg.exit_layers(30, True) == (15, 17, 19, 21, 23, 25, 27, 29, 30)
  assert cfg.resolved(30, True).lol.candidate_layers == tuple(range(15, 30, 2))


def test_defaults_and_prompts():
  cfg = DecodingConfig()
  assert cfg.method == "base" and cfg.relative_top == 0.0
  assert cfg.mc2_mode == "reference" and not cfg.chat_template
  assert config_lib.ICD_EVIL_PROMPT is None
  assert "not honest" not in cfg.evil_prompt  # Our words, not ICD's text.
  lol = DecodingConfig(method="lol")
  assert lol.expert_prompt("P").startswith(lol.lol.refocus_text)
  assert lol.expert_prompt("P").endswith("\n\nP")
  assert lol.amateur_prompt("P") == lol.evil_prompt + "\n\nP"
  icd = DecodingConfig(method="icd")
  assert icd.expert_prompt("P") == "P"
  model = DecodingConfig(method="icd", amateur="model", amateur_path="/m")
  assert model.amateur_prompt("P") == "P"
  both = DecodingConfig(
      method="lol", lol=config_lib.LolConfig(refocus_on="both")
  )
  assert both.amateur_prompt("P").endswith(both.lol.refocus_text + "\n\nP")


def test_configs_are_hashable_for_jit():
  a = config_lib.preset("lol_default", 30, True)
  b = config_lib.preset("lol_default", 30, True)
  assert hash(a) == hash(b) and a == b


@pytest.mark.parametrize(
    "make",
    [
        lambda: DecodingConfig(method="pli"),
        lambda: DecodingConfig(relative_top=1.5),
        lambda: DecodingConfig(mc2_mode="exact"),
        lambda: DecodingConfig(evil_prompt=""),
        lambda: config_lib.DolaConfig(mode="static"),
        lambda: config_lib.DolaConfig(bucket="mid"),
        lambda: config_lib.LolConfig(layers=(3, 5), weights=(1.0, 2.0, 3.0)),
        lambda: config_lib.LolConfig(layers=()),
        lambda: config_lib.LolConfig(layer_select="js_max", weights=(1, 2)),
        lambda: config_lib.LolConfig(fusion="concat"),
        lambda: config_lib.SledConfig(k=0),
        lambda: config_lib.SledConfig(tau=0.0),
        lambda: config_lib.CdConfig(form="other"),
    ],
)
def test_invalid_configs_raise(make):
  with pytest.raises(ValueError):
    make()


def test_layers_outside_range_raise():
  """The final exit is implicit; a lower layer must lie in [0, L)."""
  lol = DecodingConfig(method="lol", lol=config_lib.LolConfig(layers=(30,)))
  with pytest.raises(ValueError, match="outside"):
    lol.exit_layers(30, True)
  dola = DecodingConfig(
      method="dola", dola=config_lib.DolaConfig(premature_layers=(-1, 4))
  )
  with pytest.raises(ValueError, match="outside"):
    dola.resolved(30, True)
  # Resolving only touches the active method: base fits a 2-layer model.
  assert DecodingConfig().resolved(2, True).exit_layers(2, True) == (2,)
  tiny = DecodingConfig(method="dola", dola=config_lib.DolaConfig(bucket="low"))
  with pytest.raises(ValueError, match="empty"):
    tiny.resolved(2, True)  # Tied: low = range(2, 1, 2) is empty.
  assert dataclasses.replace(tiny, dola=config_lib.DolaConfig()).resolved(
      2, True
  ).dola.premature_layers == (1,)
