"""Text <-> token ids from the tokenizer embedded in a model file (TokenizerSpec, GGUF vocabulary).

The spec is rebuilt as a Hugging Face `tokenizers.Tokenizer` the way transformers' GGUF
integration rebuilds it, so `encode` gives the ids that
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` gives on the same file (tests/test_tokenizer.py
checks this on both real models):

- `gpt2` (byte-level BPE): the file's merges; the pre-tokenizer regex follows `tokenizer.ggml.pre`
  (the split the merges were learned with; an unknown pre-type is refused, the environment variable
  Q4K_PRETOKENIZER chooses one explicitly); control tokens stay whole as special tokens.
- `llama` (SentencePiece-style BPE with byte fallback): no merges are stored, so they are derived
  from the vocabulary: a token t gives one merge (l, r) for every split t = l + r with both halves
  in the vocabulary, ranked by t's score (ties: longer left piece first). Gemma is different in two
  ways: its merge rank is the token's position in the file (its scores do not follow the merge
  order), and its runs of spaces are stored as real spaces but looked up as "▁" runs.

BOS is prepended when the file says so (`add_bos_token`); it is done here, not by a tokenizers
post-processor, so `encode(..., add_bos=False)` can turn it off per call.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .binio import shown
from .errors import FallbackWarning, InputError, UnsupportedError
from .tensors import TokenizerSpec

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space "▁"
TOKEN_CONTROL = 3  # GGUF token_type codes (llama.cpp's llama_token_type)
TOKEN_USER_DEFINED = 4

GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})

# Pre-tokenizer splits by `tokenizer.ggml.pre` (llama.cpp's names). A name not known here is refused:
# another split gives other token ids than llama.cpp and transformers. PRETOKENIZER_ENV chooses one.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS: dict[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-tokenizers that split digits one by one before GPT-2's regex (SmolLM's tokenizer.json does
# this; llama.cpp's "smollm" pre-type too).
DIGIT_SPLIT_PRES = frozenset({"smollm"})
# GPT-2's own regex (what tokenizers' ByteLevel applies by itself). llama.cpp's "default" is not it.
GPT2_PRES = frozenset({"gpt-2", "gpt2"})
KNOWN_PRES = tuple(sorted({*PRE_SPLITS, *DIGIT_SPLIT_PRES, *GPT2_PRES}))
# The explicit choice of a split for a file whose pre-type is unknown or missing (overrides the file's).
PRETOKENIZER_ENV = "Q4K_PRETOKENIZER"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _derived_merges(tokens: Sequence[str], rank: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: for each token, every split into two vocabulary pieces.

    Sorted by the merged token's rank, best (largest) first, then by longer left piece, then
    longer right piece, then vocabulary order: transformers' `generate_merges` order, which decides
    ties between equally scored tokens.
    """
    vocab = set(tokens)
    found: list[tuple[float, int, int, str, str]] = []
    for tok, score in zip(tokens, rank):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                found.append((score, cut, len(tok) - cut, left, right))
    found.sort(key=lambda m: m[:3], reverse=True)  # stable: equal keys keep vocabulary order
    return [(m[3], m[4]) for m in found]


def _byte_level(spec: TokenizerSpec) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(tok: str) -> str:
        # A token outside the byte alphabet was written raw by the converter; look it up by bytes.
        return tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))

    vocab = {spelled(tok): i for i, tok in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in (spec.merges or [])]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    pre = _pre_type(spec)
    if pre in PRE_SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in DIGIT_SPLIT_PRES:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # GPT2_PRES
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # Control tokens written outside the byte alphabet are converter mislabels; keeping them out
    # keeps the vocabulary at the size the model expects.
    _add_special(tk, spec, lambda tok: set(tok) <= alphabet, vocab)
    return tk


def _pre_type(spec: TokenizerSpec) -> str:
    """The byte-level split to use: PRETOKENIZER_ENV if set, else the file's known pre-type.

    An unknown pre-type is refused; a file without one gets GPT-2's split with a warning (llama.cpp
    also loads such files, warning that their tokenization may be degraded)."""
    known = ", ".join(KNOWN_PRES)
    chosen = os.environ.get(PRETOKENIZER_ENV, "").strip()
    if chosen:
        if chosen not in KNOWN_PRES:
            raise InputError(f"{PRETOKENIZER_ENV}={shown(repr(chosen))} is not a pre-tokenizer q4k-engine knows ({known})")
        return chosen
    if spec.pre is None:
        warnings.warn(f"the model file names no tokenizer.ggml.pre: splitting text as GPT-2 does (token ids may "
                      f"differ from the model's own tokenizer); set {PRETOKENIZER_ENV} to choose ({known})",
                      FallbackWarning, stacklevel=4)
        return "gpt-2"
    if spec.pre not in KNOWN_PRES:
        raise UnsupportedError(f"tokenizer.ggml.pre {shown(repr(spec.pre))} is a pre-tokenizer q4k-engine does not know, so "
                               f"its token ids could differ from llama.cpp's; set {PRETOKENIZER_ENV} to one of "
                               f"{known} to choose the split explicitly")
    return spec.pre


def _sentencepiece(spec: TokenizerSpec, arch: str) -> Tokenizer:
    tokens = list(spec.tokens)
    gemma = arch in GEMMA_ARCHS
    if gemma:
        tokens = [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        rank: Sequence[float] = [-i for i in range(len(tokens))]
    else:
        if spec.scores is None or len(spec.scores) != len(tokens):
            raise UnsupportedError("SentencePiece tokenizer without one score per token")
        rank = spec.scores
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Only Gemma's tokenizer names an unknown token; with byte fallback it is almost never used.
    unk = "<unk>" if gemma and "<unk>" in vocab else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=_derived_merges(tokens, rank), dropout=None, fuse_unk=True,
                              byte_fallback=True, unk_token=unk))
    if gemma:
        # Gemma: every space becomes "▁", no space is prepended, no word splitting.
        tk.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
        tk.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tk.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence([
            decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ])
    _add_special(tk, spec, lambda tok: True, vocab)
    return tk


def _add_special(tk: Tokenizer, spec: TokenizerSpec, allowed, vocab: dict[str, int]) -> None:
    """Control tokens (chat markers, BOS/EOS) and user-defined ones (e.g. "\\n\\n" in Gemma) are
    matched whole in the raw text, before normalization, as llama.cpp does."""
    types = spec.token_types or []
    control = [AddedToken(tok, normalized=False, special=True)
               for tok, ty in zip(spec.tokens, types) if ty == TOKEN_CONTROL and allowed(tok)]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, ty in zip(spec.tokens, types) if ty == TOKEN_USER_DEFINED and tok in vocab]
    if user:
        tk.add_tokens(user)


def text_problem(text: object) -> str | None:
    """Why `text` cannot be tokenized (not a str, or not valid Unicode: JSON's "\\ud800" escapes give
    lone surrogates, which no UTF-8 tokenizer takes), or None."""
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate ({text[e.start]!r} at character {e.start}), not valid Unicode"
    return None


@dataclass
class TextTokenizer:
    """encode/decode for one model; `backend` is the underlying tokenizers.Tokenizer."""

    backend: Tokenizer
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.encode_batch([text], add_bos)[0]

    def encode_batch(self, texts: Iterable[str], add_bos: bool | None = None) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if (problem := text_problem(t)) is not None:
                raise InputError(f"text {i} {problem}")
        bos = self.add_bos if add_bos is None else add_bos
        prefix = [self.bos_id] if bos and self.bos_id is not None else []
        return [prefix + enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode_offsets(self, text: str, add_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's character span [start, end) in `text` (BOS: (0, 0)).

        Several tokens share one span where a character is split into byte tokens; chat rendering
        uses the spans to tell which tokens came from which part of the rendered conversation."""
        if (problem := text_problem(text)) is not None:
            raise InputError(f"text {problem}")
        bos = self.add_bos if add_bos is None else add_bos
        enc = self.backend.encode(text, add_special_tokens=False)
        if bos and self.bos_id is not None:
            return [self.bos_id, *enc.ids], [(0, 0), *enc.offsets]
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """One token as text, for printouts: decoded alone, special tokens kept; a token that is
        only part of a UTF-8 character shows as its vocabulary piece (e.g. "<0xE2>")."""
        text = self.backend.decode([int(token_id)], skip_special_tokens=False)
        return self.backend.id_to_token(int(token_id)) if "\ufffd" in text else text


def build_tokenizer(spec: TokenizerSpec, arch: str) -> TextTokenizer:
    """The TextTokenizer of a model file's embedded tokenizer; `arch` is ModelConfig.arch."""
    if spec.model == "gpt2":
        backend = _byte_level(spec)
    elif spec.model == "llama":
        backend = _sentencepiece(spec, arch)
    else:
        raise UnsupportedError(f"tokenizer model {spec.model!r} (supported: 'gpt2', 'llama')")
    return TextTokenizer(backend, len(spec.tokens), spec.bos_id, spec.eos_id, spec.add_bos)
