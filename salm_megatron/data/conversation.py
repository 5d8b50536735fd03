"""Conversations: one sample of several turns, audio in any user turn, as shards store them.

A conversation is a list of :class:`Message`: a role (``system``, ``user``, ``assistant``) and its
parts in order, each a text or the index of one of the sample's audio segments (user turns only).
Rendered, a message's parts are joined with one space (NeMo's rule for consecutive turns of one
role); SALM puts one audio placeholder per segment where its part sits, BESTOW none.

In a shard, a conversation is one webdataset sample: ``<key>.json`` holds ``conversation``, a list
of ``{"role": ..., "content": ...}`` whose content is a string or a list of parts (a string, or
``{"audio": i}`` with an optional ``"transcript"``), and audio ``i`` is the member
``<key>.<i>.flac`` (or ``.wav``, ``.ogg``, ``.mp3``). Segments are numbered 0..N-1 in the order
the turns name them, each named once; a text-only conversation has no audio member. The other
fields (``task``, ``lang``, ``duration``: the seconds of all its audio, ...) are kept as for
single-turn samples, whose records (``<key>.flac`` + ``answer``/``context``) stay as they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from .audio_io import AudioError, decode

ROLES = ("system", "user", "assistant")
AUDIO_MEMBER = re.compile(r"(\d+)\.(flac|wav|ogg|mp3)")
# JSON fields of a conversation sample with a meaning of their own (the others go to "extra").
CONVERSATION_FIELDS = ("conversation", "task", "lang", "duration")

Part = Union[str, int]  # a text, or the index of an audio segment


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message's text parts, stripped and joined with one space."""
        return " ".join(p.strip() for p in self.parts if isinstance(p, str) and p.strip())

    @property
    def audio(self) -> tuple[int, ...]:
        return tuple(p for p in self.parts if isinstance(p, int))


def single_turn(context: str, answer: Optional[str], segments: int = 1) -> list[Message]:
    """A single-turn sample as a conversation: its audio opens the user's turn (where the
    hand-written formats put it), then the instruction; the answer, if any, is the reply."""
    user = Message("user", (*range(segments), context))
    return [user] if answer is None else [user, Message("assistant", (answer,))]


def with_system(messages: list[Message], system: Optional[str]) -> list[Message]:
    """``messages`` opened by a system message ``system``, unless they have one already."""
    if not system or (messages and messages[0].role == "system"):
        return messages
    return [Message("system", (system,)), *messages]


def prompt_messages(messages: list[Message]) -> list[Message]:
    """What a model continues to give the last answer: the turns before the last assistant
    turn (the conversation itself when it has none)."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    return messages if last is None else messages[:last]


def conversation_json(messages: list[Message], transcripts: dict[int, str]) -> list[dict]:
    """The ``conversation`` field of a shard sample (the inverse of :func:`parse_conversation`)."""
    turns = []
    for message in messages:
        parts = []
        for part in message.parts:
            if isinstance(part, int):
                audio: dict[str, Any] = {"audio": part}
                if transcripts.get(part) is not None:
                    audio["transcript"] = transcripts[part]
                parts.append(audio)
            else:
                parts.append(part)
        content = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else parts
        turns.append({"role": message.role, "content": content})
    return turns


def parse_conversation(value: Any) -> tuple[list[Message], dict[int, str]] | tuple[str, str]:
    """A shard sample's ``conversation`` field -> (messages, transcript of each segment that
    has one); or (skip reason, what is wrong), the field and value named."""

    def bad(message: str) -> tuple[str, str]:
        return "bad_conversation", message

    if not isinstance(value, list) or not value:
        return bad(f"conversation={value!r} must be a non-empty list of turns")
    messages, transcripts, named = [], {}, []
    for t, turn in enumerate(value):
        where = f"conversation[{t}]"
        if not isinstance(turn, dict) or not {"role", "content"} <= set(turn):
            return bad(f"{where}={turn!r} must be an object with role and content")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            return bad(f"{where}.role={role!r} is not one of {', '.join(ROLES)}")
        items = [content] if isinstance(content, str) else content
        if not isinstance(items, list):
            return bad(f"{where}.content={content!r} must be a string or a list of parts")
        parts: list[Part] = []
        for p, item in enumerate(items):
            if isinstance(item, str):
                parts.append(item)
                continue
            index = item.get("audio") if isinstance(item, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                return bad(f'{where}.content[{p}]={item!r} must be a string or {{"audio": INDEX}}')
            if role != "user":
                return bad(f"{where}.content[{p}]: audio in a {role} turn (only user turns hear)")
            transcript = item.get("transcript")
            if transcript is not None and not isinstance(transcript, str):
                return bad(f"{where}.content[{p}].transcript={transcript!r} must be a string")
            if transcript is not None:
                transcripts[index] = transcript
            parts.append(index)
            named.append(index)
        messages.append(Message(role, tuple(parts)))
    if sorted(named) != list(range(len(named))):
        return bad(f"the turns name audio {named}: each of 0..{len(named) - 1} must appear once")
    if not any(m.role == "assistant" for m in messages):
        return "no_answer", "the conversation has no assistant turn"
    return messages, transcripts


def read_conversation(
    meta: dict,
    members: dict[str, bytes],
    key: str,
    *,
    sample_rate: int,
    min_duration: Optional[float] = None,
    max_duration: Optional[float] = None,
    drop_empty_answer: bool = True,
) -> dict | tuple[str, str]:
    """A shard sample holding a conversation -> the loader's sample fields (``conversation``,
    ``segments``, ``transcripts``; ``answer``: the last assistant turn, ``context``: the user
    turn before it; ``duration``: all its audio), or (skip reason, detail). The duration limits
    apply to each segment; a text-only conversation has none to check."""
    parsed = parse_conversation(meta["conversation"])
    if isinstance(parsed[0], str):
        return parsed
    messages, transcripts = parsed
    texts = {name: meta.get(name) for name in ("task", "lang")}
    wrong = {n: v for n, v in texts.items() if v is not None and not isinstance(v, str)}
    if wrong:
        return "bad_json", ", ".join(f"{n}={v!r}" for n, v in wrong.items()) + ": must be strings"
    if drop_empty_answer:
        blank = [i for i, m in enumerate(messages) if m.role == "assistant" and not m.text]
        if blank:
            return "empty_answer", f"conversation[{blank[0]}] (assistant) is blank"
    files = {int(m.group(1)): ext for ext in members if (m := AUDIO_MEMBER.fullmatch(ext))}
    count = sum(len(m.audio) for m in messages)
    extra_files = sorted(f"{key}.{files[i]}" for i in files if i >= count)
    if extra_files:
        return "bad_conversation", f"{', '.join(extra_files)}: no turn names this audio"
    segments = []
    for index in range(count):
        turn = next(t for t, m in enumerate(messages) if index in m.audio)
        name = f"{key}.{files.get(index, f'{index}.flac')}"
        if index not in files:
            return "no_audio", (
                f"conversation[{turn}] names audio {index}, but the sample has no "
                f"{key}.{index}.flac|wav|ogg|mp3 member (has {sorted(members)})"
            )
        if not members[files[index]]:
            return "empty_audio", f"{name} is empty"
        try:
            wave = decode(members[files[index]], sample_rate, name=name)
        except AudioError as err:
            return "bad_audio", str(err)
        seconds = wave.numel() / sample_rate
        if min_duration is not None and seconds < min_duration:
            return "too_short", f"{name}: {seconds:.3f} s < min_duration {min_duration}"
        if max_duration is not None and seconds > max_duration:
            return "too_long", f"{name}: {seconds:.3f} s > max_duration {max_duration}"
        segments.append(wave)
    prompt = prompt_messages(messages)
    users = [m for m in prompt if m.role == "user"]
    return {
        "conversation": messages,
        "segments": segments,
        "transcripts": [transcripts.get(i) for i in range(count)],
        "answer": messages[len(prompt)].text,
        "context": users[-1].text if users else "",
        "task": texts["task"],
        "lang": texts["lang"],
        "duration": sum(w.numel() for w in segments) / sample_rate,
        "extra": {k: v for k, v in meta.items() if k not in CONVERSATION_FIELDS},
    }


def conversation_sample(
    shard: str, key: str, members: dict[str, bytes], **settings
) -> dict | tuple | None:
    """The loader's sample of a shard sample holding a conversation (``key``, ``shard``,
    ``sample_rate`` and :func:`read_conversation`'s fields), or (skip reason, detail); None when
    it holds no conversation (a single-turn sample, or JSON the loader reports itself)."""
    raw = members.get("json", b"")
    if b'"conversation"' not in raw:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(meta, dict) and "conversation" in meta):
        return None
    found = read_conversation(meta, members, key, **settings)
    if isinstance(found, tuple):
        return found
    return {"key": key, "shard": shard, "sample_rate": settings["sample_rate"], **found}
