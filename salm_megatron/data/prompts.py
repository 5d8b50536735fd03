"""Prompt formats: a sample's instruction and answer as token ids with an answer-only loss mask.

The prompt (instruction, chat headers, audio placeholders) is context; the answer and its end
token (EOS, or ``<|eot_id|>`` for Llama 3 chat) are what the model learns to produce, so only they
are marked in ``answer_mask``. SALM prompts carry one audio placeholder per segment at the start
of the user turn; BESTOW prompts carry none (``audio_segments=0``).

Formats: ``plain``, ``llama2`` and ``llama3`` are written here, for one user turn and its answer;
``chat`` renders the tokenizer's own chat template (``data/chat.py``), for any conversation
(system, user and assistant turns, audio where it sits in a user turn). :func:`conversation_prompt`
takes a conversation in any format (the hand-written ones: a user turn and its answer, their
placeholders at the start of the user's turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import PROMPT_FORMATS
from .chat import chat_template
from .conversation import Message, single_turn, with_system
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
    if fmt == "chat":
        return conversation_prompt(tokenizer, fmt, single_turn(context, answer, audio_segments))[0]
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
    tokenizer: Tokenizer,
    fmt: str,
    context: str,
    audio_segments: int = 1,
    system: Optional[str] = None,
    variables: Optional[dict] = None,
) -> tuple[list[int], int]:
    """The tokens a model continues to answer (everything before the answer), and the token
    that ends an answer in ``fmt`` (EOS, ``<|eot_id|>`` for Llama 3, the chat template's
    end-of-turn token). ``system`` opens the prompt with a system turn (``chat`` only);
    ``variables``: the chat template's ``data.chat_template_kwargs``."""
    if fmt == "chat":
        messages = with_system(single_turn(context, None, audio_segments), system)
        template = chat_template(tokenizer, variables)
        return template.encode(messages, add_generation_prompt=True).input_ids, template.end_id
    no_system_prompt(fmt, system)
    prompt = build_prompt(tokenizer, fmt, context, "", audio_segments)
    start = prompt.answer_mask.index(1)
    return prompt.input_ids[:start], prompt.input_ids[-1]


def no_system_prompt(fmt: str, system: Optional[str]) -> None:
    if system:
        raise ValueError(
            f"a system prompt ({system!r}, decode.system_prompt) needs data.prompt_format=chat "
            f"(the tokenizer's chat template); data.prompt_format={fmt!r} has no system turn"
        )


def conversation_prompt(
    tokenizer: Tokenizer,
    fmt: str,
    messages: list[Message],
    *,
    audio: bool = True,
    loss_on: str = "all",
    variables: Optional[dict] = None,
    add_generation_prompt: bool = False,
) -> tuple[Prompt, list[int]]:
    """Ids and answer mask of a conversation, and the segment of each audio placeholder in the
    order of the ids (``audio=False``, BESTOW: no placeholders). ``add_generation_prompt``: a
    prompt to continue (``messages`` end before the answer). ``loss_on``: every assistant turn
    learned, or the last (``data.loss_on``). Hand-written formats take one user turn and its
    answer (or the user turn alone, to continue), its placeholders at the start of its turn."""
    if fmt == "chat":
        template = chat_template(tokenizer, variables)
        chat = template.encode(
            messages, loss_on=loss_on, audio=audio, add_generation_prompt=add_generation_prompt
        )
        return Prompt(chat.input_ids, chat.answer_mask), chat.audio_order
    roles = [m.role for m in messages]
    no_system_prompt(fmt, next((m.text for m in messages if m.role == "system"), None))
    if roles != ["user", "assistant"][: 1 if add_generation_prompt else 2]:
        raise ValueError(
            f"data.prompt_format={fmt!r} writes one user turn and its answer; this conversation "
            f"has turns {', '.join(roles)}: use data.prompt_format=chat (the tokenizer's own chat "
            "template)"
        )
    user = messages[0]
    order = list(user.audio) if audio else []
    if add_generation_prompt:
        ids, _ = generation_prompt(tokenizer, fmt, user.text, len(order))
        return Prompt(ids, [0] * len(ids)), order
    return build_prompt(tokenizer, fmt, user.text, messages[1].text, len(order)), order
