"""distill/rows.py: JSONL and Parquet rows of every kind, truncation, the context limit, every kind of
bad row named by file:line (or skipped and counted), streaming, and length batching."""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from q4k_engine.distill import RowOptions, RowStats, length_batches, read_rows
from q4k_engine.distill.chat import encode_chat, model_chat_template
from q4k_engine.errors import InputError
from q4k_engine.synthetic import synthetic_model
from q4k_engine.tokenizer import build_tokenizer

from distill_data import mixed_rows, write_jsonl

SCHEMA = pa.schema([
    ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
])


@pytest.fixture(scope="module")
def model():
    return synthetic_model("llama", context_length=512)


@pytest.fixture(scope="module")
def tok(model):
    return build_tokenizer(model.tokenizer, model.config.arch)


def expected_ids(model, tok, row: dict) -> list[int]:
    if "text" in row:
        return tok.encode(row["text"])
    if "input_ids" in row:
        return row["input_ids"]
    return encode_chat(model_chat_template(model), tok, row["messages"])[0]


def write_parquet(path, rows, schema=SCHEMA, row_group_size=7):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def read_all(path, model, **options):
    stats = RowStats()
    return list(read_rows(path, model, RowOptions(**options), stats)), stats


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
def test_every_row_kind(tmp_path, model, tok, rng, fmt):
    rows = mixed_rows(30, model.config.vocab_size, int(rng.integers(1 << 31)))
    if fmt == "parquet":
        path = write_parquet(tmp_path / "d.parquet", rows)
    else:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        if fmt == "jsonl.gz":
            path = tmp_path / "d.jsonl.gz"
            path.write_bytes(gzip.compress((tmp_path / "d.jsonl").read_bytes()))
    out, stats = read_all(path, model)
    assert [r.index for r in out] == list(range(30))
    for r, row in zip(out, rows):
        assert r.input_ids.dtype == np.int32 and r.target_mask.dtype == bool
        assert r.input_ids.tolist() == expected_ids(model, tok, row)
        assert r.target_mask.tolist() == [True] * (len(r.input_ids) - 1) + [False]
        assert not r.truncated
    assert out[4].where == (f"{path}:row 4" if fmt == "parquet" else f"{path}:5")
    assert out[0].input_ids[0] == model.tokenizer.bos_id  # text rows: BOS as the file asks
    assert out[1].input_ids.tolist() == rows[1]["input_ids"]  # ids rows: as given, nothing added
    assert stats.rows == 30 and stats.tokens == sum(len(r.input_ids) for r in out)
    assert stats.targets == stats.tokens - 30 and stats.truncated == stats.skipped_bad == 0


def test_add_bos_option_and_extra_keys(tmp_path, model, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The ferry", "id": 7, "source": None}])
    (r,), _ = read_all(path, model, add_bos=False)
    assert r.input_ids.tolist() == tok.encode("The ferry", add_bos=False)


def test_truncation_is_counted(tmp_path, model, rng):
    rows = [{"input_ids": rng.integers(0, 400, n).tolist()} for n in (5, 40, 41, 200, 1)]
    out, stats = read_all(write_jsonl(tmp_path / "d.jsonl", rows), model, max_seq_len=40)
    assert [len(r.input_ids) for r in out] == [5, 40, 40, 40, 1]
    assert [r.truncated for r in out] == [False, False, True, True, False] and stats.truncated == 2
    for r, row in zip(out, rows):
        assert r.input_ids.tolist() == row["input_ids"][:40]
        assert r.target_mask.tolist() == [True] * (len(r.input_ids) - 1) + [False]  # the cut token is no target
    assert "2 rows truncated" in stats.summary()


def test_context_length_is_an_error_naming_the_line(tmp_path, model):
    rows = [{"input_ids": [1] * 512}, {"text": "ok"}, {"input_ids": [2] * 513}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=rf"^{path}:3: 513 tokens, more than the model's context length \(512\); "
                                         "truncate with --max-seq-len$"):
        read_all(path, model)
    out, stats = read_all(path, model, max_seq_len=512)
    assert len(out[2].input_ids) == 512 and stats.truncated == 1
    with pytest.raises(InputError, match=r"--max-seq-len 513 is more than synthetic-llama's context length \(512\)"):
        read_rows(path, model, RowOptions(max_seq_len=513))  # refused at the call, before any row
    with pytest.raises(InputError, match="--max-seq-len must be a positive integer"):
        read_rows(path, model, RowOptions(max_seq_len=0))


def test_assistant_only_targets_the_answers(tmp_path, model, tok):
    messages = [{"role": "user", "content": "Where does the ferry go?"},
                {"role": "assistant", "content": "To the south bank."},
                {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "At seven."}]
    (r,), stats = read_all(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), model, assistant_only=True)
    ids, assistant = encode_chat(model_chat_template(model), tok, messages, assistant_mask=True)
    assert r.input_ids.tolist() == ids
    assert r.target_mask.tolist() == assistant[1:].tolist() + [False]  # position t targets token t+1
    # what is trained on is exactly each answer and its end-of-turn token
    targets = [int(r.input_ids[t + 1]) for t in np.flatnonzero(r.target_mask)]
    # (the space before an answer is its first token's or the header's, as the tokenizer splits it)
    assert re.fullmatch(r" ?To the south bank\.<\|end_of_text\|> ?At seven\.<\|end_of_text\|>", tok.decode(targets))
    assert stats.targets == len(targets)
    # truncated inside the second answer: only what is left of it is a target
    cut = ids.index(model.tokenizer.eos_id, ids.index(model.tokenizer.eos_id) + 3) + 4
    (r,), _ = read_all(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), model, assistant_only=True,
                       max_seq_len=cut)
    assert r.truncated and r.target_mask.tolist() == assistant[1:cut].tolist() + [False]


# --- bad input -------------------------------------------------------------------------------------

BAD_JSONL = [  # (line, reason pattern)
    ('{"text": "ok"', r"not JSON: Expecting ',' delimiter \(column 14\)"),
    ("[1, 2]", r'expected a JSON object with one of "text", "input_ids" or "messages", got a list'),
    ('{"text": 5}', r'"text" must be a string, got a number'),
    ('{"text": ""}', r'empty "text"'),
    ('{"input_ids": "1,2"}', r'"input_ids" must be a list of integers, got a string'),
    ('{"input_ids": []}', r'empty "input_ids"'),
    ('{"input_ids": [1, 2.0]}', r'"input_ids" position 1: 2.0 is not an integer token id'),
    ('{"input_ids": [true]}', r'"input_ids" position 0: true is not an integer token id'),
    ('{"input_ids": [1, [2]]}', r'"input_ids" position 1: \[2\] is not an integer token id'),
    ('{"input_ids": [3, -1]}', r'"input_ids" position 1: token id -1 is outside the vocabulary \[0, VOCAB\)'),
    ('{"input_ids": [1, 99999999999999999999999]}', r'position 1: token id 99999999999999999999999 is outside'),
    ('{"input_ids": [VOCAB]}', r'"input_ids" position 0: token id VOCAB is outside the vocabulary \[0, VOCAB\)'),
    ('{"text": "a", "messages": [{"role": "user", "content": "b"}]}',
     r'mixed row kinds: both "text" and "messages"; give one per row'),
    ('{"text": "a", "input_ids": [1]}', r'mixed row kinds: both "text" and "input_ids"'),
    ("{}", r'empty row: no "text", "input_ids" or "messages"$'),
    ('{"prompt": "x", "text": null}', r"empty row: no .* \(keys: 'prompt'\)"),
    ('{"text": "a\\ud800b"}', r'"text" holds a lone surrogate \(.\\ud800. at character 1\), not valid Unicode'),
    ('{"messages": [{"role": "user", "content": "\\udfff"}]}', r"the rendered conversation holds a lone surrogate"),
    ('{"messages": []}', r'"messages" is empty'),
    ('{"messages": {"role": "user"}}', r'"messages" must be a list of \{"role", "content"\} objects, got an object'),
    ('{"messages": ["hi"]}', r'message 0 must be an object with "role" and "content", got a string'),
    ('{"messages": [{"content": "x"}]}', r'message 0: "role" must be a non-empty string, got null'),
    ('{"messages": [{"role": "user"}]}', r'message 0 \(user\): no "content"'),
    ('{"messages": [{"role": "user", "content": 3}]}', r'message 0 \(user\): "content" must be a string or a list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}',
     r"the chat template refused the conversation: unknown role robot \(use system, user or assistant\)"),
]


@pytest.mark.parametrize("line,reason", BAD_JSONL, ids=[b[0][:30] for b in BAD_JSONL])
def test_bad_jsonl_row_names_file_and_line(tmp_path, model, rng, line, reason):
    vocab = model.config.vocab_size
    line, reason = line.replace("VOCAB", str(vocab)), reason.replace("VOCAB", str(vocab))
    good = [json.dumps({"text": "fine"}), json.dumps({"input_ids": [1, 2]})]
    at = int(rng.integers(0, 3))  # the bad line's position among the good ones
    lines = good[:at] + [line] + good[at:]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_all(path, model)
    assert str(err.value).startswith(f"{path}:{at + 1}: ") and "\n" not in str(err.value)
    assert re.search(reason, str(err.value)), str(err.value)
    out, stats = read_all(path, model, skip_bad_lines=True)
    assert stats.skipped_bad == 1 and stats.rows == 2 and stats.bad == [str(err.value)]
    assert [r.index for r in out] == [i for i in range(3) if i != at]  # indices do not shift


def test_json_array_file_gets_a_hint(tmp_path, model):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(InputError, match=rf"^{path}:1: not JSON: Expecting value \(column 2\) \(expected one JSON "
                                         r"object per line, not a JSON array\)$"):
        read_all(path, model)


def test_bad_utf8_blank_lines_and_bom(tmp_path, model):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n\n   \n{"text": "caf\xe9"}\r\n{"text": "last"}\r\n')
    with pytest.raises(InputError, match=rf"^{path}:4: not UTF-8: byte 0xe9 at column 14$"):
        read_all(path, model)
    out, stats = read_all(path, model, skip_bad_lines=True)
    assert [r.where for r in out] == [f"{path}:1", f"{path}:5"] and [r.index for r in out] == [0, 2]
    assert stats.blank_lines == 2 and stats.skipped_bad == 1


def test_skip_bad_lines_counts_and_reports(tmp_path, model):
    lines = ['{"text": "a"}', "oops", '{"input_ids": [-5]}', '{"text": "b"}', "{}"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out, stats = read_all(path, model, skip_bad_lines=True)
    assert [r.index for r in out] == [0, 3] and stats.rows == 2 and stats.skipped_bad == 3
    assert [b.split(": ")[0] for b in stats.bad] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert stats.summary().startswith("2 rows, ") and f"3 bad rows skipped (first: {path}:2: not JSON" in stats.summary()
    path.write_text("oops\n{}\n")
    with pytest.raises(InputError, match=rf"^{path}: no rows \(2 bad rows skipped; first: {path}:1: not JSON"):
        read_all(path, model, skip_bad_lines=True)
    path.write_text("\n\n")
    with pytest.raises(InputError, match=rf"^{path}: no rows$"):
        read_all(path, model)


def test_assistant_only_needs_chat_rows(tmp_path, model):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ])
    with pytest.raises(InputError, match=rf'^{path}:2: a "text" row has no assistant turns \(--assistant-only'):
        read_all(path, model, assistant_only=True)
    out, stats = read_all(path, model, assistant_only=True, skip_bad_lines=True)
    assert [r.index for r in out] == [0] and stats.skipped_bad == 2
    assert stats.bad[1] == f"{path}:3: no assistant tokens in the rendered conversation (--assistant-only)"


def test_model_problems_are_not_skipped(tmp_path, model):
    """Messages without a chat template, or text without a tokenizer: the model's problem, raised
    at the first such row even with skip_bad_lines."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1]}, {"messages": [{"role": "user", "content": "x"}]}])
    bare = dataclasses.replace(model, tokenizer=dataclasses.replace(model.tokenizer, chat_template=None))
    with pytest.raises(InputError, match=rf"^{path}:2: synthetic-llama: chat messages need a chat template, and the "
                                         r"model file has none \(no tokenizer.chat_template\)"):
        read_all(path, bare, skip_bad_lines=True)
    out, _ = read_all(path, bare, chat_template="{{ messages[0]['content'] }}")  # given explicitly
    assert len(out) == 2
    path = write_jsonl(tmp_path / "t.jsonl", [{"input_ids": [1]}, {"text": "x"}])
    with pytest.raises(InputError, match=rf"^{path}:2: synthetic-llama: text and chat rows need the model's tokenizer"):
        read_all(path, dataclasses.replace(model, tokenizer=None), skip_bad_lines=True)
    (r,), _ = read_all(write_jsonl(tmp_path / "i.jsonl", [{"input_ids": [1, 2]}]), dataclasses.replace(model, tokenizer=None))
    assert r.input_ids.tolist() == [1, 2]  # ids rows need no tokenizer


def test_files_refused_before_any_row(tmp_path, model):
    with pytest.raises(InputError, match=r"missing.jsonl: no such input file"):
        read_rows(tmp_path / "missing.jsonl", model)
    with pytest.raises(InputError, match=r"missing.parquet: no such input file"):
        read_rows(tmp_path / "missing.parquet", model)
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(InputError, match=r"d.csv: unknown dataset type '.csv' \(use .jsonl"):
        read_rows(tmp_path / "d.csv", model)
    (tmp_path / "d.parquet").write_text('{"text": "x"}\n')
    with pytest.raises(InputError, match=r"d.parquet: not a readable Parquet file"):
        read_rows(tmp_path / "d.parquet", model)


@pytest.mark.parametrize("schema,reason", [
    (pa.schema([("text", pa.int64())]), r"column 'text' is int64, expected string"),
    (pa.schema([("input_ids", pa.list_(pa.float32()))]), r"column 'input_ids' is list<\w+: float>, expected list<integer>"),
    (pa.schema([("messages", pa.list_(pa.string()))]), r"column 'messages' is list<\w+: string>, expected list<struct"),
    (pa.schema([("messages", pa.list_(pa.struct([("role", pa.string())])))]), r"column 'messages' is .*\(the structs need role and content\)"),
    (pa.schema([("prompt", pa.string())]), r'no "text", "input_ids" or "messages" column \(columns: prompt\)'),
])
def test_bad_parquet_schema(tmp_path, model, schema, reason):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=schema), path)
    with pytest.raises(InputError, match=rf"^{path}: {reason}"):
        read_rows(path, model)


def test_bad_parquet_rows_name_the_row(tmp_path, model):
    vocab = model.config.vocab_size
    rows = [{"text": "ok"}, {"input_ids": [1, vocab]}, {"text": "x", "input_ids": [1]}, {},
            {"messages": [{"role": "user", "content": None}]}, {"text": ""}, {"text": "fine"}]
    path = write_parquet(tmp_path / "d.parquet", rows, row_group_size=2)
    with pytest.raises(InputError, match=rf"^{path}:row 1: \"input_ids\" position 1: token id {vocab} is outside"):
        read_all(path, model)
    out, stats = read_all(path, model, skip_bad_lines=True)
    assert [r.index for r in out] == [0, 6] and stats.skipped_bad == 5
    assert [b.split(": ", 1)[1] for b in stats.bad[1:]] == [
        'mixed row kinds: both "text" and "input_ids"; give one per row',
        'empty row: no "text", "input_ids" or "messages"',
        'message 0 (user): no "content"',
        'empty "text"',
    ]


def test_parquet_strings_that_are_not_utf8(tmp_path, model):
    """pyarrow neither checks UTF-8 when it writes raw buffers nor when it reads them back."""
    raw = pa.array([b"fine", b"caf\xe9", b"also fine"], type=pa.binary())
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 3, raw.buffers())}), path)
    with pytest.raises(InputError, match=rf'^{path}:row 1: column "text": not UTF-8 \(byte 0xe9 at byte 4 of a string\)$'):
        read_all(path, model)
    out, stats = read_all(path, model, skip_bad_lines=True)
    assert [r.index for r in out] == [0, 2] and stats.skipped_bad == 1


def test_rows_stream(tmp_path, model, monkeypatch):
    """A bad line late in the file is reported when it is reached: the rows before it come first,
    one line (or one Parquet batch) at a time."""
    rows = [{"text": "fine"}] * 5
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a") as f:
        f.write("not json\n")
    it = read_rows(path, model)
    assert len(list(itertools.islice(it, 5))) == 5
    with pytest.raises(InputError, match=":6: not JSON"):
        next(it)
    import q4k_engine.distill.rows as rows_mod

    monkeypatch.setattr(rows_mod, "PARQUET_BATCH_ROWS", 4)
    ppath = write_parquet(tmp_path / "d.parquet", rows * 4 + [{"input_ids": [-1]}], row_group_size=4)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        for batch in real(self, *a, **k):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    it = read_rows(ppath, model)
    assert len(list(itertools.islice(it, 6))) == 6 and seen == [4, 4]  # two batches read for six rows
    with pytest.raises(InputError, match=r":row 20: "):
        list(it)


# --- length batches --------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=80), st.integers(1, 1200))
def test_length_batches_properties(lengths, budget):
    groups = length_batches(lengths, budget)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for g in groups:
        padded = len(g) * max(lengths[i] for i in g)
        assert padded <= budget or len(g) == 1  # within budget, unless one row alone exceeds it
    assert length_batches(list(lengths), budget) == groups  # deterministic
    # groups are runs of the rows sorted by length: no row of another group lies strictly inside a group's range
    order = [i for g in groups for i in g]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    # greedy: adding the next group's first row to a group would break the budget
    for g, nxt in zip(groups, groups[1:]):
        assert (len(g) + 1) * lengths[g[0]] > budget


def test_length_batches_waste_little(rng):
    lengths = rng.integers(16, 2048, 500).tolist()
    groups = length_batches(lengths, 16384)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert sum(lengths) / padded > 0.9  # sorted: under 10% padding on a spread of lengths
    shuffled = sum(len(c) * max(c) for c in (lengths[i:i + 8] for i in range(0, 500, 8)))
    assert padded < shuffled


def test_length_batches_refuses_bad_arguments():
    with pytest.raises(InputError, match="--batch-tokens must be a positive integer"):
        length_batches([1, 2], 0)
    with pytest.raises(InputError, match="row 1 has length 0"):
        length_batches([1, 0], 10)
    assert length_batches([], 10) == []


def test_tokenizer_ids_beyond_the_model_vocabulary(tmp_path, model, tok):
    """A file whose tokenizer knows more tokens than the model has embedding rows."""
    text = "The ferry leaves the north bank"
    top = max(tok.encode(text))
    small = dataclasses.replace(model, config=dataclasses.replace(model.config, vocab_size=top))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    with pytest.raises(InputError, match=rf"^{path}:1: the tokenizer gives token id {top}, outside the model's "
                                         rf"vocabulary \[0, {top}\)$"):
        read_all(path, small)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["text", "input_ids", "messages", "role", "content", "x"]), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(_json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=20)),
                min_size=1, max_size=6))
def test_any_line_is_a_row_or_one_line_error(tmp_path_factory, model, lines):
    """Whatever a line holds, reading gives rows or an InputError naming that line, never a crash."""
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    stats = RowStats()
    try:
        for r in read_rows(path, model, RowOptions(), stats):
            assert len(r.input_ids) >= 1 and r.input_ids.dtype == np.int32
            assert ((r.input_ids >= 0) & (r.input_ids < model.config.vocab_size)).all()
    except InputError as e:
        assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(e)) and "\n" not in str(e), str(e)
    stats = RowStats()  # skipping: every line is a row, a skipped bad row or a blank line
    try:
        assert sum(1 for _ in read_rows(path, model, RowOptions(skip_bad_lines=True), stats)) == stats.rows
    except InputError as e:
        assert str(e).startswith(f"{path}: no rows") and stats.rows == 0
    assert stats.rows + stats.skipped_bad + stats.blank_lines == len(lines)


def test_teacher_as_source(tmp_path, rng):
    """read_rows takes the teacher itself (its tokenizer reused) and gives what its ModelFile gives."""
    import q4k_engine
    from q4k_engine.synthetic import write_synthetic

    teacher = q4k_engine.load(write_synthetic(tmp_path / "m.apr", "qwen2"), device="cpu")
    rows = mixed_rows(12, teacher.vocab_size, int(rng.integers(1 << 31)))
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = list(read_rows(path, teacher, RowOptions(max_seq_len=64)))
    b = list(read_rows(path, teacher.model, RowOptions(max_seq_len=64)))
    assert [(r.input_ids.tolist(), r.target_mask.tolist(), r.truncated) for r in a] == \
        [(r.input_ids.tolist(), r.target_mask.tolist(), r.truncated) for r in b]
    assert a[0].input_ids.tolist() == teacher.encode(rows[0]["text"])[:64]
    assert a[2].input_ids.tolist() == teacher.apply_chat_template(rows[2]["messages"])[:64]
