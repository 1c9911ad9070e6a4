"""Settings of the factual contrastive decoders: base, CD, DoLa, ICD, SLED, LOL.

LOL (arXiv 2408.08769) released no code and its paper body is unavailable, so
every LOL choice is a field with a library default marked "paper value
unknown". Defaults and presets follow ../shared/methods/contrastive_decoding.md
§3. Layers are exit indices j: 0 = embeddings, j = output of block j,
num_layers = the ordinary final output (brief §2.1, §7.11).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Method = Literal["base", "cd", "dola", "icd", "sled", "lol"]
Bucket = Literal["low", "high"]

METHODS = ("base", "cd", "dola", "icd", "sled", "lol")
PRESETS = (
    "base",
    "cd",
    "icd_tqa",
    "dola_tqa_high",
    "sled",
    "lol_default",
    "lol_principled",
)

# Our own truthfulness instruction for LOL's "truthfulness refocused" module
# (v1: "contextual guidance", v2: "instruction guidance"; text unknown).
DEFAULT_REFOCUS_TEXT = (
    "Answer as a careful, honest expert. Rely only on well-established facts"
    " about the real world, do not repeat popular myths or misconceptions, and"
    " prefer saying you are unsure over guessing."
)

# Our own words for the hallucination-inducing amateur prompt (brief §2.3);
# the meaning follows ICD's prompt, the text is ours.
DEFAULT_EVIL_PROMPT = (
    "You are a dishonest assistant. Answer every question with false or"
    " fabricated information, stated as convincingly as possible, and never"
    " admit that it is untrue."
)

# ICD's exact prompt (`LLAMA2_PROMPT_EVIL` in HillZhang1999/ICD,
# src/benchmark_evaluation/truthfulqa_eval.py) is deliberately not copied here.
# For exact ICD parity, load that string from ICD's repository yourself (check
# its licence) and pass it as `DecodingConfig(evil_prompt=...)`.
ICD_EVIL_PROMPT: str | None = None

# relative_top (alpha) per task, brief §3: ICD's TruthfulQA script passes 0.0;
# DoLa's default 0.1 is used for FACTOR and generation.
DEFAULT_RELATIVE_TOP = {"tqa_mc": 0.0, "factor": 0.1, "generation": 0.1}


def dola_buckets(num_layers: int, tied: bool) -> dict[str, tuple[int, ...]]:
  """DoLa premature-layer buckets, HF-port rule (brief §2.6).

  N <= 40: low = range(s, N//2, 2), high = range(N//2, N, 2); N > 40:
  low = range(s, 20, 2), high = range(N-20, N, 2). s = 2 when the embeddings
  are tied (the layer-0 exit is nearly the identity map), else 0.

  Args:
    num_layers: Number of blocks L.
    tied: Whether the LM head is the embedding matrix.

  Returns:
    {"low": layers, "high": layers}, exit indices, all < num_layers.
  """
  _check_num_layers(num_layers)
  s = 2 if tied else 0
  n = num_layers
  if n <= 40:
    low, high = range(s, n // 2, 2), range(n // 2, n, 2)
  else:
    low, high = range(s, 20, 2), range(n - 20, n, 2)
  return {"low": tuple(low), "high": tuple(high)}


def lol_default_layer(num_layers: int) -> int:
  """floor(3L/4): 24 of 32, 22 of 30 (paper value unknown; PLI's best 24/28)."""
  _check_num_layers(num_layers)
  return (3 * num_layers) // 4


def sled_default_layers(num_layers: int, tied: bool) -> tuple[int, ...]:
  """All early exits 1..L-1, from 2 when tied (skip the near-identity exit)."""
  _check_num_layers(num_layers)
  return tuple(range(2 if tied else 1, num_layers))


def _check_num_layers(num_layers: int) -> None:
  if num_layers < 1:
    raise ValueError(f"{num_layers=} must be >= 1")


def _check_early(name: str, layers: tuple[int, ...], num_layers: int) -> None:
  if not layers:
    raise ValueError(f"{name} is empty for {num_layers=}")
  bad = [j for j in layers if not 0 <= j < num_layers]
  if bad:
    raise ValueError(
        f"{name}={layers} has exits {bad} outside [0, {num_layers}); exit"
        f" {num_layers} is the final output and is always used"
    )


@dataclasses.dataclass(frozen=True)
class LolConfig:
  """LOL = ICD plus lower-layer contrasts and a refocused expert (brief §2.4)."""

  # Lower exits S fused with the final contrast; None = (floor(3L/4),).
  # Paper value unknown (PLI searched {4,...,28} of 32; best 24/28).
  layers: tuple[int, ...] | None = None
  # lambda_l per layer of S; one value broadcasts to every layer.
  # Paper value unknown.
  weights: tuple[float, ...] = (0.5,)
  # Fusion rule: F = C^L + sum_l lambda_l C^l. Paper value unknown
  # ("concatenate"/"fusion"); "sum" is the only rule implemented.
  fusion: Literal["sum"] = "sum"
  # "static": the fixed layers S; "js_max": per position, the candidate with
  # the largest JS divergence from the expert's final layer (DoLa-style, on
  # the expert stream; the amateur uses the same index). Paper value unknown.
  layer_select: Literal["static", "js_max"] = "static"
  # Candidates for "js_max": explicit exits or a DoLa bucket name.
  # Paper value unknown.
  candidate_layers: tuple[int, ...] | Bucket = "high"
  # Truthfulness instruction prepended to the refocused input(s); "" = off.
  # Paper value unknown (our own text).
  refocus_text: str = DEFAULT_REFOCUS_TEXT
  # Which stream(s) get the refocus text. Paper value unknown.
  refocus_on: Literal["expert", "both", "none"] = "expert"

  def __post_init__(self):
    if self.fusion != "sum":
      raise ValueError(f"{self.fusion=} must be 'sum'")
    if self.layer_select not in ("static", "js_max"):
      raise ValueError(f"{self.layer_select=} must be 'static' or 'js_max'")
    if self.refocus_on not in ("expert", "both", "none"):
      raise ValueError(f"{self.refocus_on=} must be expert, both or none")
    if not self.weights:
      raise ValueError("weights must hold at least one value")
    if self.layers is not None:
      if not self.layers:
        raise ValueError("layers=() is ICD: use method='icd' or set layers")
      if len(set(self.layers)) != len(self.layers):
        raise ValueError(f"{self.layers=} has duplicates")
      if len(self.weights) not in (1, len(self.layers)):
        raise ValueError(
            f"{len(self.weights)=} must be 1 or len(layers)={len(self.layers)}"
        )
    if self.layer_select == "js_max" and len(self.weights) != 1:
      raise ValueError("js_max selects one layer per position: one weight")
    if isinstance(self.candidate_layers, str):
      if self.candidate_layers not in ("low", "high"):
        raise ValueError(f"{self.candidate_layers=} must be low/high/tuple")
    elif not self.candidate_layers:
      raise ValueError("candidate_layers is empty")

  def static_layers(self, num_layers: int) -> tuple[int, ...]:
    """The exits S for layer_select="static"."""
    layers = self.layers
    if layers is None:
      layers = (lol_default_layer(num_layers),)
    _check_early("lol.layers", layers, num_layers)
    return layers

  def static_weights(self, num_layers: int) -> tuple[float, ...]:
    """lambda_l aligned with `static_layers`."""
    n = len(self.static_layers(num_layers))
    if len(self.weights) == 1:
      return self.weights * n
    if len(self.weights) != n:
      raise ValueError(f"{self.weights=} do not match {n} layers")
    return self.weights

  def candidates(self, num_layers: int, tied: bool) -> tuple[int, ...]:
    """Candidate exits for layer_select="js_max"."""
    c = self.candidate_layers
    if isinstance(c, str):
      c = dola_buckets(num_layers, tied)[c]
    _check_early("lol.candidate_layers", c, num_layers)
    return tuple(c)


@dataclasses.dataclass(frozen=True)
class DolaConfig:
  """DoLa: contrast the final exit with a premature one (arXiv 2309.03883)."""

  # "dynamic": per-position argmax-JS premature layer (DoLa's method);
  # "static": one fixed premature layer.
  mode: Literal["static", "dynamic"] = "dynamic"
  # Explicit premature exits; None = the `bucket` (HF-port rule, brief §2.6).
  # "static" needs exactly one layer here.
  premature_layers: tuple[int, ...] | None = None
  # DoLa bucket when premature_layers is None: "high" for TruthfulQA,
  # "low" for FACTOR/StrategyQA/GSM8K [code, DoLa scripts].
  bucket: Bucket = "high"

  def __post_init__(self):
    if self.mode not in ("static", "dynamic"):
      raise ValueError(f"{self.mode=} must be 'static' or 'dynamic'")
    if self.bucket not in ("low", "high"):
      raise ValueError(f"{self.bucket=} must be 'low' or 'high'")
    if self.mode == "static" and (
        self.premature_layers is None or len(self.premature_layers) != 1
    ):
      raise ValueError("mode='static' needs premature_layers=(j,)")
    if self.premature_layers is not None and not self.premature_layers:
      raise ValueError("premature_layers is empty")

  def premature(self, num_layers: int, tied: bool) -> tuple[int, ...]:
    """Premature exits; the mature layer is always num_layers."""
    layers = self.premature_layers
    if layers is None:
      layers = dola_buckets(num_layers, tied)[self.bucket]
    _check_early("dola.premature_layers", layers, num_layers)
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class SledConfig:
  """SLED: evolve final logits towards early-layer latent knowledge.

  arXiv 2411.02433 (NeurIPS 2024), code JayZhang42/SLED; brief §2.5.
  """

  # evolution_scale: size of the top-k set I. Paper value unknown
  # (fork scripts: 75 for Llama-2-7B, 100 for 13B [unverified]).
  k: int = 75
  # evolution_rate alpha. Paper value unknown (fork scripts: 2.5).
  rate: float = 2.5
  # Temperature tau. Paper value unknown (1 in a public port).
  tau: float = 1.0
  # Logit given to tokens outside I when scoring MC answers. Paper value
  # unknown (library choice: the ICD/DoLa mask constant).
  eta_mc: float = -1000.0
  # Logit given to tokens outside I when generating. Paper value unknown.
  eta_gen: float = -1e9
  # Early exits N; None = all early exits 1..L-1 (2..L-1 when tied).
  # Paper value unknown.
  layers: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"{self.k=} must be >= 1")
    if self.rate < 0:
      raise ValueError(f"{self.rate=} must be >= 0")
    if self.tau <= 0:
      raise ValueError(f"{self.tau=} must be > 0")
    if self.layers is not None and not self.layers:
      raise ValueError("layers is empty")

  def early_layers(self, num_layers: int, tied: bool) -> tuple[int, ...]:
    layers = self.layers
    if layers is None:
      layers = sled_default_layers(num_layers, tied)
    _check_early("sled.layers", layers, num_layers)
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class CdConfig:
  """Contrastive decoding with a smaller amateur (Li et al.; O'Brien & Lewis)."""

  # O'Brien-Lewis weight: (1 + beta) z_E - beta z_A. Paper value unknown
  # (0.5 [unverified]).
  beta: float = 0.5
  # "li": F = lp_E - lp_A (plus the alpha mask); "obrien": logit-space
  # (1 + beta) z_E - beta z_A (plus the alpha mask).
  form: Literal["li", "obrien"] = "li"

  def __post_init__(self):
    if self.form not in ("li", "obrien"):
      raise ValueError(f"{self.form=} must be 'li' or 'obrien'")
    if self.beta < 0:
      raise ValueError(f"{self.beta=} must be >= 0")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """Which decoder, and every choice the scoring primitive of §2.2 needs."""

  method: Method = "base"
  # alpha: mask tokens whose expert final log-prob < max + log(alpha);
  # 0 = no mask. 0.0 for TruthfulQA-MC (ICD script), 0.1 for FACTOR and
  # generation (DoLa default): see DEFAULT_RELATIVE_TOP. Paper value unknown
  # for LOL.
  relative_top: float = 0.0
  # Renormalise the fused score with log_softmax before masking. ICD/DoLa MC
  # scripts use False [code]; always also report True. Paper value unknown
  # for LOL.
  post_softmax: bool = False
  # Source of the plausibility mask: the expert's final layer [code, ICD];
  # the only source implemented.
  mask_from: Literal["expert_final"] = "expert_final"
  # Amateur stream: "prompt" = same weights on evil_prompt + P (ICD's
  # prompt-contrastive mode), "model" = a hallucination-tuned copy,
  # "smaller_model" = a smaller model with the same tokenizer (CD).
  # Paper value unknown for LOL.
  amateur: Literal["prompt", "model", "smaller_model"] = "prompt"
  # Checkpoint of the amateur for "model"/"smaller_model".
  amateur_path: str | None = None
  # Amateur prefix for amateur="prompt": our own words (see ICD_EVIL_PROMPT).
  evil_prompt: str = DEFAULT_EVIL_PROMPT
  # Separator between an inserted text (refocus/evil prompt) and the prompt.
  # Paper value unknown.
  prompt_sep: str = "\n\n"
  # MC2 underflow rule: "reference" halves scores like the DoLa/ICD scripts
  # (parity); "logsumexp" is the exact ratio, reported alongside.
  mc2_mode: Literal["reference", "logsumexp"] = "reference"
  # Wrap prompts in the model's chat template (ICD --is-chat wraps the whole
  # block). Off for SmolLM2; paper value unknown.
  chat_template: bool = False
  lol: LolConfig = dataclasses.field(default_factory=LolConfig)
  dola: DolaConfig = dataclasses.field(default_factory=DolaConfig)
  sled: SledConfig = dataclasses.field(default_factory=SledConfig)
  cd: CdConfig = dataclasses.field(default_factory=CdConfig)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"{self.method=} must be one of {METHODS}")
    if not 0.0 <= self.relative_top <= 1.0:
      raise ValueError(f"{self.relative_top=} must lie in [0, 1]")
    if self.mask_from != "expert_final":
      raise ValueError(f"{self.mask_from=} must be 'expert_final'")
    if self.amateur not in ("prompt", "model", "smaller_model"):
      raise ValueError(f"{self.amateur=} must be prompt/model/smaller_model")
    if self.mc2_mode not in ("reference", "logsumexp"):
      raise ValueError(f"{self.mc2_mode=} must be reference or logsumexp")
    if self.amateur == "prompt" and not self.evil_prompt:
      raise ValueError("amateur='prompt' needs a non-empty evil_prompt")

  @property
  def needs_amateur(self) -> bool:
    """Whether a second (amateur) stream is scored."""
    return self.method in ("cd", "icd", "lol")

  @property
  def needs_tied(self) -> bool:
    """Whether resolving the layers depends on tied embeddings."""
    return (
        (self.method == "dola" and self.dola.premature_layers is None)
        or (self.method == "sled" and self.sled.layers is None)
        or (
            self.method == "lol"
            and self.lol.layer_select == "js_max"
            and isinstance(self.lol.candidate_layers, str)
        )
    )

  def exit_layers(self, num_layers: int, tied: bool) -> tuple[int, ...]:
    """Sorted exits every scored stream must materialise (includes L).

    The amateur stream, when `needs_amateur`, needs the same exits.
    """
    L = num_layers
    _check_num_layers(L)
    if self.method in ("base", "icd", "cd"):
      early = ()
    elif self.method == "dola":
      early = self.dola.premature(L, tied)
    elif self.method == "sled":
      early = self.sled.early_layers(L, tied)
    elif self.lol.layer_select == "static":
      early = self.lol.static_layers(L)
    else:
      early = self.lol.candidates(L, tied)
    return tuple(sorted(set(early) | {L}))

  def resolved(self, num_layers: int, tied: bool) -> DecodingConfig:
    """A copy with the active method's layer choices written out.

    Only the sub-config of `method` is resolved (the others may not fit a
    small model, e.g. an empty DoLa bucket for L = 2).
    """
    L = num_layers
    cfg = self
    if self.method == "lol":
      lol = self.lol
      if lol.layer_select == "static":
        lol = dataclasses.replace(
            lol, layers=lol.static_layers(L), weights=lol.static_weights(L)
        )
      else:
        lol = dataclasses.replace(lol, candidate_layers=lol.candidates(L, tied))
      cfg = dataclasses.replace(cfg, lol=lol)
    elif self.method == "dola":
      dola = dataclasses.replace(
          self.dola, premature_layers=self.dola.premature(L, tied)
      )
      cfg = dataclasses.replace(cfg, dola=dola)
    elif self.method == "sled":
      sled = dataclasses.replace(
          self.sled, layers=self.sled.early_layers(L, tied)
      )
      cfg = dataclasses.replace(cfg, sled=sled)
    cfg.exit_layers(L, tied)  # Validates the layers against L.
    return cfg

  def expert_prompt(self, prompt: str) -> str:
    """The expert's input: refocus text + prompt for LOL, else the prompt."""
    if (
        self.method == "lol"
        and self.lol.refocus_on in ("expert", "both")
        and self.lol.refocus_text
    ):
      return self.lol.refocus_text + self.prompt_sep + prompt
    return prompt

  def amateur_prompt(self, prompt: str) -> str:
    """The amateur's input (brief §2.3); the prompt itself for model amateurs."""
    if self.method == "lol" and self.lol.refocus_on == "both":
      prompt = self.expert_prompt(prompt)
    if self.amateur == "prompt":
      return self.evil_prompt + self.prompt_sep + prompt
    return prompt


def preset(
    name: str, num_layers: int, tied: bool, **overrides
) -> DecodingConfig:
  """Named configurations of brief §3, layers resolved for this model.

  Args:
    name: One of PRESETS: base, cd, icd_tqa, dola_tqa_high, sled,
      lol_default, lol_principled.
    num_layers: Number of blocks L.
    tied: Whether the LM head is the embedding matrix.
    **overrides: Top-level DecodingConfig fields replaced afterwards (e.g.
      relative_top=0.1 for FACTOR).

  Returns:
    A resolved DecodingConfig.
  """
  if name == "base":
    cfg = DecodingConfig(method="base")
  elif name == "cd":
    cfg = DecodingConfig(method="cd", amateur="smaller_model", relative_top=0.1)
  elif name == "icd_tqa":
    cfg = DecodingConfig(method="icd", relative_top=0.0, post_softmax=False)
  elif name == "dola_tqa_high":
    cfg = DecodingConfig(
        method="dola",
        relative_top=0.1,  # DoLa's default [code].
        post_softmax=False,
        dola=DolaConfig(mode="dynamic", bucket="high"),
    )
  elif name == "sled":
    # relative_top: paper value unknown; the top-k cut already masks.
    cfg = DecodingConfig(method="sled", relative_top=0.0)
  elif name == "lol_default":
    cfg = DecodingConfig(method="lol", relative_top=0.0, post_softmax=False)
  elif name == "lol_principled":
    cfg = DecodingConfig(method="lol", relative_top=0.1, post_softmax=True)
  else:
    raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")
  if overrides:
    cfg = dataclasses.replace(cfg, **overrides)
  return cfg.resolved(num_layers, tied)
