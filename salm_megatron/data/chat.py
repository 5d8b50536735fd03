"""Chat templates: a conversation rendered by the tokenizer's own Jinja template, as token ids
with an answer mask (``data.prompt_format: chat``).

The template is the tokenizer's: ``chat_template.jinja`` beside it, else ``chat_template`` in the
``tokenizer_config.json`` beside it (a string, or a list of named templates: ``default``), the
order transformers reads them in. It renders as transformers' ``apply_chat_template`` renders it:
a sandboxed (immutable) Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the loop
controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, the
``{% generation %}`` block; and the variables ``messages`` (role, content), ``tools`` and
``documents`` (none), ``add_generation_prompt``, the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ... from ``tokenizer_config.json``) and ``data.chat_template_kwargs``
(``{enable_thinking: false}`` for Qwen3, say).

Tokens. Each message's content is wrapped in private-use marker characters and each audio segment
is a marker where its part sits (SALM); the rendered text is read back without them, knowing where
every message, placeholder and ``{% generation %}`` block lies. A Hugging Face tokenizer then
tokenizes the whole text in one pass, the special tokens the template writes as their ids, as
transformers does (so the ids are transformers'); a placeholder is one token. Message text never
becomes a special token: should a message hold one's text (``<|im_end|>`` in a transcript), the
text is tokenized stretch by stretch between the template's special tokens instead, the messages'
text as text (as sentencepiece tokenizers always are).

Answer mask (what the model learns to say): for each assistant turn trained on (``data.loss_on``:
every one, or the last), the tokens from its content through the end-of-turn token that closes it
(the first special token the template writes after the content: ``<|eot_id|>``, ``<|im_end|>``,
``</s>``), text the template writes between them included. A template with ``{% generation %}``
blocks marks what its blocks hold instead (transformers' ``return_assistant_tokens_mask``), up to
that end-of-turn token where a block stops before it. A token counts when it overlaps the marked
text, as in transformers: ``▁four`` holding the template's space and the answer's first word is
learned. Decoding continues the prompt rendered with ``add_generation_prompt=True`` from the turns
before the answer, and stops at the end-of-turn token of the template's assistant turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..config import LOSS_ON, PROMPT_FORMATS
from .conversation import Message
from .tokenizers import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
HAND_WRITTEN = tuple(f for f in PROMPT_FORMATS if f != "chat")  # formats for template-less LLMs
# Markers: OPEN/CLOSE + chr(INDEX + message) around each message's content, AUDIO +
# chr(INDEX + segment) at each placeholder (read back as the single character AUDIO), and
# GENERATION/GENERATION_END around each {% generation %} block's output.
OPEN, CLOSE, AUDIO, GENERATION, GENERATION_END = "\ue000", "\ue001", "\ue002", "\ue003", "\ue004"
INDEX, MAX_INDEX = 0xF000, 0x800
_MARKERS = re.compile("[\ue000-\ue004]")
_MARKED = re.compile("([\ue000-\ue002])(.?)|[\ue003\ue004]", re.DOTALL)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _Generation(jinja2.ext.Extension):
    """``{% generation %} ... {% endgeneration %}``: what the block writes, between markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        return GENERATION + caller() + GENERATION_END


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str, origin: str) -> jinja2.Template:
    """``source`` in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise ValueError(f"the chat template ({origin}) is not valid Jinja: {err}") from err


def find_template(tokenizer_path: str | Path) -> Optional[tuple[str, str]]:
    """(template, where it comes from) of the tokenizer at ``tokenizer_path``, or None."""
    folder = Path(tokenizer_path).parent
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8"), str(folder / TEMPLATE_FILE)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a JSON object: {err}") from err
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template.strip():
        return template, f"chat_template in {config}"
    return None


@dataclass
class ChatPrompt:
    input_ids: list[int]
    answer_mask: list[int]
    audio_order: list[int]  # the segment of each placeholder, in the order of the ids
    end_ids: list[int]  # the end-of-turn token of each trained assistant turn


class ChatTemplate:
    """One tokenizer's chat template, rendered and tokenized as the module docstring says."""

    def __init__(self, tokenizer: Tokenizer, source: str, origin: str, variables: dict):
        self.tokenizer, self.origin = tokenizer, origin
        self.template = compile_template(source, origin)
        self.generation_blocks = bool(_GENERATION_TAG.search(source))
        self.variables = {**tokenizer.template_variables(), **variables}
        self.specials = tokenizer.special_tokens()
        self.special_ids = {*self.specials.values(), tokenizer.eos_id}
        if tokenizer.bos_id is not None:
            self.special_ids.add(tokenizer.bos_id)
        longest_first = sorted(self.specials, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self._end_id: Optional[int] = None

    @property
    def end_id(self) -> int:
        """The token that closes an assistant turn (what decoding stops at)."""
        if self._end_id is None:
            probe = [Message("user", ("Hello.",)), Message("assistant", ("Hi.",))]
            self._end_id = self.encode(probe).end_ids[-1]
        return self._end_id

    def encode(
        self,
        messages: list[Message],
        *,
        loss_on: str = "all",
        audio: bool = True,
        add_generation_prompt: bool = False,
    ) -> ChatPrompt:
        """Ids and answer mask of ``messages``; ``audio=False`` (BESTOW) leaves the
        placeholders out; ``add_generation_prompt`` renders a prompt to continue (no answer)."""
        if loss_on not in LOSS_ON:
            raise ValueError(f"data.loss_on={loss_on!r} is not one of {', '.join(LOSS_ON)}")
        if len(messages) >= MAX_INDEX:
            raise ValueError(f"a conversation of {len(messages)} turns: at most {MAX_INDEX - 1}")
        payload = []
        for i, message in enumerate(messages):
            pieces = []
            for part in message.parts:
                if isinstance(part, int):
                    if part >= MAX_INDEX:
                        raise ValueError(f"audio segment {part}: at most {MAX_INDEX} per sample")
                    if audio:
                        pieces.append(AUDIO + chr(INDEX + part))
                elif part.strip():
                    pieces.append(_MARKERS.sub("", part.strip()))
            marked = OPEN + chr(INDEX + i) + " ".join(pieces) + CLOSE + chr(INDEX + i)
            payload.append({"role": message.role, "content": marked})
        rendered = self._render(payload, messages, add_generation_prompt)
        text, contents, placeholders, blocks = self._read_back(rendered)
        assistant = [i for i, m in enumerate(messages) if m.role == "assistant"]
        for i in assistant:
            found = sum(m == i for _, _, m in contents)
            if found == 0:
                raise ValueError(
                    f"the chat template ({self.origin}) renders no assistant turn: assistant "
                    f"message {i} is not in what it writes, so there is no answer to learn; "
                    "data.prompt_format=chat needs a template that writes each assistant message "
                    f"(or pick a hand-written data.prompt_format: {', '.join(HAND_WRITTEN)})"
                )
            if found > 1:
                raise ValueError(
                    f"the chat template ({self.origin}) writes assistant message {i} {found} "
                    "times: which one is the answer to learn?"
                )
        wanted = sorted(p for m in messages for p in m.audio) if audio else []
        if sorted(segment for _, segment in placeholders) != wanted:
            raise ValueError(
                f"the chat template ({self.origin}) does not write each audio segment of the user "
                f"turns once (segments {wanted}, written {[s for _, s in placeholders]})"
            )
        spans = self.tokenizer.chat_spans(text, AUDIO)
        inside = [(s, e) for s, e, _ in contents]
        if spans is None or any(
            token in self.special_ids and text[s:e] != AUDIO and _within(s, e, inside)
            for token, s, e in spans
        ):
            spans = self._by_stretches(text, inside)
        ends = [
            (s, e, token)
            for token, s, e in spans
            if token in self.special_ids and text[s:e] != AUDIO and not _within(s, e, inside)
        ]
        trained = assistant[-1:] if loss_on == "last" else assistant
        trained = [] if add_generation_prompt else trained
        answers, end_ids = [], []
        for i in trained:
            start, stop = next((s, e) for s, e, m in contents if m == i)
            if self.generation_blocks:
                held = [(a, b) for a, b in blocks if _overlaps(a, b, [(start, stop)])
                        or a <= start == stop <= b]  # fmt: skip
                if not held:
                    raise ValueError(
                        f"the chat template ({self.origin}) has {{% generation %}} blocks, but "
                        f"none holds assistant message {i}"
                    )
                start, block_stop = min(a for a, _ in held), max(b for _, b in held)
            else:
                block_stop = stop
            end = next((item for item in ends if item[0] >= stop), None)
            if end is None:
                raise ValueError(
                    f"the chat template ({self.origin}) writes no special token after assistant "
                    f"message {i}: no end-of-turn token to learn and to stop at"
                )
            answers.append((start, max(block_stop, end[1])))
            end_ids.append(end[2])
        mask = [int(any(s < b and e > a for a, b in answers)) for _, s, e in spans]
        if any(m and text[s:e] == AUDIO for m, (_, s, e) in zip(mask, spans, strict=True)):
            raise ValueError(f"the chat template ({self.origin}) puts audio in an answer")
        order = [segment for _, segment in sorted(placeholders)]
        return ChatPrompt([token for token, _, _ in spans], mask, order, end_ids)

    def _render(self, payload: list[dict], messages, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=payload, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.variables,
            )  # fmt: skip
        except jinja2.TemplateError as err:
            roles = ", ".join(m.role for m in messages)
            raise ValueError(
                f"the chat template ({self.origin}) refused a conversation of turns {roles}: {err}"
            ) from err

    def _read_back(self, rendered: str):
        """The text without markers; where each message's content lies (start, end, message),
        each placeholder (position, segment) and each generation block (start, end)."""
        out, length, at = [], 0, 0
        opened: dict[int, int] = {}
        contents, placeholders, blocks = [], [], []
        block: Optional[int] = None
        for match in _MARKED.finditer(rendered):
            out.append(rendered[at : match.start()])
            length += match.start() - at
            at = match.end()
            marker, index = match.group(1), match.group(2)
            if marker is None:  # a generation block opens or closes
                if (match.group() == GENERATION) == (block is not None):
                    raise self._mangled("{% generation %} blocks")
                if block is None:
                    block = length
                else:
                    blocks.append((block, length))
                    block = None
                continue
            number = ord(index) - INDEX if index else -1
            if not 0 <= number < MAX_INDEX:
                raise self._mangled("message markers")
            if marker == AUDIO:
                placeholders.append((length, number))
                out.append(AUDIO)
                length += 1
            elif marker == OPEN:
                if number in opened:
                    raise self._mangled("message markers")
                opened[number] = length
            elif number not in opened:
                raise self._mangled("message markers")
            else:
                contents.append((opened.pop(number), length, number))
        if opened or block is not None:
            raise self._mangled("message markers")
        out.append(rendered[at:])
        return "".join(out), contents, placeholders, blocks

    def _mangled(self, what: str) -> ValueError:
        return ValueError(
            f"the chat template ({self.origin}) cut the {what} apart (string operations on the "
            "messages' content?): cannot tell where the messages lie in its text"
        )

    def _by_stretches(self, text: str, inside: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """Tokens of ``text``: the template's special tokens and the placeholders as their ids,
        each stretch between them tokenized as text."""
        fixed = [
            (m.start(), m.end(), self.specials[m.group()])
            for m in self._special_text.finditer(text)
            if not _overlaps(*m.span(), inside)
        ]
        fixed += [(m.start(), m.end(), self.tokenizer.audio_token_id)
                  for m in re.finditer(AUDIO, text)]  # fmt: skip
        spans, at = [], 0
        for start, end, token in sorted(fixed):
            spans += [(t, s + at, e + at) for t, s, e in self.tokenizer.token_spans(text[at:start])]
            spans.append((token, start, end))
            at = end
        return spans + [(t, s + at, e + at) for t, s, e in self.tokenizer.token_spans(text[at:])]


def _within(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(a <= start and end <= b for a, b in spans)


def _overlaps(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    return any(start < b and end > a for a, b in spans)


def chat_template(tokenizer: Tokenizer, variables: Optional[dict[str, Any]] = None) -> ChatTemplate:
    """The chat template of ``tokenizer`` with ``variables`` (``data.chat_template_kwargs``),
    read once per tokenizer; a clear error when it has none."""
    variables = dict(variables or {})
    cache = tokenizer.__dict__.setdefault("_chat_templates", {})
    key = json.dumps(variables, sort_keys=True, default=str)
    if key not in cache:
        found = find_template(tokenizer.path)
        if found is None:
            folder = Path(tokenizer.path).parent
            raise ValueError(
                "data.prompt_format='chat' renders the tokenizer's chat template, but tokenizer "
                f"{tokenizer.path} has none (no {folder / TEMPLATE_FILE}, no chat_template in "
                f"{folder / 'tokenizer_config.json'}): add the LLM's template there, or pick a "
                f"hand-written data.prompt_format ({', '.join(HAND_WRITTEN)})"
            )
        cache[key] = ChatTemplate(tokenizer, *found, variables)
    return cache[key]
