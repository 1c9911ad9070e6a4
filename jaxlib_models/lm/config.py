"""Llama-family model configuration and the parameter-tree layout.

Parameter tree (flax linen naming, submodules named after the PyTorch
state-dict keys so conversion is mechanical; layers are stacked on a leading
axis of size L because the blocks run under `nn.scan`):

  params = {
    "model": {
      "embed_tokens": {"embedding": (V, D)},
      "layers": {
        "input_layernorm": {"weight": (L, D)},
        "self_attn": {
          "q_proj": {"kernel": (L, D, H*dh), ["bias": (L, H*dh)]},
          "k_proj": {"kernel": (L, D, Hkv*dh), ["bias": (L, Hkv*dh)]},
          "v_proj": {"kernel": (L, D, Hkv*dh), ["bias": (L, Hkv*dh)]},
          "o_proj": {"kernel": (L, H*dh, D)},
        },
        "post_attention_layernorm": {"weight": (L, D)},
        "mlp": {
          "gate_proj": {"kernel": (L, D, F)},
          "up_proj": {"kernel": (L, D, F)},
          "down_proj": {"kernel": (L, F, D)},
        },
      },
      "norm": {"weight": (D,)},
    },
    "lm_head": {"kernel": (D, V)},   # only when tie_word_embeddings is False
  }

HF key `model.layers.{i}.self_attn.q_proj.weight` (out, in) is
`params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][i]` transposed.
Q/K rows are in the HF "half" RoPE layout.
"""

import dataclasses
from typing import Any

_SUPPORTED_ROPE = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2)."""

  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_hidden_layers: int = 30
  num_attention_heads: int = 9
  num_key_value_heads: int = 3
  head_dim: int | None = None  # None: hidden_size // num_attention_heads.
  rms_norm_eps: float = 1e-5
  rope_theta: float = 100000.0
  # None, or a dict {"rope_type": "llama3", "factor", "low_freq_factor",
  # "high_freq_factor", "original_max_position_embeddings"}.
  rope_scaling: Any = None
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = True
  attention_bias: bool = False  # q/k/v bias (Qwen2 style).
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  dtype: str = "float32"  # Compute dtype; log-softmax is always float32.
  # Attention of a full causal pass without cache, prefix, padding or
  # packing (training, plain prefill): "einsum" materialises the scores
  # (every backend, the parity path); "fused" calls
  # `jax.nn.dot_product_attention(is_causal=True)`, which takes cuDNN's
  # flash attention on a GPU and XLA elsewhere. Every other call (cache,
  # prefix, masks) uses einsum either way. cuDNN needs bfloat16/float16
  # compute and head_dim a multiple of 8 up to 128; else XLA's version.
  # Default "fused": also faster on CPU (SmolLM2-135M prefill B=1 T=512:
  # 380 vs 439 ms, benchmarks/RESULTS.md); both equal transformers (tests).
  attention: str = "fused"
  # Rematerialisation of each block in the backward pass: "none", "full"
  # (save only block inputs) or "dots" (save matmul outputs without batch
  # dims, `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
  remat: str = "none"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim",
                         self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple"
          f" of num_key_value_heads={self.num_key_value_heads}")
    if self.attention not in ("einsum", "fused"):
      raise ValueError(f"attention={self.attention!r}: choose 'einsum' or 'fused'")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}: choose 'none', 'full' or 'dots'")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    rs = self.rope_scaling
    if rs is not None:
      if isinstance(rs, dict):
        object.__setattr__(self, "rope_scaling", tuple(sorted(rs.items())))
        rs = dict(self.rope_scaling)
      else:
        rs = dict(rs)
      kind = rs.get("rope_type", rs.get("type", "default"))
      if kind not in _SUPPORTED_ROPE:
        raise ValueError(
            f"rope_scaling type {kind!r} is not implemented (supported:"
            f" {_SUPPORTED_ROPE}); set rope_scaling to null or add it")
      if kind == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
        missing = [k for k in need if k not in rs]
        if missing:
          raise ValueError(f"llama3 rope_scaling lacks {missing}")

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_params(self) -> int:
    d, f, v, l = (self.hidden_size, self.intermediate_size, self.vocab_size,
                  self.num_hidden_layers)
    q = self.num_attention_heads * self.head_dim
    kv = self.num_key_value_heads * self.head_dim
    per = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    if self.attention_bias:
      per += q + 2 * kv
    return v * d * (1 if self.tie_word_embeddings else 2) + l * per + d

  @classmethod
  def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
    """From a transformers `config.json` dict; refuses unknown rope scaling."""
    arch = d.get("model_type", "llama")
    if arch not in ("llama", "qwen2", "mistral"):
      raise ValueError(f"{source}: model_type {arch!r} is not a Llama-family"
                       " model (llama, qwen2, mistral)")
    try:
      rs = d.get("rope_scaling")
      rope_theta = d.get("rope_theta")
      rp = d.get("rope_parameters")  # transformers 5 layout
      if rp:
        rope_theta = rp.get("rope_theta", rope_theta)
        if rp.get("rope_type", "default") != "default":
          rs = {k: v for k, v in rp.items() if k != "rope_theta"}
      if rs is not None and rs.get("rope_type", rs.get("type")) == "default":
        rs = None
      return cls(
          vocab_size=d["vocab_size"],
          hidden_size=d["hidden_size"],
          intermediate_size=d["intermediate_size"],
          num_hidden_layers=d["num_hidden_layers"],
          num_attention_heads=d["num_attention_heads"],
          num_key_value_heads=d.get("num_key_value_heads")
          or d["num_attention_heads"],
          head_dim=d.get("head_dim"),
          rms_norm_eps=d.get("rms_norm_eps", 1e-6),
          rope_theta=rope_theta if rope_theta is not None else 10000.0,
          rope_scaling=rs,
          max_position_embeddings=d.get("max_position_embeddings", 2048),
          tie_word_embeddings=d.get("tie_word_embeddings", False),
          attention_bias=d.get("attention_bias", arch == "qwen2"),
          bos_token_id=d.get("bos_token_id"),
          eos_token_id=(d["eos_token_id"][0]
                        if isinstance(d.get("eos_token_id"), list)
                        else d.get("eos_token_id")),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing required field {e}") from None

  def to_hf_dict(self) -> dict:
    out = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        attention_bias=self.attention_bias, mlp_bias=False,
        hidden_act="silu", bos_token_id=self.bos_token_id,
        eos_token_id=self.eos_token_id, torch_dtype="float32")
    return out


def smollm2_135m() -> LlamaConfig:
  """SmolLM2-135M(-Instruct): 30 blocks, D 576, 9/3 heads, tied, theta 1e5."""
  return LlamaConfig()


def param_axes(cfg: LlamaConfig) -> dict:
  """Logical axis names for every parameter (core.mesh rules)."""
  L = None  # the stacked layer axis is never sharded
  lin = lambda i, o: {"kernel": (L, i, o)}
  attn = {
      "q_proj": lin("embed", "heads"), "k_proj": lin("embed", "kv"),
      "v_proj": lin("embed", "kv"), "o_proj": lin("heads", "embed"),
  }
  if cfg.attention_bias:
    for k, n in (("q_proj", "heads"), ("k_proj", "kv"), ("v_proj", "kv")):
      attn[k]["bias"] = (L, n)
  tree = {
      "model": {
          "embed_tokens": {"embedding": ("vocab", "embed")},
          "layers": {
              "input_layernorm": {"weight": (L, None)},
              "self_attn": attn,
              "post_attention_layernorm": {"weight": (L, None)},
              "mlp": {
                  "gate_proj": lin("embed", "mlp"),
                  "up_proj": lin("embed", "mlp"),
                  "down_proj": lin("mlp", "embed"),
              },
          },
          "norm": {"weight": (None,)},
      }
  }
  if not cfg.tie_word_embeddings:
    tree["lm_head"] = {"kernel": ("embed", "vocab")}
  return tree
