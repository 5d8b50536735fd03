"""Tokenizers built with the layouts of real LLMs' (small vocabularies, the real special tokens,
ids and normalisation), for the placeholder and prompt tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.speech_fixtures import CORPUS

# Besides the shared corpus: the words and markup of the prompt formats, so pieces such as
# "▁four", "▁[" and "INST" exist as they do in real vocabularies.
TEXT = [
    *CORPUS,
    *["[INST] what is the sum of the numbers [/INST] four", "Q: what is it\nA: ten"] * 20,
    *["Transcribe the audio. Translate the audio into German. What does the speaker ask for?"] * 5,
    *["0 1 2 3 4 5 6 7 8 9: the sum of 42 and 7 is 49."] * 5,
]

# Llama 3.1's 256 special tokens at ids 128000..128255, in order.
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]  # fmt: skip
LLAMA3_BASE = 128000
# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern with 1-3 digit numbers).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_tokenizer(folder: Path) -> Path:
    """A Llama 3.1 layout: byte-level BPE with Llama 3's split, ids 0..127999 for text (a small
    trained vocabulary, then unused filler entries) and the 256 special tokens at 128000..128255,
    248 of them reserved; tokenizer_config.json as Llama 3.1 Instruct's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), LLAMA3_BASE)})
    spec["added_tokens"] = [
        {"id": LLAMA3_BASE + i, "content": name, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, name in enumerate(LLAMA3_SPECIAL)
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def llama2_sentencepiece(folder: Path, vocab_size: int = 384) -> Path:
    """A Llama 2 layout: sentencepiece BPE with <unk> <s> </s> at 0 1 2, byte fallback, split
    digits, a dummy prefix and no whitespace normalisation; ``vocab_size`` ids, no spare one."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return folder / "tokenizer.model"


MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[control_8]", "[control_9]"]


def mistral_tokenizer(folder: Path) -> Path:
    """A Mistral v0.3 layout in tokenizer.json form: BPE behind a Metaspace pre-tokenizer that
    prepends "▁" (Hugging Face's form of the dummy prefix), special tokens first, two of them
    unused control tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=MISTRAL_SPECIAL, show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
