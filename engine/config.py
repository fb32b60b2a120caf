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
