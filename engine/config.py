"""ModelConfig: the switches of architectures.md, one row per architecture, no per-arch code."""
from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    ffn: int  # intermediate size
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float  # theta of global (full-attention) layers
    rope_neox: bool  # NEOX pairing (x[i], x[i+d/2]) vs NORM pairing (x[2i], x[2i+1])
    context_length: int = 0
    rope_theta_local: float | None = None  # gemma3: theta of sliding-window layers
    rope_scale: float = 1.0  # linear position scaling on global layers (gemma3 4B+)
    sliding_window: int = 0  # 0 = none
    sliding_pattern: int = 0  # gemma3: 6 -> layers with (i+1) % 6 != 0 slide; 0 = all layers slide
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: bool = False  # gemma3: h = E[tok] * sqrt(hidden)
    tied_head: bool = False
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim)

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window <= 0:
            return False
        if self.sliding_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_pattern != 0

    def layer_window(self, layer: int) -> int:
        """Attention window of a layer; 0 means unlimited (plain causal)."""
        return self.sliding_window if self.is_sliding(layer) else 0

    def layer_theta(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    def layer_rope_scale(self, layer: int) -> float:
        return 1.0 if self.is_sliding(layer) else self.rope_scale

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5


def expected_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The tensor inventory of a model: every tensor the forward reads, internal (GGUF-style)
    name -> (shape [out, in], required).

    The one source of truth for the loader's validation, the forward's upload, the synthetic
    models and bench/make_7b.py.
    """
    H, D, F, V = config.hidden, config.head_dim, config.ffn, config.vocab_size
    q, kv = config.n_heads * D, config.n_kv_heads * D
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((V, H), True),
        "output_norm.weight": ((H,), True),
        "output.weight": ((V, H), not config.tied_head),
        "rope_freqs.weight": ((D // 2,), False),
    }
    for i in range(config.n_layers):
        layer = {
            "attn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
            "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "ffn_norm.weight": (H,),
            "ffn_gate.weight": (F, H), "ffn_up.weight": (F, H), "ffn_down.weight": (H, F),
        }
        if config.qkv_bias:
            layer |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        if config.qk_norm:
            layer |= {"attn_q_norm.weight": (D,), "attn_k_norm.weight": (D,)}
        if config.sandwich_norm:
            layer |= {"post_attention_norm.weight": (H,), "post_ffw_norm.weight": (H,)}
        out |= {f"blk.{i}.{k}": (shape, True) for k, shape in layer.items()}
    return out
