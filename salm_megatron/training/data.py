"""Each step's micro-batches for this rank: read on the first and last pipeline stages only.

Every rank of one data-parallel rank's model (its TP and CP ranks, first and last PP stages)
reads the same samples, so nothing is broadcast. Stages in between read nothing; the step's shape
(sequence length, micro-batches and their size) reaches them through a max-all-reduce over the
pipeline group, and with packing so do the lengths of the samples in each packed row (their
attention needs the sequences' bounds), and with an MoE auxiliary loss each micro-batch's answer
tokens (their routers weigh it by them, ``llm/moe.py``).

Micro-batches are length buckets (``data/batching.py``), or with ``data.packing`` packed rows of
``data.pack_tokens`` positions (``data/packing.py``): one row per micro-batch, one shape always.

Training reads ``data.train_shards`` (one dataset, or a weighted mix of several) without end;
validation makes one pass over ``data.valid_shards``: each sample once, nothing dropped, and a
DP rank whose share has ended gets steps of no micro-batches (it still joins the sums).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from ..config import Config, ConfigError
from ..data import batching, collate, loader, packing
from ..data.batching import (
    BucketBatcher,
    GlobalBatches,
    WeightedMix,
    llm_sequence_length,
    token_cost,
)
from ..data.chat import chat_template
from ..data.loader import LoadedStream, SampleStream
from ..data.packing import PackBatcher
from ..data.samples import Mapped, make_sample
from ..data.tokenizers import Tokenizer, load_tokenizer
from ..llm.moe import has_aux_loss
from ..parallel import maxima_over_ranks

# what `skipped` counts
SKIP_REASONS = (*loader.SKIP_REASONS, *batching.SKIP_REASONS, *packing.SKIP_REASONS)


@functools.cache
def ctc_tokenizer(path: str) -> Tokenizer:
    """``model.ctc_tokenizer``, read once per process (the config check, then every training and
    validation stream)."""
    return load_tokenizer(path)


def check_ctc_tokenizer(cfg: Config) -> Config:
    """``cfg`` with ``model.ctc_vocab_size`` set from ``model.ctc_tokenizer`` (what null
    means); unchanged without one (the CTC head then uses the LLM's vocabulary)."""
    model = cfg.model
    if model.ctc_tokenizer is None:
        return cfg
    try:
        size = ctc_tokenizer(model.ctc_tokenizer).base_vocab_size
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.ctc_tokenizer: {err}") from None
    if model.ctc_vocab_size not in (None, size):
        raise ConfigError(
            f"model.ctc_vocab_size={model.ctc_vocab_size}, but model.ctc_tokenizer="
            f"{model.ctc_tokenizer} has {size} tokens; set model.ctc_vocab_size=null"
        )
    return replace(cfg, model=replace(model, ctc_vocab_size=size))


def check_tokenizer(cfg: Config, tokenizer: Tokenizer) -> Config:
    """``cfg`` with SALM's ``model.audio_token_id`` set to the tokenizer's placeholder (what null
    means), once the LLM's vocabulary holds every id text makes and its embedding a row for the
    placeholder. BESTOW prompts carry no placeholder."""
    llm, path = cfg.llm, tokenizer.path
    if cfg.data.prompt_format == "chat":  # its template renders an assistant turn, before step 1
        try:
            _ = chat_template(tokenizer, cfg.data.chat_template_kwargs).end_id
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if tokenizer.base_vocab_size > llm.vocab_size:
        raise ConfigError(
            f"tokenizer {path} has {tokenizer.base_vocab_size} tokens but llm.vocab_size="
            f"{llm.vocab_size}: the LLM has no embedding row for ids {llm.vocab_size} and up"
        )
    if cfg.model.arch != "salm":
        return cfg
    placeholder, given = tokenizer.audio_token_id, cfg.model.audio_token_id
    if given is not None and given != placeholder:
        raise ConfigError(
            f"model.audio_token_id={given}, but tokenizer {path} places the audio placeholder at "
            f"{placeholder} ({tokenizer.audio_token_origin}); set model.audio_token_id=null"
        )
    rows = llm.padded_vocab_size
    if placeholder >= rows:
        if cfg.checkpoint.pretrained_llm or cfg.checkpoint.pretrained_model:
            fix = (
                "convert the LLM with `salm convert hf-to-mcore`, which adds the row, and train "
                "with the llm.vocab_size of its llm.yaml"
            )
        else:
            fix = f"set llm.vocab_size={placeholder + 1}"
        raise ConfigError(
            f"the LLM's embedding has no row for the audio placeholder of tokenizer {path}: it "
            f"goes at id {placeholder} ({tokenizer.audio_token_origin}), but llm.vocab_size="
            f"{llm.vocab_size} has {rows} rows; {fix}"
        )
    return replace(cfg, model=replace(cfg.model, audio_token_id=placeholder))


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
    count: int = 0  # micro-batches (0: this DP rank's validation pass has ended)
    micro_batch_size: int = 0  # samples in each (the stages exchange one shape)


class StepBatches:
    """Steps of ``train.num_microbatches`` micro-batches, for training (resumable exactly) or
    validation (one pass; the last step may hold fewer micro-batches, and the stages' one shape
    may end a step early).

    ``state_dict`` covers exactly the training steps handed out (load it before iterating).
    """

    def __init__(self, cfg: Config, tokenizer: Tokenizer, pad_multiple: int, *, train: bool):
        data = cfg.data
        self.cfg, self.pad_id, self.train = cfg, tokenizer.pad_id, train
        ctc = cfg.model.ctc_tokenizer
        self.ctc_tokenizer = ctc_tokenizer(ctc) if ctc and cfg.model.ctc_weight else None
        self.sample_rate = cfg.encoder.features.sample_rate
        self.length = llm_sequence_length(cfg)
        self.pipeline = parallel_state.get_pipeline_model_parallel_world_size()
        self.groups = None
        self.streams: list[SampleStream] = []
        if reads_data():
            datasets = data.train_datasets if train else [(data.valid_shards, 1.0)]
            sources = [self._samples(tokenizer, shards) for shards, _ in datasets]
            source = (
                sources[0]
                if len(sources) == 1
                else WeightedMix(sources, [w for _, w in datasets], seed=cfg.seed)
            )
            if data.packing:
                self.batcher = self._packer(source, pad_multiple)
                # One row of pack_tokens per micro-batch: the step's length is always that.
                length, multiple = (lambda sample: data.pack_tokens), 1
            else:
                self.batcher = BucketBatcher(
                    source, token_cost(cfg),
                    window=data.bucket_window if train else data.micro_batch_size, seed=cfg.seed,
                    **({"max_tokens": data.max_tokens} if data.max_tokens is not None
                       else {"batch_size": data.micro_batch_size}),
                )  # fmt: skip
                length = self.length
                multiple = math.lcm(
                    pad_multiple, data.step_length_multiple(torch.cuda.is_available())
                )
            self.groups = GlobalBatches(
                self.batcher, cfg.train.num_microbatches, length, multiple=multiple,
                drop_last=train, one_size=not train and self.pipeline > 1 and not data.packing,
            )  # fmt: skip
        self._iterator: Iterator | None = None

    def _packer(self, source, pad_multiple: int) -> PackBatcher:
        """Rows of ``data.pack_tokens`` positions, which must cut into whole rows for each rank
        (SP, CP) and FP8 (``pad_multiple``)."""
        data = self.cfg.data
        if data.pack_tokens % pad_multiple:
            raise ConfigError(
                f"data.pack_tokens={data.pack_tokens} is not a multiple of {pad_multiple}, what "
                "this layout's sequences must be (sequence parallelism, context parallelism, FP8); "
                f"use {-(-data.pack_tokens // pad_multiple) * pad_multiple}"
            )
        return PackBatcher(
            source, self.length, pack_tokens=data.pack_tokens, window=data.bucket_window,
            seed=self.cfg.seed,
        )  # fmt: skip

    def _samples(self, tokenizer: Tokenizer, shards: str) -> Mapped:
        """Tokenized samples of one dataset, read by ``data.num_workers`` workers."""
        cfg, data, train = self.cfg, self.cfg.data, self.train
        stream = SampleStream(
            shards,
            sample_rate=self.sample_rate,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            seed=cfg.seed,
            shuffle=train,
            shuffle_buffer=data.shuffle_buffer if train else 0,
            min_duration=data.min_duration,
            max_duration=data.max_duration,
            default_task=data.default_task,
            default_context=data.default_context,
            repeat=train,
        )
        self.streams.append(stream)
        return Mapped(
            LoadedStream(stream, num_workers=data.num_workers),
            lambda raw: make_sample(
                raw,
                tokenizer,
                data.prompt_format,
                cfg.model.arch,
                self.ctc_tokenizer,
                loss_on=data.loss_on,
                chat_template_kwargs=data.chat_template_kwargs,
            ),
        )

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped by the loader and the batcher, by reason (this rank's streams)."""
        if self.groups is None:
            return {}
        total = dict(self.batcher.skipped)
        for stream in self.streams:
            for reason, count in stream.stats.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def _step(self, group: list[list], length: int) -> Step:
        sizes = sorted({len(microbatch) for microbatch in group})
        packed = self.cfg.data.packing
        if len(sizes) > 1 and self.pipeline > 1 and not packed:
            raise ValueError(
                f"a step's micro-batches hold {sizes} samples, but the "
                f"{self.pipeline} pipeline stages exchange one shape: make data.bucket_window "
                "a multiple of data.micro_batch_size and no longer than a data-parallel rank's "
                "share of the data"
            )
        microbatches = [collate(microbatch, self.pad_id) for microbatch in group]
        if packed:  # each sample's positions in its row
            for batch, row in zip(microbatches, group, strict=True):
                batch["packed_lengths"] = torch.tensor([self.length(s) for s in row])
        samples = [s for microbatch in group for s in microbatch]
        return Step(
            microbatches,
            length,
            [s.key for s in samples],
            samples=len(samples),
            llm_tokens=sum(self.length(s) for s in samples),
            audio_seconds=sum(len(w) for s in samples for w in s.audio) / self.sample_rate,
            count=len(group),
            micro_batch_size=1 if packed else sizes[-1],
        )

    def __next__(self) -> Step:
        step = Step(None, 0, [])
        if self.groups is not None:
            if self._iterator is None:
                self._iterator = iter(self.groups)
            # training's stream has no end; validation's pass does (then: no micro-batches)
            group = next(self._iterator) if self.train else next(self._iterator, None)
            if group is not None:
                step = self._step(*group)
        if self.pipeline > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            step.sequence_length, step.count, step.micro_batch_size = maxima_over_ranks(
                [step.sequence_length, step.count, step.micro_batch_size], group
            )
            if self.cfg.data.packing:  # stages that read no samples take the rows' bounds
                bounds = self._row_bounds(step.microbatches, step.count, group)
                step.microbatches = step.microbatches or bounds
            if self.train and self.pipeline > 2 and has_aux_loss(self.cfg.llm):
                step.microbatches = self._answer_tokens(step.microbatches, step.count, group)
        return step

    @staticmethod
    def _answer_tokens(microbatches: list[dict] | None, count: int, group) -> list[dict]:
        """Each micro-batch's answer tokens, from the stages that read it to those that do not:
        their MoE routers weigh the auxiliary loss by them (``llm/moe.py``)."""
        reads = bool(microbatches) and "answer_mask" in microbatches[0]
        counts = [int(b["answer_mask"].sum()) for b in microbatches] if reads else [0] * count
        counts = maxima_over_ranks(counts, group)
        if reads:
            return microbatches
        return [
            {**(batch or {}), "answer_tokens": torch.tensor(n)}
            for batch, n in zip(microbatches or [None] * count, counts, strict=True)
        ]

    @staticmethod
    def _row_bounds(microbatches: list[dict] | None, count: int, group) -> list[dict]:
        """Each packed row's sample lengths, from the stages that read the rows to those that
        do not (which need them for attention): a max-all-reduce of a zero-padded table."""
        rows = [] if microbatches is None else [b["packed_lengths"].tolist() for b in microbatches]
        (widest,) = maxima_over_ranks([max(map(len, rows), default=0)], group)
        table = [row + [0] * (widest - len(row)) for row in rows] or [[0] * widest] * count
        flat = maxima_over_ranks([n for row in table for n in row], group) if widest else []
        return [
            {"packed_lengths": torch.tensor([n for n in flat[i * widest : (i + 1) * widest] if n])}
            for i in range(count)
        ]

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
