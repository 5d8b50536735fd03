"""NeMo-style JSONL manifests: one JSON object a line -> validated rows, or why a row is bad.

A row names its audio (``audio_filepath``, relative paths resolved against the manifest's folder),
optionally a segment of it (``offset``, ``duration`` in seconds), the answer (``answer`` or
``text``), optionally the instruction (``context`` or ``question``) and any other fields, which
are kept. Checks that need no audio happen here; :mod:`.shards` checks the audio itself. A bad row
becomes a :class:`BadRow` naming the manifest, the line and the reason, so a converter can skip and
count it or stop at it.

A row with ``conversations`` is a NeMo speechlm2 multi-turn conversation (the format of NeMo's
``NeMoMultimodalConversationJsonlAdapter``): ``{"id": ..., "conversations": [{"from": "User" |
"Assistant" | "System", "type": "text" | "audio", "value": text or audio path, "offset": s,
"duration": s}, ...], "custom": {...}}``; roles are ``from`` lowercased, audio paths resolve
against the manifest's folder, consecutive turns of one role make one message (NeMo joins them
with a space), and ``custom._skipme`` skips the row as NeMo does (counted here). It becomes a
:class:`ConversationRow`: one sample with all its audio segments.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from .conversation import ROLES, Message

# Why a row was rejected; index.json counts skipped rows under these names.
REASONS = (
    "invalid_json",  # not UTF-8, not JSON, or not a JSON object
    "missing_audio_filepath",  # no audio_filepath, or not a non-empty string
    "missing_text",  # no answer/text, or empty, or not a string
    "bad_duration",  # duration not a finite number > 0
    "bad_offset",  # offset not a finite number >= 0
    "missing_file",  # audio_filepath does not exist
    "unreadable_audio",  # the audio cannot be decoded (or holds no samples)
    "offset_past_end",  # offset at or after the end of the audio
    "segment_past_end",  # offset + duration runs past the end of the audio
    "bad_conversation",  # conversations not a list of turns of type text|audio with a value
    "unknown_role",  # a turn's "from" is not User, Assistant or System
    "no_assistant_turn",  # a conversation without an assistant turn (nothing to learn)
    "marked_skip",  # custom._skipme is set (NeMo skips such rows)
)

# Fields with a meaning of their own; every other field of a row is kept as is.
_ANSWER_FIELDS = ("answer", "text")  # the first present one is the answer
_CONTEXT_FIELDS = ("context", "question")
_SEGMENT_FIELDS = ("audio_filepath", "offset", "duration")


@dataclass(frozen=True)
class BadRow:
    """A row that cannot become a sample, and why."""

    reason: str  # one of REASONS
    manifest: str
    line: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.manifest}:{self.line}: {self.reason}: {self.message}"


@dataclass(frozen=True)
class ManifestRow:
    """A row that passed every check that needs no audio."""

    manifest: str
    line: int  # 1-based
    key: str  # webdataset-safe sample key, unique across the manifests of one run
    audio: str  # resolved path
    answer: str
    offset: float = 0.0
    duration: float | None = None  # None: to the end of the audio
    context: str | None = None
    extra: dict = field(default_factory=dict)  # every other field (task, lang, ...)


@dataclass(frozen=True)
class Segment:
    """One audio turn of a conversation row."""

    audio: str  # resolved path
    offset: float = 0.0
    duration: float | None = None  # None: to the end of the audio
    transcript: str | None = None  # what is said, when the turn tells (NeMo's "text")


@dataclass(frozen=True)
class ConversationRow:
    """A conversation that passed every check that needs no audio: its messages, whose audio
    parts index ``segments``."""

    manifest: str
    line: int
    key: str
    messages: tuple[Message, ...]
    segments: tuple[Segment, ...]
    extra: dict = field(default_factory=dict)  # every other field (id, custom, ...)


def safe_key(text: str) -> str:
    """``text`` with everything but letters, digits, ``_`` and ``-`` replaced by ``_``.

    webdataset groups a sample's files by the name up to the first dot, so a key has no dots (and
    no slashes, which would make folders inside the tar)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def key_prefixes(manifests: list[str | Path]) -> list[str]:
    """One key prefix per manifest: its file name without ``.json``/``.jsonl``, made safe and cut
    to 64 characters, with ``_2``, ``_3`` ... appended where two manifests would share one."""
    prefixes, seen = [], {}
    for path in manifests:
        name = Path(path).name
        for suffix in (".jsonl", ".json"):
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
        base = safe_key(name)[:64]  # tar (USTAR) names are at most 100 characters
        seen[base] = seen.get(base, 0) + 1
        prefix = base if seen[base] == 1 else f"{base}_{seen[base]}"
        while prefix in prefixes:  # e.g. a manifest literally named "train_2.jsonl"
            seen[base] += 1
            prefix = f"{base}_{seen[base]}"
        prefixes.append(prefix)
    return prefixes


def _number(value) -> float | None:
    """``value`` as a finite float, or None when it is not a finite number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_row(
    raw: bytes | str, manifest: str, line: int, key: str
) -> ManifestRow | ConversationRow | BadRow:
    """One manifest line -> a :class:`ManifestRow` (a :class:`ConversationRow` when it holds
    ``conversations``), or the :class:`BadRow` saying what is wrong."""

    def bad(reason: str, message: str) -> BadRow:
        return BadRow(reason, manifest, line, message)

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        row = json.loads(text.strip())
    except UnicodeDecodeError as err:
        return bad("invalid_json", f"not UTF-8 ({err.reason} at byte {err.start})")
    except json.JSONDecodeError as err:
        return bad("invalid_json", f"not valid JSON ({err.msg} at column {err.colno})")
    if not isinstance(row, dict):
        return bad("invalid_json", f"expected a JSON object, got {type(row).__name__}")

    if "conversations" in row:
        return _conversation_row(row, bad, manifest, line, key)
    audio = row.get("audio_filepath")
    if not isinstance(audio, str) or not audio.strip():
        return bad("missing_audio_filepath", f"audio_filepath={audio!r} is not a file path")
    answer_field = next((name for name in _ANSWER_FIELDS if name in row), None)
    if answer_field is None:
        return bad("missing_text", "no 'answer' or 'text' field")
    answer = row[answer_field]
    if not isinstance(answer, str) or not answer.strip():
        return bad("missing_text", f"{answer_field}={answer!r} is empty or not a string")
    context_field = next((name for name in _CONTEXT_FIELDS if name in row), None)
    context = row[context_field] if context_field else None
    if context is not None and not isinstance(context, str):
        return bad("missing_text", f"{context_field}={context!r} is not a string")

    duration = row.get("duration")
    if duration is not None:
        duration = _number(duration)
        if duration is None or duration <= 0:
            return bad("bad_duration", f"duration={row['duration']!r} must be a number > 0")
    offset = row.get("offset", 0.0)
    offset = 0.0 if offset is None else _number(offset)
    if offset is None or offset < 0:
        return bad("bad_offset", f"offset={row['offset']!r} must be a number >= 0")

    path = _resolve(audio, manifest)
    used = {*_SEGMENT_FIELDS, answer_field}
    if context_field:
        used.add(context_field)
    extra = {name: value for name, value in row.items() if name not in used}
    return ManifestRow(
        manifest=manifest,
        line=line,
        key=key,
        audio=str(path),
        answer=answer,
        offset=offset,
        duration=duration,
        context=context,
        extra=extra,
    )


def _resolve(audio: str, manifest: str) -> Path:
    path = Path(audio).expanduser()
    return path if path.is_absolute() else Path(manifest).resolve().parent / path


def _conversation_row(row: dict, bad, manifest: str, line: int, key: str):
    """A NeMo conversation row -> a :class:`ConversationRow`, or the :class:`BadRow`."""
    custom = row.get("custom")
    if isinstance(custom, dict) and custom.get("_skipme"):
        return bad("marked_skip", f"custom._skipme={custom['_skipme']!r}")
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        return bad("bad_conversation", f"conversations={turns!r} is not a non-empty list of turns")
    parts, segments = [], []  # parts: (role, text or segment index)
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            return bad("bad_conversation", f"{where}={turn!r} is not an object")
        speaker, kind, value = turn.get("from"), turn.get("type"), turn.get("value")
        role = speaker.lower() if isinstance(speaker, str) else None
        if role not in ROLES:
            return bad("unknown_role", f"{where}.from={speaker!r} is not User, Assistant or System")
        if kind not in ("text", "audio") or not isinstance(value, str):
            return bad(
                "bad_conversation",
                f"{where}: type={kind!r}, value={value!r}: want type text|audio and a string value",
            )
        if kind == "text":
            if role == "assistant" and not value.strip():
                return bad("missing_text", f"{where}.value={value!r}: the assistant says nothing")
            parts.append((role, value))
            continue
        if role != "user":
            return bad("bad_conversation", f"{where}: audio in a {speaker} turn (only users speak)")
        if not value.strip():
            return bad("missing_audio_filepath", f"{where}.value={value!r} is not a file path")
        duration, offset = turn.get("duration"), turn.get("offset", 0.0)
        if duration is not None and ((d := _number(duration)) is None or d <= 0):
            return bad("bad_duration", f"{where}.duration={duration!r} must be a number > 0")
        start = 0.0 if offset is None else _number(offset)
        if start is None or start < 0:
            return bad("bad_offset", f"{where}.offset={offset!r} must be a number >= 0")
        text = turn.get("text")
        said = text if isinstance(text, str) and text.strip() else None
        seconds = None if duration is None else float(duration)
        segments.append(Segment(str(_resolve(value, manifest)), start, seconds, said))
        parts.append((role, len(segments) - 1))
    messages = tuple(
        Message(role, tuple(part for _, part in group))
        for role, group in groupby(parts, key=lambda item: item[0])
    )
    if not any(m.role == "assistant" for m in messages):
        return bad("no_assistant_turn", "the conversation has no Assistant turn to learn")
    extra = {name: value for name, value in row.items() if name != "conversations"}
    return ConversationRow(manifest, line, key, messages, tuple(segments), extra)


def read_manifest(
    path: str | Path, prefix: str
) -> Iterator[ManifestRow | ConversationRow | BadRow]:
    """Every non-blank line of ``path`` as a row or a bad row; keys are ``<prefix>-<line:06d>``.

    Raises OSError when the manifest itself cannot be read (that is no one row's fault)."""
    manifest = str(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield parse_row(raw, manifest, number, f"{prefix}-{number:06d}")
