"""Each step's micro-batches for this rank: read on the first and last pipeline stages only.

Every rank of one data-parallel rank's model (its TP ranks, first and last PP stages) reads the
same samples, so nothing is broadcast. Stages in between read nothing; the step's sequence length
(the one shape every micro-batch is padded to) reaches them through a max-all-reduce over the
pipeline group.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from megatron.core import parallel_state

from ..config import Config, ConfigError
from ..data import collate
from ..data.batching import BucketBatcher, GlobalBatches, llm_sequence_length, token_cost
from ..data.loader import LoadedStream, SampleStream
from ..data.samples import Mapped, make_sample
from ..data.tokenizers import Tokenizer
from ..parallel import max_over_ranks


def check_tokenizer(cfg: Config, tokenizer: Tokenizer) -> None:
    """The LLM's embedding must hold every id the tokenizer makes (and SALM's placeholder)."""
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.path} uses ids up to {tokenizer.vocab_size - 1} (audio "
            f"placeholder included) but llm.vocab_size={cfg.llm.vocab_size}"
        )
    if cfg.model.arch == "salm" and tokenizer.audio_token_id != cfg.placeholder_id:
        raise ConfigError(
            f"tokenizer {tokenizer.path} has the audio placeholder at id "
            f"{tokenizer.audio_token_id}, the model expects model.audio_token_id="
            f"{cfg.placeholder_id}; set model.audio_token_id={tokenizer.audio_token_id}"
        )


def reads_data() -> bool:
    """Whether this rank holds the first or the last layers (and so needs the batch)."""
    return parallel_state.is_pipeline_first_stage(
        ignore_virtual=True
    ) or parallel_state.is_pipeline_last_stage(ignore_virtual=True)


@dataclass
class Step:
    """One optimizer step's input on this rank."""

    microbatches: list[dict] | None  # None on ranks that read no data
    sequence_length: int
    keys: list[str]  # sample keys, in order (empty on ranks that read no data)
    samples: int = 0
    llm_tokens: int = 0  # unpadded positions in the LLM's sequence
    audio_seconds: float = 0.0


class StepBatches:
    """Steps of ``num_microbatches`` micro-batches from webdataset shards; resumable exactly.

    ``state_dict`` covers exactly the steps handed out (load it before iterating).
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Tokenizer,
        shards: str,
        pad_multiple: int,
        *,
        train: bool,
        seed: int,
    ):
        data = cfg.data
        self.cfg, self.pad_id = cfg, tokenizer.pad_id
        self.sample_rate = cfg.encoder.features.sample_rate
        self.length = llm_sequence_length(cfg)
        self.groups = None
        if reads_data():
            self.stream = SampleStream(
                shards,
                sample_rate=self.sample_rate,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
                seed=seed,
                shuffle=train,
                shuffle_buffer=data.shuffle_buffer if train else 0,
                min_duration=data.min_duration,
                max_duration=data.max_duration,
                default_task=data.default_task,
                default_context=data.default_context,
                repeat=True,
            )
            samples = Mapped(
                LoadedStream(self.stream, num_workers=data.num_workers),
                lambda raw: make_sample(raw, tokenizer, data.prompt_format, cfg.model.arch),
            )
            size = (
                {"max_tokens": data.max_tokens}
                if data.max_tokens is not None
                else {"batch_size": data.micro_batch_size}
            )
            batcher = BucketBatcher(
                samples,
                token_cost(cfg),
                window=data.bucket_window if train else data.micro_batch_size,
                seed=seed,
                **size,
            )
            self.groups = GlobalBatches(
                batcher, cfg.train.num_microbatches, self.length, multiple=pad_multiple
            )
        self._iterator: Iterator | None = None

    @property
    def skipped(self) -> dict[str, int]:
        """Samples the loader skipped, by reason (this rank's stream)."""
        return self.stream.stats if self.groups is not None else {}

    def __next__(self) -> Step:
        if self.groups is None:
            step = Step(None, 0, [])
        else:
            if self._iterator is None:
                self._iterator = iter(self.groups)
            group, length = next(self._iterator)
            samples = [s for microbatch in group for s in microbatch]
            step = Step(
                [collate(microbatch, self.pad_id) for microbatch in group],
                length,
                [s.key for s in samples],
                samples=len(samples),
                llm_tokens=sum(self.length(s) for s in samples),
                audio_seconds=sum(len(w) for s in samples for w in s.audio) / self.sample_rate,
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            step.sequence_length = max_over_ranks(
                step.sequence_length, parallel_state.get_pipeline_model_parallel_group()
            )
        return step

    def __iter__(self):
        return self

    def state_dict(self) -> dict | None:
        return self.groups.state_dict() if self.groups is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.groups is None:
            return
        if state is None:
            raise ValueError("the checkpoint has no data state for this data-reading rank")
        self.groups.load_state_dict(state)
        self._iterator = None
