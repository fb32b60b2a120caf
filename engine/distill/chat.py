"""Chat messages -> text and token ids with the model's own chat template (`tokenizer.chat_template`).

The template is Jinja, rendered the way transformers' `apply_chat_template` renders it, so a
conversation gives the same text (and, with the model's tokenizer, the same ids) here as there:

- a sandbox that cannot change its inputs (jinja2's ImmutableSandboxedEnvironment), `trim_blocks`
  and `lstrip_blocks`, the `loopcontrols` extension;
- the helpers templates call: `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that
  does not escape HTML and keeps non-ASCII characters, `dict(...)`, and a `namespace` that refuses
  underscore names;
- variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (the model's BOS/EOS
  token text), `tools` and `documents` (None unless given), plus any extra keyword the caller passes;
- message keys whose value is None are dropped (many templates test `'key' in message`), and a
  message's reasoning given as `reasoning_content`, `thinking` or `reasoning` is visible under
  `reasoning_content` and `thinking`;
- the rendered text is tokenized without adding BOS: the template writes it.

Assistant spans (for `--assistant-only`): where the template marks generated text with
`{% generation %} ... {% endgeneration %}` (transformers' `return_assistant_tokens_mask`), the
marked text is the span. Otherwise each assistant message's span is found by rendering the
conversation prefix by prefix: it starts where `messages[:i]` with the generation prompt ends
(so the "assistant" header is not a target) and ends where `messages[:i+1]` ends, less the
whitespace the template writes after the turn (so the end-of-turn token is a target, the line break
after it is not). A template that renders an earlier turn differently once later turns follow
(one that drops earlier reasoning, say) cannot be split this way and is refused with one line.

A token is an assistant token when its character span overlaps an assistant span (transformers'
rule, so a token that straddles the boundary counts).
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

import numpy as np

from ..errors import InputError
from ..tensors import ModelFile
from ..tokenizer import TextTokenizer, text_problem

ASSISTANT = "assistant"
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Span = tuple[int, int]


class _GenerationSpans(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a recording is
    open, notes the body's character span in the output written so far."""

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        # Per render, not per process: each ChatTemplate has its own environment and extension.
        self.recording: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("generation_spans", default=None)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        recording = self.recording.get()
        if recording is not None:
            written, spans = recording
            start = sum(map(len, written))
            spans.append((start, start + len(text)))
        return text

    @contextmanager
    def record(self, written: list[str], spans: list[Span]) -> Iterator[None]:
        token = self.recording.set((written, spans))
        try:
            yield
        finally:
            self.recording.reset(token)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (no reach into Python internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - jinja's own signature trick: `self` may be a kwarg
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}: underscore names are not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What the template sees: fresh dicts, None values dropped, reasoning visible under both names."""
    out = []
    for m in messages:
        msg = {k: v for k, v in m.items() if v is not None}
        reasoning = next((msg[k] for k in REASONING_KEYS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


@dataclass(frozen=True)
class ChatRender:
    text: str
    spans: tuple[Span, ...]  # character spans of assistant text in `text` (empty unless asked for)


class ChatTemplate:
    """One compiled chat template; `where` names its origin in error messages (e.g. the model file)."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 where: str = "chat template"):
        if not isinstance(source, str) or not source.strip():
            raise InputError(f"{where}: the chat template is empty")
        self.source = source
        self.where = where
        self.variables = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationSpans, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                           namespace=_Namespace)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise InputError(f"{where}: the chat template does not compile: {e.message} (template line {e.lineno})") from None
        self._spans_ext = next(x for x in env.extensions.values() if isinstance(x, _GenerationSpans))
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               assistant_spans: bool = False, **kwargs: Any) -> ChatRender:
        """The conversation as text; with assistant_spans, also where the assistant text is in it.

        InputError when the template refuses the conversation (its raise_exception) or fails on it."""
        msgs = _plain_messages(messages)
        if not assistant_spans:
            return ChatRender(self._render(msgs, add_generation_prompt, kwargs), ())
        if self.has_generation_blocks:
            written: list[str] = []
            spans: list[Span] = []
            with self._spans_ext.record(written, spans):
                self._render(msgs, add_generation_prompt, kwargs, written)
            return ChatRender("".join(written), tuple(spans))
        return self._prefix_spans(msgs, add_generation_prompt, kwargs)

    def _render(self, msgs: list[dict[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any],
                written: list[str] | None = None) -> str:
        # tools and documents are None unless given, as in transformers: `tools is not none` must be false.
        context = {**self.variables, "tools": None, "documents": None, **kwargs, "messages": msgs,
                   "add_generation_prompt": add_generation_prompt}
        try:
            if written is None:
                return self.template.render(context)
            for piece in self.template.generate(context):  # piece by piece: the spans count what is written
                written.append(piece)
            return "".join(written)
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template refused the conversation: {e.message or type(e).__name__}") from None
        except Exception as e:  # a template is foreign code: any failure on these messages is bad input
            raise InputError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None

    def _prefix_spans(self, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                      kwargs: Mapping[str, Any]) -> ChatRender:
        full = self._render(msgs, add_generation_prompt, kwargs)
        spans = []
        for i, m in enumerate(msgs):
            if m.get("role") != ASSISTANT:
                continue
            head = self._render(msgs[:i], True, kwargs)
            upto = full if i + 1 == len(msgs) and not add_generation_prompt else self._render(msgs[: i + 1], False, kwargs)
            if not upto.startswith(head) or not full.startswith(upto):
                raise InputError(
                    f"cannot find assistant message {i} in the rendered conversation: the chat template "
                    "renders a turn differently once later turns follow; mark the assistant text with "
                    "{% generation %}...{% endgeneration %} in a template given explicitly")
            end = len(upto.rstrip())
            if end > len(head):
                spans.append((len(head), end))
        return ChatRender(full, tuple(spans))


def token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> np.ndarray:
    """bool [len(offsets)]: True for each token whose character span overlaps one of `spans` (sorted)."""
    mask = np.zeros(len(offsets), dtype=bool)
    k = 0
    for j, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[j] = end > spans[k][0]
    return mask


def check_messages(messages: Any) -> list[Mapping[str, Any]]:
    """`messages` as a list of message objects, or InputError naming the first thing wrong with it."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f'"messages" must be a list of {{"role", "content"}} objects, got {json_kind(messages)}')
    if not messages:
        raise InputError('"messages" is empty')
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"message {i} must be an object with \"role\" and \"content\", got {json_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f'message {i}: "role" must be a non-empty string, got {json_kind(role)}')
        content = m.get("content")
        if content is None and m.get("tool_calls") is None:
            raise InputError(f'message {i} ({role}): no "content"')
        if content is not None and not isinstance(content, (str, list)):
            raise InputError(f'message {i} ({role}): "content" must be a string or a list of parts, got {json_kind(content)}')
    return list(messages)


def json_kind(value: Any) -> str:
    """A JSON name for a value's type, for error messages ("a string", "null", ...)."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def read_chat_template(path: Path | str) -> str:
    """A chat template's source from a file: a Jinja file (e.g. `chat_template.jinja`) as it is, or a
    Hugging Face `tokenizer_config.json` / `chat_template.json`, whose "chat_template" holds the
    template (or a list of named ones, of which "default" is taken)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such chat template file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the chat template ({e})") from None
    if path.suffix.lower() != ".json":
        return text
    try:
        found = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{path}: not a JSON object with a \"chat_template\" ({e})") from None
    if isinstance(found, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default")
        if found is None:
            raise InputError(f"{path}: no \"default\" among the named chat templates ({', '.join(map(str, named))})")
    if not isinstance(found, str):
        raise InputError(f"{path}: no \"chat_template\" string in it")
    return found


def model_chat_template(model: ModelFile, override: str | None = None) -> ChatTemplate:
    """The model file's chat template (or `override`, a template's source), with its BOS/EOS text.

    InputError when there is neither: rendering messages some other way would give the teacher a
    prompt format it was never trained on."""
    spec = model.tokenizer
    if spec is None:
        raise InputError(f"{model.path.name}: chat messages need the model's tokenizer, and the file carries none")
    source = override if override is not None else spec.chat_template
    if source is None:
        raise InputError(f"{model.path.name}: chat messages need a chat template, and the model file has none "
                         "(no tokenizer.chat_template); give one explicitly (--chat-template FILE: a .jinja file or a "
                         "Hugging Face tokenizer_config.json)")
    token = lambda i: spec.tokens[i] if i is not None else None  # noqa: E731
    where = "the given chat template" if override is not None else f"{model.path.name}: tokenizer.chat_template"
    return ChatTemplate(source, bos_token=token(spec.bos_id), eos_token=token(spec.eos_id), where=where)


def encode_chat(template: ChatTemplate, tokenizer: TextTokenizer, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = False, assistant_mask: bool = False,
                **kwargs: Any) -> tuple[list[int], np.ndarray | None]:
    """(token ids, assistant-token mask or None) of a rendered conversation; no BOS is added."""
    rendered = template.render(messages, add_generation_prompt=add_generation_prompt,
                               assistant_spans=assistant_mask, **kwargs)
    if (problem := text_problem(rendered.text)) is not None:
        raise InputError(f"the rendered conversation {problem}")
    if not assistant_mask:
        return tokenizer.encode(rendered.text, add_bos=False), None
    ids, offsets = tokenizer.encode_offsets(rendered.text, add_bos=False)
    return ids, token_mask(offsets, rendered.spans)
