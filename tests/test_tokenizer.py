"""engine/tokenizer.py: ids identical to transformers' tokenizer built from the same GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), on both real models and a synthetic one."""
from __future__ import annotations

import dataclasses

import pytest

from q4k_engine.errors import InputError, UnsupportedError
from q4k_engine.loader import open_model
from q4k_engine.synthetic import write_synthetic
from q4k_engine.tokenizer import build_tokenizer

from realmodels import gemma_path, smollm_path

PROMPTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Digits: 0 7 42 1234567890 3.14159 -273.15 1e-9 2026-11-28",
    "Whitespace runs:   three spaces,\ttab,\t\ttwo tabs,    four spaces   ",
    "Lines\n\nwith\r\nbreaks\n\n\n and trailing\n",
    "Unicode: naïve café — 日本語のテキスト, Привет мир, ℕ ⊆ ℤ, emoji 🤗🚀 and a ZWJ 👩‍💻",
    "    def f(x):\n        return x ** 2  # comment\n",
    "don't won't I'm we'll they're it's",
    " leading space and <b>html</b> &amp; entities",
    "<start_of_turn>user\nhi<end_of_turn>\n<|im_start|>assistant\nok<|im_end|>",
    "",
    "a",
]


def hf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def ours_for(path):
    model = open_model(path)
    return build_tokenizer(model.tokenizer, model.config.arch)


def check_same_ids(ours, hf, prompts):
    for p in prompts:
        expected = hf(p)["input_ids"]
        assert ours.encode(p) == expected, f"prompt {p!r}"
        assert ours.decode(expected, skip_special=True) == hf.decode(expected, skip_special_tokens=True), p
    assert [ours.encode(p) for p in prompts] == ours.encode_batch(prompts)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_real_model_ids_match_transformers(which):
    path = smollm_path() if which == "smollm" else gemma_path()
    ours = ours_for(path)
    check_same_ids(ours, hf_tokenizer(path), PROMPTS)
    text = "Round trip: naïve 日本語 🤗  spaces\n\nand lines"
    assert ours.decode(ours.encode(text), skip_special=True) == text
    if which == "gemma":
        assert ours.add_bos and ours.encode("x")[0] == ours.bos_id == 2
        assert ours.encode("<start_of_turn>user", add_bos=False)[0] == 105  # control tokens stay whole
        assert ours.token_text(ours.encode("日本", add_bos=False)[0]) != "\ufffd"
    else:
        assert not ours.add_bos
        assert ours.encode("<|im_start|>") == [1]


def test_synthetic_byte_level_matches_transformers(tmp_path, rng):
    path = write_synthetic(tmp_path / "m.gguf", "llama", "gguf", seed=int(rng.integers(2**31)))
    ours = ours_for(path)
    check_same_ids(ours, hf_tokenizer(path), PROMPTS)


def test_pre_tokenizer_follows_ggml_pre(tmp_path):
    model = open_model(write_synthetic(tmp_path / "m.gguf", "llama", "gguf"))

    def pieces(pre: str, text: str) -> list[str]:
        tok = build_tokenizer(dataclasses.replace(model.tokenizer, pre=pre), "llama")
        return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]

    assert pieces("llama-bpe", "12345") == ["123", "45"]  # llama3: digits in groups of three
    assert pieces("qwen2", "12345") == ["1", "2", "3", "4", "5"]
    assert pieces("smollm", "12345") == ["1", "2", "3", "4", "5"]
    assert pieces("gpt-2", "12345") == ["12345"]


def test_errors(tmp_path):
    model = open_model(write_synthetic(tmp_path / "m.gguf", "llama", "gguf"))
    with pytest.raises(UnsupportedError, match="tokenizer model 'bert'"):
        build_tokenizer(dataclasses.replace(model.tokenizer, model="bert"), "llama")
    with pytest.raises(UnsupportedError, match="score"):
        build_tokenizer(dataclasses.replace(model.tokenizer, model="llama", scores=None), "llama")
    tok = build_tokenizer(model.tokenizer, "llama")
    with pytest.raises(InputError, match="text 1 is a int"):
        tok.encode_batch(["ok", 5])


def test_sentencepiece_llama_vocabulary_matches_transformers(tmp_path, rng):
    """A llama-style SentencePiece vocabulary (scores, byte fallback, no merges in the file)."""
    from q4k_engine.convert import save_model
    from q4k_engine.synthetic import synthetic_model
    from q4k_engine.tensors import TokenizerSpec

    model = synthetic_model("llama", seed=int(rng.integers(2**31)))
    words = ["▁the", "▁a", "▁quick", "▁brown", "▁fox", "▁dog", "▁lazy", "▁over", "▁jumps", "ing", "▁th", "he",
             "▁t", "qu", "ick", "ow", "br", "▁b", "▁d", "og", "▁l", "az", "▁o", "ver", "▁j", "um", "ps", "▁f", "ox",
             "in", "ng", "▁▁", "▁▁▁▁", "er", "▁q", "ro", "own", "ump"]
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz.,!'"))
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = chars + list(dict.fromkeys(words))
    tokens = specials + byte_tokens + pieces
    assert len(tokens) <= model.config.vocab_size
    tokens += [f"<extra_{i}>" for i in range(model.config.vocab_size - len(tokens))]
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    rng.shuffle(scores[259:259 + len(pieces)])  # merge priority independent of file order
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    spec = TokenizerSpec(model="llama", tokens=tokens, scores=scores, token_types=types, bos_id=1, eos_id=2,
                         add_bos=True, pre="default")
    path = save_model(tmp_path / "spm.gguf", dataclasses.replace(model, tokenizer=spec), "gguf")
    ours = ours_for(path)
    prompts = ["the quick brown fox jumps over the lazy dog", "  two leading spaces", "jumping!! über 日本",
               "over\nthe  lazy\tdog's", "thequickbrownfox", ""]
    check_same_ids(ours, hf_tokenizer(path), prompts)
