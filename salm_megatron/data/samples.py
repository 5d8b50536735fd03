"""From a decoded shard sample to a tokenized :class:`SpeechSample`, keeping streams resumable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from .batching import Resumable
from .collate import SpeechSample
from .conversation import Message, prompt_messages, single_turn, with_system
from .prompts import conversation_prompt, instruction, no_system_prompt
from .tokenizers import Tokenizer


def _conversation(raw: dict, answer: bool = True):
    """(messages, segments, what each segment says) of a decoded sample: a single-turn sample
    is a user turn (its audio, then its instruction) and, with ``answer``, the reply."""
    if "conversation" in raw:
        segments = raw["segments"]
        return raw["conversation"], segments, raw.get("transcripts") or [None] * len(segments)
    context = instruction(raw.get("task"), raw.get("context"), raw.get("lang"))
    spoken = (raw.get("extra") or {}).get("transcript")
    if spoken is None and raw.get("task") == "asr":
        spoken = raw["answer"]
    messages = single_turn(context, raw["answer"] if answer else None)
    return messages, [raw["audio"]], [spoken if isinstance(spoken, str) else None]


def _instructed(raw: dict, messages: list[Message], fmt: str) -> list[Message]:
    """A hand-written format needs an instruction: a conversation's user turn without text gets
    its task's default one."""
    if fmt == "chat" or not messages or messages[0].role != "user" or messages[0].text:
        return messages
    text = instruction(raw.get("task"), None, raw.get("lang"))
    return [Message("user", (*messages[0].parts, text)), *messages[1:]]


def _bestow_order(raw: dict, messages: list[Message], loss_on: str) -> list[int]:
    """BESTOW's segments (every one the turns name, in order): its text attends to all of them at
    once, so no learned answer may come before audio of a later turn."""
    trained = [i for i, m in enumerate(messages) if m.role == "assistant"]
    trained = trained[-1:] if loss_on == "last" else trained
    if trained and any(m.audio for m in messages[trained[0] + 1 :]):
        raise ValueError(
            f"sample {raw.get('key')}: BESTOW's text attends to all of a sample's audio at once, "
            f"so assistant turn {trained[0]}, learned with data.loss_on={loss_on!r}, would hear "
            "the audio of later turns; use data.loss_on=last with audio only before the last "
            "answer, or model.arch=salm"
        )
    return sorted(p for m in messages for p in m.audio)


def make_sample(
    raw: dict,
    tokenizer: Tokenizer,
    prompt_format: str,
    arch: str,
    ctc_tokenizer: Tokenizer | None = None,
    *,
    loss_on: str = "all",
    chat_template_kwargs: Optional[dict] = None,
) -> SpeechSample:
    """Prompt + answer of one decoded sample (single-turn, or a conversation: ``loss_on`` says
    which assistant turns are learned): SALM prompts carry one audio placeholder per segment,
    and the segments follow their placeholders' order. What is spoken (auxiliary CTC target,
    in ``ctc_tokenizer``'s ids, default ``tokenizer``'s) is the JSON's ``transcript``, else the
    answer of an ``asr`` sample, else (conversations) each audio part's ``transcript``."""
    messages, segments, spoken = _conversation(raw)
    messages = _instructed(raw, messages, prompt_format)
    salm = arch == "salm"
    prompt, order = conversation_prompt(
        tokenizer, prompt_format, messages, audio=salm, loss_on=loss_on,
        variables=chat_template_kwargs,
    )  # fmt: skip
    if not salm:
        order = _bestow_order(raw, messages, loss_on)
    spelled = ctc_tokenizer or tokenizer
    transcripts = [spelled.encode(spoken[i]) if spoken[i] else None for i in order]
    return SpeechSample(
        prompt.input_ids, prompt.answer_mask, [segments[i] for i in order], key=raw.get("key"),
        transcripts=transcripts,
    )  # fmt: skip


def prompt_sample(
    raw: dict,
    tokenizer: Tokenizer,
    prompt_format: str,
    arch: str,
    *,
    system: Optional[str] = None,
    chat_template_kwargs: Optional[dict] = None,
) -> SpeechSample:
    """What a model continues to answer a decoded sample: its turns before the last answer (the
    generation prompt), with the audio they hold; ``system`` opens it when it has no system
    turn (``decode.system_prompt``, chat only)."""
    if prompt_format != "chat":
        no_system_prompt(prompt_format, system)
    messages, segments, _ = _conversation(raw, answer=False)
    messages = with_system(prompt_messages(_instructed(raw, messages, prompt_format)), system)
    salm = arch == "salm"
    prompt, order = conversation_prompt(
        tokenizer, prompt_format, messages, audio=salm, variables=chat_template_kwargs,
        add_generation_prompt=True,
    )  # fmt: skip
    if not salm:
        order = sorted(p for m in messages for p in m.audio)
    ids = prompt.input_ids
    return SpeechSample(ids, [0] * len(ids), [segments[i] for i in order], key=raw.get("key"))


class Mapped:
    """``fn`` applied to every item of a resumable stream; resumes with it."""

    def __init__(self, source: Resumable, fn: Callable[[Any], Any]):
        self.source, self.fn = source, fn

    def __iter__(self) -> Iterator[Any]:
        return map(self.fn, self.source)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
