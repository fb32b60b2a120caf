"""distill/chat.py: chat templates rendered exactly as transformers' apply_chat_template renders them
(text, ids and assistant masks compared with transformers on the same template string and the same
tokenizer), assistant spans without {% generation %} blocks, and one-line errors."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import numpy as np
import pytest

from q4k_engine.distill.chat import ChatTemplate, encode_chat, model_chat_template, token_mask
from q4k_engine.errors import InputError
from q4k_engine.loader import open_model
from q4k_engine.synthetic import CHAT_TEMPLATE, synthetic_model
from q4k_engine.tokenizer import build_tokenizer

from distill_data import WORDS
from realmodels import gemma_path, smollm_path

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<sys>\\nYou are a helpful assistant' + eos_token + '\\n' }}{% endif %}"
    "{{ '<' + message['role'] + '>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}"
)
# Written over several lines with indentation: trim_blocks and lstrip_blocks decide the output.
FEATURES = """{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ message['role'] }} {{ ns.turns }}]
    {% if message.reasoning_content is defined %}(thinking: {{ message.reasoning_content }}) {% endif %}
    {{ message['content'] | trim }}
    {% if message.meta is defined %} {{ message.meta | tojson }}{% endif %}
    {% if 'name' in message %} by {{ message.name }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}[assistant {{ ns.turns + 1 }}]{% endif %}
{{ dict(k=1, a='x') | tojson(sort_keys=True) }} {{ dict.fromkeys(['u', 'v'], 0) | tojson }} {{ strftime_now('%Y') }}
"""
# TRL-style: the generated text (answer and end-of-turn token) is marked for the assistant mask.
GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'assistant: ' }}{% generation %}"
    "{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
ALTERNATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def demo():
    model = synthetic_model("llama")
    tok = build_tokenizer(model.tokenizer, model.config.arch)
    spec = model.tokenizer
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=spec.tokens[spec.bos_id],
                                              eos_token=spec.tokens[spec.eos_id])
    return model, tok, hf


def sentence(rng, lo=1, hi=12) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(lo, hi))))


def conversation(rng, turns: int, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": sentence(rng)}] if system else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng)}]
    return msgs


def template_for(model, source: str) -> ChatTemplate:
    return model_chat_template(model, source)


@pytest.mark.parametrize("name", ["demo", "chatml", "features", "generation", "alternate"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_text_and_ids_match_transformers(demo, rng, name, add_generation_prompt):
    model, tok, hf = demo
    source = {"demo": CHAT_TEMPLATE, "chatml": CHATML, "features": FEATURES, "generation": GENERATION,
              "alternate": ALTERNATE}[name]
    template = template_for(model, source)
    for turns in (1, 2, 3):
        msgs = conversation(rng, turns, system=name not in ("alternate",) and turns == 2)
        if add_generation_prompt:
            msgs = msgs[:-1]
        text = template.render(msgs, add_generation_prompt=add_generation_prompt).text
        expected = hf.apply_chat_template(msgs, chat_template=source, add_generation_prompt=add_generation_prompt,
                                          tokenize=False)
        assert text == expected
        ids, _ = encode_chat(template, tok, msgs, add_generation_prompt=add_generation_prompt)
        assert ids == hf.apply_chat_template(msgs, chat_template=source, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=False)


def test_features_template_details_match_transformers(demo):
    """None values dropped, reasoning aliased, tool messages skipped by {% continue %}, tojson keeps
    non-ASCII and HTML characters, dict() and namespace work, trim/lstrip of blocks."""
    model, tok, hf = demo
    msgs = [
        {"role": "system", "content": "  Be brief.  ", "name": None},
        {"role": "user", "content": " Hi <b>&</b> 日本 ", "meta": {"k": "ü<>&'", "n": [1, 2.5, None]}, "name": "ann"},
        {"role": "tool", "content": "skipped"},
        {"role": "assistant", "content": "ok", "reasoning": "because"},
    ]
    text = template_for(model, FEATURES).render(msgs, add_generation_prompt=True).text
    assert text == hf.apply_chat_template(msgs, chat_template=FEATURES, add_generation_prompt=True, tokenize=False)
    # Lines holding only block tags vanish (lstrip_blocks + trim_blocks); text lines keep their indentation.
    year = datetime.now().strftime("%Y")
    assert text.replace(year, "YEAR") == (
        '<|begin_of_text|>\n    [system 1]\n    Be brief.\n\n    [user 2]\n    Hi <b>&</b> 日本\n'
        ' {"k": "ü<>&\'", "n": [1, 2.5, null]} by ann\n    [assistant 3]\n(thinking: because)     ok\n\n'
        '[assistant 4]{"a": "x", "k": 1} {"u": 0, "v": 0} YEAR')


def assert_mask_is_transformers(template, tok, hf, msgs):
    """Our ids and assistant mask of msgs equal transformers' own with the tagged GENERATION template;
    returns the mask."""
    ids, mask = encode_chat(template, tok, msgs, assistant_mask=True)
    out = hf.apply_chat_template(msgs, chat_template=GENERATION, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert mask.astype(int).tolist() == out["assistant_masks"]
    return mask


def test_generation_blocks_give_transformers_assistant_mask(demo, rng):
    model, tok, hf = demo
    template = template_for(model, GENERATION)
    assert template.has_generation_blocks
    for turns in (1, 2, 3):
        mask = assert_mask_is_transformers(template, tok, hf, conversation(rng, turns, system=turns == 3))
        assert mask.sum() > turns  # every answer and its end-of-turn token


def test_prefix_spans_equal_generation_blocks(demo, rng):
    """Without {% generation %} the spans come from rendering prefix by prefix; on the same template
    (the tags removed) they mark exactly the tokens transformers marks with the tags."""
    model, tok, hf = demo
    untagged = GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    template = template_for(model, untagged)
    assert not template.has_generation_blocks
    for turns in (1, 2, 3):
        assert_mask_is_transformers(template, tok, hf, conversation(rng, turns, system=turns == 2))


def test_two_turn_assistant_mask_token_by_token(demo, rng):
    """The demo template, a 2-turn chat of ASCII words: each token's text is known by decoding it
    alone, so which tokens are the answers (and their EOS) is found without the tokenizer's offsets."""
    model, tok, _ = demo
    eos = model.tokenizer.tokens[model.tokenizer.eos_id]
    ascii_words = [w for w in WORDS if w.isascii()]
    msgs = []
    for _ in range(2):
        for role in ("user", "assistant"):
            msgs.append({"role": role, "content": " ".join(rng.choice(ascii_words, int(rng.integers(1, 8))))})
    ids, mask = encode_chat(template_for(model, CHAT_TEMPLATE), tok, msgs, assistant_mask=True)
    pieces = [tok.backend.decode([i], skip_special_tokens=False) for i in ids]
    text = "".join(pieces)
    assert text == template_for(model, CHAT_TEMPLATE).render(msgs).text
    spans, pos = [], 0
    for m in msgs:  # "role: content<EOS>\n"
        start = text.index(f"{m['role']}: {m['content']}{eos}\n", pos) + len(m["role"]) + 2
        pos = start + len(m["content"]) + len(eos)
        if m["role"] == "assistant":
            spans.append((start, pos))
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - [len(p) for p in pieces]
    expected = [any(s < e1 and e > s1 for s1, e1 in spans) for s, e in zip(starts, ends)]
    assert mask.tolist() == expected
    eos_positions = [j for j, i in enumerate(ids) if i == model.tokenizer.eos_id]
    assert [mask[j] for j in eos_positions] == [False, True, False, True]  # the answers' EOS only
    assert not mask[0] and pieces[0] == model.tokenizer.tokens[model.tokenizer.bos_id]
    # No token of the first user turn or of the "assistant: " header, except the header's last space
    # where the tokenizer joins it to the answer's first word (that token is the answer's).
    first = int(np.argmax(mask))
    assert ends[first] > spans[0][0] and starts[first] <= spans[0][0] and starts[first] >= spans[0][0] - 1


def test_tools_and_documents_are_none_unless_given(demo):
    model, _, hf = demo
    source = "{% if tools is not none %}T{{ tools | length }}{% endif %}{% if documents is none %}D{% endif %}{{ x }}"
    msgs = [{"role": "user", "content": "x"}]
    assert template_for(model, source).render(msgs).text == hf.apply_chat_template(
        msgs, chat_template=source, tokenize=False) == "D"
    assert template_for(model, source).render(msgs, tools=[{"a": 1}], x=5).text == "T1D5"


def test_token_mask_overlap_rule():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert token_mask(offsets, [(4, 9)]).tolist() == [False, False, True, True, False, False]
    assert token_mask(offsets, [(0, 3), (9, 12)]).tolist() == [False, True, False, False, False, True]
    assert token_mask(offsets, []).tolist() == [False] * 6


def test_template_errors_are_one_line(demo):
    model, tok, _ = demo
    alternate = template_for(model, ALTERNATE)
    with pytest.raises(InputError, match=r"refused the conversation: Conversation roles must alternate"):
        alternate.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(InputError, match=r"the given chat template: the chat template does not compile: .*line 1"):
        template_for(model, "{% for m in messages %}{{ m }")
    with pytest.raises(InputError, match="SecurityError|refused"):  # the sandbox: inputs cannot be changed
        template_for(model, "{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="underscore"):
        template_for(model, "{% set ns = namespace(_x=1) %}{{ ns }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(InputError, match="failed on the conversation: TypeError"):
        template_for(model, CHAT_TEMPLATE).render([{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(InputError, match="empty"):
        template_for(model, "  ")
    # A template that abbreviates earlier turns once later ones follow has no stable prefix spans.
    abbreviating = ("{% for m in messages %}{% if loop.last %}{{ m.role + ': ' + m.content + '\\n' }}"
                    "{% else %}{{ m.role + '~\\n' }}{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert template_for(model, abbreviating).render(msgs).text == "user~\nassistant~\nuser~\nassistant: d\n"
    with pytest.raises(InputError, match=r"cannot find assistant message 1 .*\{% generation %\}"):
        encode_chat(template_for(model, abbreviating), tok, msgs, assistant_mask=True)


def test_model_without_template_is_one_line():
    model = synthetic_model("llama")
    bare = dataclasses.replace(model, tokenizer=dataclasses.replace(model.tokenizer, chat_template=None))
    with pytest.raises(InputError, match=r"synthetic-llama: chat messages need a chat template, and the model file "
                                         r"has none \(no tokenizer.chat_template\); give one explicitly"):
        model_chat_template(bare)
    assert model_chat_template(bare, CHATML).source == CHATML
    with pytest.raises(InputError, match="carries none"):
        model_chat_template(dataclasses.replace(model, tokenizer=None))


def test_read_chat_template_file(tmp_path):
    from q4k_engine.distill.chat import read_chat_template

    (tmp_path / "t.jinja").write_text(CHATML, encoding="utf-8")
    assert read_chat_template(tmp_path / "t.jinja") == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": ALTERNATE}))
    assert read_chat_template(tmp_path / "tokenizer_config.json") == ALTERNATE
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": GENERATION}]
    (tmp_path / "named.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(tmp_path / "named.json") == GENERATION
    (tmp_path / "none.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(InputError, match=r'none.json: no "default" among the named chat templates \(tool_use\)'):
        read_chat_template(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(InputError, match=r'bad.json: not a JSON object with a "chat_template"'):
        read_chat_template(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(InputError, match=r'empty.json: no "chat_template" string in it'):
        read_chat_template(tmp_path / "empty.json")
    with pytest.raises(InputError, match="missing.jinja: no such chat template file"):
        read_chat_template(tmp_path / "missing.jinja")


def test_teacher_apply_chat_template(tmp_path):
    import q4k_engine
    from q4k_engine.synthetic import write_synthetic

    teacher = q4k_engine.load(write_synthetic(tmp_path / "m.apr", "llama"), device="cpu")
    msgs = [{"role": "user", "content": "Where does the ferry go?"}]
    text = teacher.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|begin_of_text|>user: Where does the ferry go?<|end_of_text|>\nassistant: "
    ids = teacher.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids == teacher.encode(text, add_bos=False) and ids[0] == teacher.model.tokenizer.bos_id
    assert ids.count(teacher.model.tokenizer.bos_id) == 1  # the template writes BOS; it is not added twice
    with pytest.raises(InputError, match='"role" must be a non-empty string'):
        teacher.apply_chat_template([{"content": "x"}])
    assert teacher.apply_chat_template(msgs, tokenize=False, chat_template=CHATML, eos_token="</s>") == (
        "<sys>\nYou are a helpful assistant</s>\n<user>\nWhere does the ferry go?</s>\n")
    with pytest.raises(InputError, match="unknown role robot"):
        teacher.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.slow
def test_smollm2_own_template_matches_transformers(rng):
    """The real SmolLM2 file's template and tokenizer against transformers loading the same GGUF."""
    path = smollm_path()
    model = open_model(path)
    assert model.tokenizer.chat_template and "<|im_start|>" in model.tokenizer.chat_template
    tok = build_tokenizer(model.tokenizer, model.config.arch)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = model_chat_template(model)
    for turns, system in ((1, False), (2, True)):
        msgs = conversation(rng, turns, system)
        for agp in (False, True):
            m = msgs[:-1] if agp else msgs
            assert template.render(m, add_generation_prompt=agp).text == hf.apply_chat_template(
                m, add_generation_prompt=agp, tokenize=False)
            assert encode_chat(template, tok, m, add_generation_prompt=agp)[0] == hf.apply_chat_template(
                m, add_generation_prompt=agp, tokenize=True, return_dict=False)
        ids, mask = encode_chat(template, tok, msgs, assistant_mask=True)
        # Token by token: "<|im_start|>assistant\n" is the prompt header, the answer and <|im_end|> are
        # targets, the line break after <|im_end|> is not.
        im_start, im_end = (model.tokenizer.tokens.index(t) for t in ("<|im_start|>", "<|im_end|>"))
        starts = [j for j, i in enumerate(ids) if i == im_start]
        for s, nxt in zip(starts, starts[1:] + [len(ids)]):
            end = s + ids[s:nxt].index(im_end)
            role = tok.decode(ids[s + 1:end]).split("\n")[0]
            if role == "assistant":
                header = len(tok.encode("<|im_start|>assistant\n", add_bos=False))
                assert not mask[s:s + header].any() and mask[s + header:end + 1].all() and not mask[end + 1:nxt].any()
            else:
                assert not mask[s:nxt].any()
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert tok.decode([i for i, k in zip(ids, mask) if k]) == "".join(a + "<|im_end|>" for a in answers)


@pytest.mark.slow
def test_gemma3_has_no_template_and_takes_one_given(rng):
    """Gemma 3 270M's GGUF carries no chat template: messages are refused in one line. A Gemma-style
    template given explicitly renders the text transformers' renderer gives (with the file's BOS/EOS
    text); the ids are then our Gemma tokenizer's, which test_tokenizer holds equal to transformers'
    (loading the GGUF in transformers costs two minutes, so it is not done again here)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    path = gemma_path()
    model = open_model(path)
    assert model.tokenizer.chat_template is None
    with pytest.raises(InputError, match=r"gemma-3-270m-q4_k_m.gguf: chat messages need a chat template"):
        model_chat_template(model)
    template = model_chat_template(model, ALTERNATE)
    msgs = conversation(rng, 2)
    (expected,), _ = render_jinja_template([msgs], chat_template=ALTERNATE, bos_token="<bos>", eos_token="<eos>")
    assert template.render(msgs).text == expected and expected.startswith("<bos><start_of_turn>user\n")
    tok = build_tokenizer(model.tokenizer, model.config.arch)
    ids, mask = encode_chat(template, tok, msgs, assistant_mask=True)
    assert ids == tok.encode(expected, add_bos=False)
    assert ids[0] == 2 and ids.count(2) == 1 and ids.count(105) == 4  # <bos> once, <start_of_turn> whole
    answers = [m["content"].strip() for m in msgs if m["role"] == "assistant"]
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "".join(a + "<end_of_turn>" for a in answers)
