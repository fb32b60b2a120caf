"""q4k-engine: a frozen k-quant (Q4_K/Q6_K) teacher for knowledge distillation.

    import q4k_engine
    teacher = q4k_engine.load("model.gguf", device="auto")   # or "cpu", "cuda"; "demo" for a tiny model
    last = teacher.logits_for_batch([[1, 2, 3], [4, 5]])       # float32 [B, vocab]
    logits, lengths = teacher.logits_per_position([[1, 2, 3], [4, 5]])  # [B, T_max, vocab], padded with 0
    top = teacher.topk_logprobs([[1, 2, 3]], k=8, tail=True)   # .values .indices .lengths .tail (padding -inf/-1)
"""
from __future__ import annotations

from .config import ModelConfig
from .errors import DeviceError, FallbackWarning, FormatError, InputError, Q4KError, Q4KWarning, UnsupportedError
from .provider import LogitsChunk, LogitsProvider, PerPosition, TeacherModel, TopK, load

__version__ = "0.1.0"

__all__ = [
    "load", "TeacherModel", "LogitsProvider", "ModelConfig", "TopK", "PerPosition", "LogitsChunk",
    "Q4KError", "FormatError", "InputError", "UnsupportedError", "DeviceError",
    "Q4KWarning", "FallbackWarning", "__version__",
]
