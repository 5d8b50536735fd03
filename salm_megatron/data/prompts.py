"""Prompt formats: a sample's instruction and answer as token ids with an answer-only loss mask.

The prompt (instruction, chat headers, audio placeholders) is context; the answer and its end
token (EOS, or ``<|eot_id|>`` for Llama 3 chat) are what the model learns to produce, so only they
are marked in ``answer_mask``. SALM prompts carry one audio placeholder per segment at the start
of the user turn; BESTOW prompts carry none (``audio_segments=0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import PROMPT_FORMATS
from .tokenizers import Tokenizer

# Used when a sample has no context of its own.
DEFAULT_INSTRUCTIONS = {
    "asr": "Transcribe the audio.",
    "ast": "Translate the audio into {lang}.",
    "slu": "What does the speaker ask for?",
}


@dataclass
class Prompt:
    input_ids: list[int]
    answer_mask: list[int]  # 1 on the answer tokens and the end token


def instruction(task: Optional[str], context: Optional[str], lang: Optional[str] = None) -> str:
    """The sample's own context, else its task's default instruction."""
    if context:
        return context
    template = DEFAULT_INSTRUCTIONS.get(task or "")
    if template is None:
        what = "no task" if task is None else f"task {task!r}, which has no default instruction"
        raise ValueError(
            f"the sample has no context and {what} (tasks with one: "
            f"{', '.join(DEFAULT_INSTRUCTIONS)})"
        )
    if "{lang}" in template and not lang:
        raise ValueError(f"task {task!r} needs the sample's lang for its default instruction")
    return template.format(lang=lang)


def build_prompt(
    tokenizer: Tokenizer,
    fmt: str,
    context: str,
    answer: str,
    audio_segments: int = 1,
) -> Prompt:
    """Token ids and answer mask of one sample in format ``fmt``.

    Each stretch of text between special tokens is tokenized whole and cut where the audio and
    the answer go, so the pieces are the ones the LLM saw in pretraining (Llama 2's ``▁four``
    after ``[/INST]``, not a stray ``▁`` before it); ``answer=""`` gives the same prompt ids.
    """
    audio = [tokenizer.audio_token_id] * audio_segments
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    context, answer = context.strip(), answer.strip()
    spaced = f" {answer}" if answer else ""
    if fmt == "plain":  # "Q: {context}\nA: {answer}"
        question = f"Q: {context}\nA:"
        asked, said = tokenizer.encode_split(question + spaced, [len(question)])
        prompt = bos + audio + asked
        reply = said + [tokenizer.eos_id]
    elif fmt == "llama2":  # "<s>[INST] {context} [/INST] {answer} </s>", audio after "[INST]"
        inst = "[INST]"
        question = f"{inst} {context} [/INST]"
        opening, asked, said = tokenizer.encode_split(question + spaced, [len(inst), len(question)])
        prompt = bos + opening + audio + asked
        reply = said + [tokenizer.eos_id]
    elif fmt == "llama3":  # Llama 3's chat template, audio at the start of the user's turn
        header = [tokenizer.require("<|start_header_id|>")]
        end_header = [tokenizer.require("<|end_header_id|>")]
        eot = [tokenizer.require("<|eot_id|>")]
        user_break, asked = tokenizer.encode_split("\n\n" + context, [2])
        assistant_break, said = tokenizer.encode_split("\n\n" + answer, [2])
        prompt = (
            [tokenizer.require("<|begin_of_text|>")]
            + header + tokenizer.encode("user") + end_header + user_break + audio + asked + eot
            + header + tokenizer.encode("assistant") + end_header + assistant_break
        )  # fmt: skip
        reply = said + eot
    else:
        raise ValueError(f"prompt format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    return Prompt(prompt + reply, [0] * len(prompt) + [1] * len(reply))


def generation_prompt(
    tokenizer: Tokenizer, fmt: str, context: str, audio_segments: int = 1
) -> tuple[list[int], int]:
    """The tokens a model continues to answer (everything before the answer), and the token
    that ends an answer in ``fmt`` (EOS, or ``<|eot_id|>`` for Llama 3)."""
    prompt = build_prompt(tokenizer, fmt, context, "", audio_segments)
    start = prompt.answer_mask.index(1)
    return prompt.input_ids[:start], prompt.input_ids[-1]
