"""One interface over sentencepiece ``.model`` and Hugging Face ``tokenizer.json`` tokenizers.

Besides text <-> ids, prompts need BOS/EOS, named special tokens (chat headers) and the audio
placeholder id. One rule places the placeholder, the same for training, decoding and conversion:

1. the tokenizer's own ``<|audio|>`` token, if it has one (else Qwen2-Audio's ``<|AUDIO|>``);
2. else its last reserved token (Llama 3's ``<|reserved_special_token_N|>``, Mistral v0.3's
   ``[control_N]``), whose embedding row the pretrained LLM never learned from;
3. else the first id after its vocabulary: a padded embedding row, or one ``salm convert
   hf-to-mcore`` adds when the embedding has none (``vocab_size`` counts it).

Text never produces the placeholder (nor any special token): a transcript that happens to contain
``<|audio|>`` stays text; prompt builders insert the ids of special tokens directly. Chat
templates (``data/chat.py``) write their special tokens as text: :meth:`Tokenizer.chat_spans` reads
those as their ids, in the template's text only.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

AUDIO_TOKEN = "<|audio|>"
QWEN2_AUDIO_TOKEN = "<|AUDIO|>"  # Qwen2-Audio's placeholder, taken when there is no <|audio|>
# Tokens a tokenizer keeps unused for later (Llama 3, Mistral v0.3, Gemma).
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>|\[control_\d+\]|<unused\d+>")

# Names tried, in order, when a tokenizer.json comes without tokenizer_config.json.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>")
# The named special tokens a chat template sees (as transformers passes them), from
# tokenizer_config.json.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")  # fmt: skip


class Tokenizer:
    """Text <-> ids, plus the ids a prompt needs."""

    path: Path
    base_vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    audio_token_id: int
    audio_token_origin: str  # why the placeholder is where it is, for messages

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        return self.encode_split(text, ())[0]

    def encode_split(self, text: str, cuts: Sequence[int]) -> list[list[int]]:
        """The tokens of ``text`` as the tokenizer makes them for the whole text, cut at the
        character positions ``cuts`` (ascending) into ``len(cuts) + 1`` parts. Text that
        continues other text (an answer after its prompt) so keeps the pieces it has there:
        Llama 2's ``▁four``, not the ``▁`` ``▁four`` of tokenizing `` four`` on its own."""
        parts: list[list[int]] = [[] for _ in range(len(cuts) + 1)]
        for token_id, start, end in self._spans(text):
            k = bisect.bisect_right(cuts, start)  # the part holding the token's first character
            if k < len(cuts) and cuts[k] < end:
                raise ValueError(
                    f"tokenizer {self.path}: token {token_id} spans characters {start}..{end} of "
                    f"{text!r}, across the cut at {cuts[k]}"
                )
            parts[k].append(token_id)
        return parts

    def _spans(self, text: str) -> list[tuple[int, int, int]]:
        """(id, first character, end character) of each token of ``text``."""
        raise NotImplementedError

    def token_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(id, first character, end character) of each token of ``text``, as text (no special
        token, no placeholder)."""
        return self._spans(text)

    def special_tokens(self) -> dict[str, int]:
        """The tokens a chat template writes as text that stand for one id (``<|im_start|>``,
        ``</s>``): text -> id."""
        raise NotImplementedError

    def chat_spans(self, text: str, audio_mark: str) -> Optional[list[tuple[int, int, int]]]:
        """(id, first character, end character) of the tokens of a rendered chat, made as
        transformers' ``apply_chat_template`` makes them: the whole text in one pass, every
        special token written in it as its id, each ``audio_mark`` character as the audio
        placeholder. None where the tokenizer has no such pass (sentencepiece: the chat is then
        tokenized stretch by stretch between its special tokens, ``data/chat.py``)."""
        return None

    def template_variables(self) -> dict[str, str]:
        """The named special tokens (``bos_token``, ``eos_token``, ...) a chat template sees."""
        return {}

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens and the audio placeholder are left out."""
        raise NotImplementedError

    def token_id(self, token: str) -> Optional[int]:
        """Id of a whole token such as ``<|eot_id|>``, or None when the vocabulary lacks it."""
        raise NotImplementedError

    def _reserved_tokens(self) -> Iterable[tuple[int, str]]:
        """(id, name) of the tokens it keeps unused for later."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Ids prompts use (its tokens and the audio placeholder): an ``llm.vocab_size`` that
        holds them all."""
        return max(self.base_vocab_size, self.audio_token_id + 1)

    def require(self, token: str) -> int:
        token_id = self.token_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return token_id

    def _set_audio_token(self, audio_token: str) -> None:
        """The placeholder by the rule in this module's docstring."""
        own = self.token_id(audio_token)
        if own is None and audio_token == AUDIO_TOKEN:
            own = self.token_id(QWEN2_AUDIO_TOKEN)
            audio_token = QWEN2_AUDIO_TOKEN if own is not None else audio_token
        taken = {self.bos_id, self.eos_id, self.pad_id}
        reserved = [(i, name) for i, name in self._reserved_tokens() if i not in taken]
        if own is not None:
            self.audio_token_id, self.audio_token_origin = own, f"its {audio_token} token"
        elif reserved:
            token_id, token = max(reserved)
            self.audio_token_id, self.audio_token_origin = token_id, f"its reserved token {token}"
        else:
            self.audio_token_id = self.base_vocab_size
            self.audio_token_origin = (
                f"the first id after its {self.base_vocab_size} tokens (it has neither "
                f"{audio_token} nor a reserved token)"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path}, vocab {self.vocab_size}, bos {self.bos_id}, "
            f"eos {self.eos_id}, audio {self.audio_token_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, audio_token: str = AUDIO_TOKEN):
        import sentencepiece

        self.path = path
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a sentencepiece model: {err}") from err
        self.base_vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path} has no EOS token")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._set_audio_token(audio_token)

    def _spans(self, text: str) -> list[tuple[int, int, int]]:
        # sentencepiece reports UTF-8 byte offsets; ``chars[i]`` is the byte offset of char i.
        chars = list(itertools.accumulate((len(c.encode()) for c in text), initial=0))
        pieces = self.sp.encode(text, return_type="proto").pieces
        return [
            (p.id, bisect.bisect_left(chars, p.begin), bisect.bisect_left(chars, p.end))
            for p in pieces
        ]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.base_vocab_size])

    def token_id(self, token: str) -> Optional[int]:
        token_id = self.sp.piece_to_id(token)
        unknown = token_id == self.sp.unk_id() and token != self.sp.id_to_piece(token_id)
        return None if unknown else token_id

    def _reserved_tokens(self) -> Iterable[tuple[int, str]]:
        for i in range(self.base_vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_unused(i) or RESERVED_TOKEN.fullmatch(piece):
                yield i, piece

    def special_tokens(self) -> dict[str, int]:
        # control symbols (<s>, </s>): text never makes them
        return {
            self.sp.id_to_piece(i): i for i in range(self.base_vocab_size) if self.sp.is_control(i)
        }

    def template_variables(self) -> dict[str, str]:
        named = _config_tokens(self.path.parent / "tokenizer_config.json")
        if self.bos_id is not None:
            named.setdefault("bos_token", self.sp.id_to_piece(self.bos_id))
        named.setdefault("eos_token", self.sp.id_to_piece(self.eos_id))
        return named


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json``; BOS/EOS/PAD from ``tokenizer_config.json`` beside it when present."""

    def __init__(self, path: Path, audio_token: str = AUDIO_TOKEN):
        from tokenizers import Tokenizer as Backend

        self.path = path
        try:
            self.backend = Backend.from_file(str(path))
        except Exception as err:  # the library raises plain Exception on bad files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {err}") from err
        self.backend.encode_special_tokens = True  # "<|eot_id|>" in a transcript stays text
        self._chat = None  # the backend chat_spans uses, made when first needed
        self.base_vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        named = self.named = _config_tokens(path.parent / "tokenizer_config.json")
        self.bos_id = self._first_id([named.get("bos_token"), *_BOS_NAMES])
        eos = self._first_id([named.get("eos_token"), *_EOS_NAMES])
        if eos is None:
            raise ValueError(
                f"cannot tell the EOS token of {path}: put a tokenizer_config.json with "
                "eos_token beside it"
            )
        self.eos_id = eos
        pad = self._first_id([named.get("pad_token"), *_PAD_NAMES])
        self.pad_id = eos if pad is None else pad
        self._set_audio_token(audio_token)

    def _first_id(self, names) -> Optional[int]:
        for name in names:
            if name is not None and (token_id := self.token_id(name)) is not None:
                return token_id
        return None

    def _spans(self, text: str) -> list[tuple[int, int, int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return [(i, *span) for i, span in zip(encoding.ids, encoding.offsets, strict=True)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode([i for i in ids if i < self.base_vocab_size])

    def token_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def _reserved_tokens(self) -> Iterable[tuple[int, str]]:
        added = self.backend.get_added_tokens_decoder().items()  # reserved tokens are added ones
        return ((i, t.content) for i, t in added if RESERVED_TOKEN.fullmatch(t.content))

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

    def chat_spans(self, text: str, audio_mark: str) -> list[tuple[int, int, int]]:
        backend, mark = self._chat_backend(audio_mark)
        encoding = backend.encode(text, add_special_tokens=False)
        return [
            (self.audio_token_id if i == mark else i, *span)
            for i, span in zip(encoding.ids, encoding.offsets, strict=True)
        ]

    def _chat_backend(self, audio_mark: str):
        """A copy of the backend that reads special tokens in text (as transformers does), with
        ``audio_mark`` added as one more; and the id that mark gets there (made once)."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        if self._chat is None or self._chat[0] != audio_mark:
            backend = Backend.from_str(self.backend.to_str())
            backend.add_special_tokens([AddedToken(audio_mark, special=True, normalized=False)])
            backend.encode_special_tokens = False
            self._chat = audio_mark, backend, backend.token_to_id(audio_mark)
        return self._chat[1:]

    def template_variables(self) -> dict[str, str]:
        named = dict(self.named)
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if key not in named and token_id is not None:
                named[key] = self.backend.id_to_token(token_id)
        return named


def _config_tokens(config: Path) -> dict[str, str]:
    """The named special tokens of a ``tokenizer_config.json`` (none when there is none)."""
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON: {err}") from err
    names = {}
    for key in NAMED_TOKENS:
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def load_tokenizer(path: str | Path, audio_token: str = AUDIO_TOKEN) -> Tokenizer:
    """A sentencepiece ``.model``, a ``tokenizer.json``, or a folder holding either."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, audio_token)
        raise ValueError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist")
    if path.suffix == ".json":
        return HFTokenizer(path, audio_token)
    return SentencePieceTokenizer(path, audio_token)
