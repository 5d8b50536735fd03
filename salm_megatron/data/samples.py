"""From a decoded shard sample to a tokenized :class:`SpeechSample`, keeping streams resumable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .batching import Resumable
from .collate import SpeechSample
from .prompts import build_prompt, generation_prompt, instruction
from .tokenizers import Tokenizer


def make_sample(
    raw: dict,
    tokenizer: Tokenizer,
    prompt_format: str,
    arch: str,
    ctc_tokenizer: Tokenizer | None = None,
) -> SpeechSample:
    """Prompt + answer of one decoded sample: SALM prompts carry the audio placeholder. What is
    spoken (auxiliary CTC target, in ``ctc_tokenizer``'s ids, default ``tokenizer``'s) is the
    JSON's ``transcript``, else the answer of an ``asr`` sample, else unknown."""
    context = instruction(raw.get("task"), raw.get("context"), raw.get("lang"))
    segments = 1 if arch == "salm" else 0
    prompt = build_prompt(tokenizer, prompt_format, context, raw["answer"], segments)
    spoken = (raw.get("extra") or {}).get("transcript")
    if spoken is None and raw.get("task") == "asr":
        spoken = raw["answer"]
    spelled = ctc_tokenizer or tokenizer
    transcripts = [spelled.encode(spoken) if isinstance(spoken, str) and spoken else None]
    return SpeechSample(
        prompt.input_ids, prompt.answer_mask, [raw["audio"]], key=raw.get("key"),
        transcripts=transcripts,
    )  # fmt: skip


def prompt_sample(raw: dict, tokenizer: Tokenizer, prompt_format: str, arch: str) -> SpeechSample:
    """What a model continues to answer a decoded sample (its prompt, no answer)."""
    context = instruction(raw.get("task"), raw.get("context"), raw.get("lang"))
    segments = 1 if arch == "salm" else 0
    ids, _ = generation_prompt(tokenizer, prompt_format, context, segments)
    return SpeechSample(ids, [0] * len(ids), [raw["audio"]], key=raw.get("key"))


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
