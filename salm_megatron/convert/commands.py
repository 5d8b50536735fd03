"""``salm convert SUBCOMMAND``: one entry per conversion, imported only when it runs."""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function" taking argv and returning an exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "hf-to-mcore": (
        "salm_megatron.convert.hf_llm:hf_to_mcore_main",
        "Hugging Face Llama/Mistral/Qwen2 folder -> LLM dist checkpoint (pretrained_llm)",
    ),
    "mcore-to-hf": (
        "salm_megatron.convert.hf_llm:mcore_to_hf_main",
        "LLM of a Megatron checkpoint (LoRA merged) -> Hugging Face folder",
    ),
    "nemo-encoder": (
        "salm_megatron.convert.nemo_encoder:main",
        "FastConformer encoder of a NeMo ASR .nemo (Canary, Parakeet) -> encoder checkpoint",
    ),
    "hf-whisper-encoder": (
        "salm_megatron.convert.whisper_encoder:main",
        "encoder of a local Hugging Face Whisper folder -> encoder checkpoint",
    ),
}


def main(argv: list[str]) -> int:
    width = max(map(len, SUBCOMMANDS), default=0)
    usage = "usage: salm convert SUBCOMMAND [--help] ...\n\nsubcommands:\n" + "".join(
        f"  {name:<{width}} {help_}\n" for name, (_, help_) in SUBCOMMANDS.items()
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    entry = SUBCOMMANDS.get(argv[0])
    if entry is None:
        print(f"salm convert: unknown subcommand {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    module, function = entry[0].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])
