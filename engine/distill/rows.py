"""Dataset rows in: JSONL or Parquet files of `text`, `input_ids` or chat `messages` rows, streamed.

Files (kind by suffix): `.jsonl`, `.ndjson`, `.json` (one JSON object per line; `.gz` compressed
too) and `.parquet`/`.pq` (read one record batch at a time). Memory stays bounded by one line or
one batch, whatever the file's size.

A row has exactly one of (other keys are ignored, a null value counts as absent):
  {"text": "..."}                      tokenized by the model's tokenizer; BOS as the model file says
                                       (RowOptions.add_bos overrides)
  {"input_ids": [1, 2, 3]}             used as given (no BOS added); every id in [0, vocab)
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                       rendered with the model's chat template (chat.py: the
                                       semantics of transformers' apply_chat_template), no BOS added
In Parquet the same names are columns: `text` string, `input_ids` list<integer>, `messages`
list<struct<role: string, content: string, ...>>; each row fills exactly one of them.
JSONL lines that hold only whitespace are not rows (RowStats.blank_lines counts them).

target_mask (per position t of input_ids): True when the teacher's prediction at t (of token t+1)
is a training target, i.e. token t+1 exists in the row (after truncation) and is a target token.
Every token but the first is a target token, except with `assistant_only`, where only assistant
tokens are (chat.py: the template's {% generation %} blocks, or the assistant turns found by
rendering prefix by prefix). So the last position is never a target, and `assistant_only` on a row
that is not a chat is a bad row (it has no assistant turns to train on).

Length: `max_seq_len` keeps each row's first max_seq_len tokens (RowStats.truncated counts the
rows cut); without it, a row longer than the model's context length is a bad row.

Bad rows (not JSON, not UTF-8, wrong types, empty, two row kinds at once, ids outside the
vocabulary, a conversation the template refuses, too long) raise InputError("FILE:LINE: reason")
when reached; with `skip_bad_lines` they are skipped and counted (RowStats.skipped_bad, the first
few reasons in RowStats.bad) and indices do not shift. Problems of the whole file or the model
(missing file, wrong Parquet schema, messages without a chat template) always raise.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..tensors import ModelFile
from ..tokenizer import TextTokenizer, build_tokenizer, text_problem
from .chat import ChatTemplate, check_messages, encode_chat, json_kind, model_chat_template

if TYPE_CHECKING:
    from ..provider import TeacherModel

ROW_KINDS = ("text", "input_ids", "messages")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024  # rows per record batch read from a Parquet file: bounds its memory
MAX_REPORTED_BAD = 20  # reasons kept in RowStats.bad (the count is always exact)


@dataclass(frozen=True)
class Row:
    index: int  # 0-based position among the dataset's rows (bad rows count, blank lines do not)
    where: str  # "path:LINE" (JSONL, 1-based) or "path:row N" (Parquet, 0-based like pyarrow and pandas)
    input_ids: np.ndarray  # int32 [T], T >= 1
    target_mask: np.ndarray  # bool [T], see the module docstring
    truncated: bool


@dataclass(frozen=True)
class RowOptions:
    max_seq_len: int | None = None
    assistant_only: bool = False
    skip_bad_lines: bool = False
    add_bos: bool | None = None  # text rows: None follows the model file's add_bos
    chat_template: str | None = None  # overrides the model file's template (source text)


@dataclass
class RowStats:
    rows: int = 0  # rows yielded
    tokens: int = 0  # tokens of the yielded rows (after truncation)
    targets: int = 0  # positions with target_mask True
    truncated: int = 0
    skipped_bad: int = 0
    blank_lines: int = 0
    bad: list[str] = field(default_factory=list)  # "where: reason" of the first MAX_REPORTED_BAD bad rows

    def summary(self) -> str:
        """One line for the user, e.g. after a run."""
        line = f"{self.rows} rows, {self.tokens} tokens ({self.targets} target positions)"
        if self.truncated:
            line += f"; {self.truncated} rows truncated"
        if self.skipped_bad:
            line += f"; {self.skipped_bad} bad rows skipped (first: {self.bad[0]})"
        return line


class _BadRow(Exception):
    """A problem of one row: skippable with skip_bad_lines, else InputError("where: reason")."""


@dataclass
class _Encoder:
    """What turning a row into ids needs from the model; the tokenizer and template are built on first use."""

    source: "TeacherModel | ModelFile"
    options: RowOptions
    tokenizer_: TextTokenizer | None = None
    template_: ChatTemplate | None = None

    @property
    def model(self) -> ModelFile:
        return self.source if isinstance(self.source, ModelFile) else self.source.model

    @property
    def vocab(self) -> int:
        return self.model.config.vocab_size

    @property
    def tokenizer(self) -> TextTokenizer:
        if self.tokenizer_ is None:
            if self.model.tokenizer is None:
                raise InputError(f"{self.model.path.name}: text and chat rows need the model's tokenizer, "
                                 "and the file carries none (give input_ids rows)")
            # A teacher keeps its tokenizer: building one for a 262k vocabulary takes seconds.
            self.tokenizer_ = (build_tokenizer(self.model.tokenizer, self.model.config.arch)
                               if isinstance(self.source, ModelFile) else self.source.tokenizer)
        return self.tokenizer_

    @property
    def template(self) -> ChatTemplate:
        if self.template_ is None:
            self.template_ = model_chat_template(self.model, self.options.chat_template)
        return self.template_

    def encode(self, obj: Any) -> tuple[list[int] | np.ndarray, np.ndarray | None]:
        """(ids, target-token mask or None for "every token but the first") of one row object."""
        if not isinstance(obj, Mapping):
            raise _BadRow(f"expected a JSON object with one of {_names(ROW_KINDS)}, got {json_kind(obj)}")
        present = [k for k in ROW_KINDS if obj.get(k) is not None]
        if not present:
            others = [repr(k) for k, v in obj.items() if v is not None]
            raise _BadRow(f"empty row: no {_names(ROW_KINDS)}" + (f" (keys: {', '.join(others)})" if others else ""))
        if len(present) > 1:
            raise _BadRow(f"mixed row kinds: both {_names(present, 'and')}; give one per row")
        kind = present[0]
        if self.options.assistant_only and kind != "messages":
            raise _BadRow(f'a "{kind}" row has no assistant turns (--assistant-only needs chat "messages" rows)')
        value = obj[kind]
        if kind == "text":
            if not isinstance(value, str):
                raise _BadRow(f'"text" must be a string, got {json_kind(value)}')
            if not value:
                raise _BadRow('empty "text"')
            if (problem := text_problem(value)) is not None:
                raise _BadRow(f'"text" {problem}')
            return self._in_vocab(self.tokenizer.encode(value, self.options.add_bos)), None
        if kind == "input_ids":
            return _check_ids(value, self.vocab), None
        template, tokenizer = self.template, self.tokenizer  # a missing template is the model's problem, not the row's
        try:
            ids, mask = encode_chat(template, tokenizer, check_messages(value), assistant_mask=self.options.assistant_only)
        except InputError as e:
            raise _BadRow(str(e)) from None
        if not ids:
            raise _BadRow("the chat template renders this conversation as no tokens")
        if mask is not None and not mask.any():
            raise _BadRow("no assistant tokens in the rendered conversation (--assistant-only)")
        return self._in_vocab(ids), mask

    def _in_vocab(self, ids: list[int]) -> list[int]:
        """A file whose tokenizer knows more tokens than the model has rows must not feed it those."""
        top = max(ids)
        if top >= self.vocab:
            raise _BadRow(f"the tokenizer gives token id {top}, outside the model's vocabulary [0, {self.vocab})")
        return ids


def _names(keys: Sequence[str], last: str = "or") -> str:
    quoted = [f'"{k}"' for k in keys]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {last} {quoted[-1]}"


def _check_ids(value: Any, vocab: int) -> np.ndarray:
    if isinstance(value, np.ndarray):  # Parquet hands integer lists over as arrays
        values: Sequence[Any] = value.tolist()
    elif isinstance(value, list):
        values = value
    else:
        raise _BadRow(f'"input_ids" must be a list of integers, got {json_kind(value)}')
    if not values:
        raise _BadRow('empty "input_ids"')
    if set(map(type, values)) != {int}:  # exactly int: True and 2.0 are not token ids
        j, v = next((j, v) for j, v in enumerate(values) if type(v) is not int)
        shown = json.dumps(v) if _jsonable(v) else repr(v)
        raise _BadRow(f'"input_ids" position {j}: {shown} is not an integer token id')
    ids = np.asarray(values, dtype=object if max(values) >= 2**63 or min(values) < -2**63 else np.int64)
    outside = (ids < 0) | (ids >= vocab)
    if outside.any():
        j = int(np.argmax(outside))
        raise _BadRow(f'"input_ids" position {j}: token id {values[j]} is outside the vocabulary [0, {vocab})')
    return ids.astype(np.int32)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _jsonl_objects(path: Path, stats: RowStats) -> Iterator[tuple[str, Any]]:
    """(where, parsed object or _BadRow) of every non-blank line; the file is opened now."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        f: BinaryIO = opener(path, "rb")  # type: ignore[assignment]
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    return _jsonl_lines(path, f, stats)


def _jsonl_lines(path: Path, f: BinaryIO, stats: RowStats) -> Iterator[tuple[str, Any]]:
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # unreadable, or a broken .gz
                raise InputError(f"{path}:{lineno + 1}: cannot read ({e})") from None
            if not raw:
                return
            lineno += 1
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _BadRow(f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                continue
            if not line.strip():
                stats.blank_lines += 1
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))  # the decoder's column then counts on this line
            except json.JSONDecodeError as e:
                array = lineno == 1 and line.lstrip().startswith("[")  # a pretty-printed JSON array file
                hint = " (expected one JSON object per line, not a JSON array)" if array else ""
                yield where, _BadRow(f"not JSON: {e.msg} (column {e.colno}){hint}")


def _parquet_objects(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    columns = [name for name in ROW_KINDS if name in schema.names]
    if not columns:
        raise InputError(f"{path}: no {_names(ROW_KINDS)} column (columns: {', '.join(schema.names) or 'none'})")
    for name in columns:
        problem = _column_problem(name, schema.field(name).type)
        if problem:
            raise InputError(f"{path}: column {name!r} is {schema.field(name).type}, {problem}")
    return _parquet_rows(path, pf, columns)


def _parquet_rows(path: Path, pf: Any, columns: list[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa

    index = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            values = {name: batch.column(name) for name in columns}
            ids = values.get("input_ids")
            ids_lists = None if ids is None else [None if v is None else np.asarray(v) for v in
                                                  ids.to_numpy(zero_copy_only=False)]
            other = {name: _py_values(name, col) for name, col in values.items() if name != "input_ids"}
            for r in range(batch.num_rows):
                obj = {name: col[r] for name, col in other.items()}
                bad = next((v for v in obj.values() if isinstance(v, _BadRow)), None)
                if ids_lists is not None:
                    obj["input_ids"] = ids_lists[r]
                yield f"{path}:row {index}", bad or obj
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}:row {index}: cannot read ({e})") from None


def _py_values(name: str, column: Any) -> list[Any]:
    """A column's values as Python objects; a value whose strings are not UTF-8 becomes a _BadRow
    (Parquet writers do not all check, and pyarrow does not on read)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # rare: find the culprits one by one
        values: list[Any] = []
        for v in column:
            try:
                values.append(v.as_py())
            except UnicodeDecodeError as e:
                values.append(_BadRow(f'column "{name}": not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1} '
                                      "of a string)"))
        return values


def _column_problem(name: str, t: Any) -> str | None:
    """Why a Parquet column cannot hold `name` rows, or None."""
    import pyarrow as pa

    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if name == "text":
        return None if _is_string(t) else "expected string"
    if name == "input_ids":
        return None if is_list and pa.types.is_integer(t.value_type) else "expected list<integer>"
    if not is_list or not pa.types.is_struct(t.value_type):
        return "expected list<struct<role: string, content: string>>"
    fields = {t.value_type.field(i).name: t.value_type.field(i).type for i in range(t.value_type.num_fields)}
    if "role" not in fields or "content" not in fields:
        return "expected list<struct<role: string, content: string>> (the structs need role and content)"
    if not _is_string(fields["role"]):
        return "expected a string role"
    return None


def _is_string(t: Any) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t)


def read_rows(path: Path | str, source: "TeacherModel | ModelFile", options: RowOptions = RowOptions(),
              stats: RowStats | None = None) -> Iterator[Row]:
    """Stream the rows of a JSONL or Parquet file as token ids and target masks (module docstring).

    `source` is the teacher (or its ModelFile): its tokenizer, chat template, vocabulary and context
    length decide the rows. `stats`, when given, is filled while iterating."""
    path = Path(path)
    stats = stats if stats is not None else RowStats()
    encoder, context = _checked_encoder(source, options)  # checks run now, before the first row is asked for
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
        objects = _parquet_objects(path)
    elif suffixes and (suffixes[-1] in JSONL_SUFFIXES or suffixes[-1] == ".gz" and suffixes[0] in JSONL_SUFFIXES):
        objects = _jsonl_objects(path, stats)
    else:
        known = ", ".join(JSONL_SUFFIXES + tuple(s + ".gz" for s in JSONL_SUFFIXES) + PARQUET_SUFFIXES)
        raise InputError(f"{path}: unknown dataset type {path.suffix!r} (use {known})")
    return _rows(path, objects, encoder, context, stats)


def encode_rows(objects: Iterable[tuple[str, Any]], source: "TeacherModel | ModelFile",
                options: RowOptions = RowOptions(), stats: RowStats | None = None,
                name: str = "dataset") -> Iterator[Row]:
    """Rows from objects parsed elsewhere (a ray.data.Dataset's rows, say): (where, row dict) pairs,
    checked and encoded exactly as read_rows does a file's lines. `name` names the whole input in
    the "no rows" error."""
    encoder, context = _checked_encoder(source, options)
    return _rows(Path(name), iter(objects), encoder, context, stats if stats is not None else RowStats())


def _checked_encoder(source: "TeacherModel | ModelFile", options: RowOptions) -> tuple[_Encoder, int]:
    """The encoder of `source`'s rows and its context length, once the options are checked against it."""
    encoder = _Encoder(source, options)
    model = encoder.model
    context = model.config.context_length
    limit = options.max_seq_len
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InputError(f"--max-seq-len must be a positive integer, got {limit!r}")
        if context and limit > context:
            raise InputError(f"--max-seq-len {limit} is more than {model.path.name}'s context length ({context})")
    return encoder, context


def _rows(path: Path, objects: Iterator[tuple[str, Any]], encoder: _Encoder, context: int,
          stats: RowStats) -> Iterator[Row]:
    options = encoder.options
    for index, (where, obj) in enumerate(objects):
        try:
            if isinstance(obj, _BadRow):
                raise obj
            ids, targets = encoder.encode(obj)
            row = _make_row(index, where, ids, targets, options.max_seq_len, context)
        except _BadRow as e:
            if not options.skip_bad_lines:
                raise InputError(f"{where}: {e}") from None
            stats.skipped_bad += 1
            if len(stats.bad) < MAX_REPORTED_BAD:
                stats.bad.append(f"{where}: {e}")
            continue
        except InputError as e:  # the model or the template cannot serve this row: never skipped
            raise InputError(f"{where}: {e}") from None
        stats.rows += 1
        stats.tokens += len(row.input_ids)
        stats.targets += int(row.target_mask.sum())
        stats.truncated += row.truncated
        yield row
    if stats.rows == 0:
        skipped = f" ({stats.skipped_bad} bad rows skipped; first: {stats.bad[0]})" if stats.skipped_bad else ""
        raise InputError(f"{path}: no rows{skipped}")


def _make_row(index: int, where: str, ids: Sequence[int] | np.ndarray, targets: np.ndarray | None,
              limit: int | None, context: int) -> Row:
    n = len(ids)
    if limit is None and context and n > context:
        raise _BadRow(f"{n} tokens, more than the model's context length ({context}); "
                      "truncate with --max-seq-len")
    keep = n if limit is None else min(n, limit)
    input_ids = np.asarray(ids[:keep], dtype=np.int32)
    mask = np.zeros(keep, dtype=bool)
    if targets is None:
        mask[:-1] = True
    else:
        mask[:-1] = targets[1:keep]
    return Row(index, where, input_ids, mask, keep < n)


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Positions into `lengths`, grouped so that each group padded to its longest row holds at most
    `batch_tokens` tokens (a single longer row forms a group alone).

    Rows are taken longest first (ties by position), so each group holds rows of similar length and
    little of a padded batch is padding; an out-of-memory shows at the first group. Deterministic:
    the groups depend only on `lengths` and `batch_tokens`."""
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, (int, np.integer)) or batch_tokens < 1:
        raise InputError(f"--batch-tokens must be a positive integer, got {batch_tokens!r}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise InputError(f"row {i} has length {n}; every row has at least one token")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        # Longest first: the group's padded length is its first row's length.
        if group and (len(group) + 1) * int(lengths[group[0]]) > batch_tokens:
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups
