"""What SALM and BESTOW share: the audio path on the first pipeline stage around a Megatron LLM.

A batch is text with answer marks plus audio segments:

- ``input_ids [b, s]``: prompt and answer tokens, right-padded. SALM prompts hold one
  audio placeholder token (``Config.placeholder_id``) per audio segment.
- ``answer_mask [b, s]``: 1 on the tokens the model must learn to produce (answer + EOS).
- ``audio [n, samples]`` and ``audio_lengths [n]``: the segments, in the order their samples (and,
  for SALM, their placeholders) appear in the batch; ``n`` may be 0.
- ``audio_owner [n]`` (BESTOW): the sample each segment belongs to.
- ``text_lengths [b]`` (optional): each sample's tokens before the right padding; SALM then
  leaves the padding out of the merged sequence (without it, every position counts as text).
- ``packed_lengths [b]`` (packed micro-batches, from the data path): each sample's positions in
  the row, which stages without the first or last layer need for attention.

The model predicts every next token; the loss keeps the positions whose next token is an answer
token. ``forward`` returns, on the last pipeline stage, the per-position loss ``[r, S]`` (a row per
sample, or one packed row) with all other positions zeroed, so a loss function only sums it and
divides by the answer tokens (:func:`loss_tokens`). Everything the last stage needs (the sequence
layout, ``models/layout.py``) is computed from the integer inputs alone, so later stages never
hold the encoder.

No micro-batch waits for the GPU: a batch moved there keeps its host copy (``models/host.py``);
layouts, segment shares and index tables are computed from that copy and sent to the device
without a sync, and checks of device values run on the device (``masks.require``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from ..audio import encoder_output_lengths, feature_lengths
from ..audio.adapters import audio_embedding_lengths
from ..audio.masks import require
from ..config import Config
from ..llm import build_llm, local_chunks, packed_rows
from ..llm.moe import has_aux_loss, weigh_aux_loss
from .answer_loss import answer_loss, hidden_states_only
from .audio_path import AudioPath, CTCHead, attach_loss, length_groups
from .audio_split import audio_share, gather_segments
from .host import on_host, sent_like
from .layout import Layout, sequence_multiple
from .lora import adapter_parameters, apply_lora

# The parts each model.freeze_* switch freezes (the CTC head is the encoder's auxiliary head).
FROZEN_BY = {
    "llm": "freeze_llm",
    "audio.encoder": "freeze_encoder",
    "audio.adapter": "freeze_adapter",
    "ctc": "freeze_encoder",
}


def _submodule(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode for the block; after it every submodule is back in its own mode
    (``module.train()`` would also put frozen parts into training mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def loss_tokens(batch: dict) -> torch.Tensor:
    """The answer tokens this rank counts toward the loss's denominator: all of the micro-batch's
    on context-parallel rank 0, none on the others (their losses cover other chunks of the same
    samples), so a sum over the DP x CP ranks, as Megatron makes it, counts each token once."""
    tokens = batch["answer_mask"].sum().to(torch.int)
    return tokens if parallel_state.get_context_parallel_rank() == 0 else tokens * 0


def microbatch_answer_tokens(batch: dict | None) -> int:
    """All answer tokens of the micro-batch (every CP chunk's), read on the host: from its
    ``answer_mask``, or on stages that read no samples from ``answer_tokens``, which the data
    path shares with them for MoE's auxiliary loss (``training/data.py``)."""
    host = on_host(batch) if batch is not None else {}
    if "answer_mask" in host:
        return int(host["answer_mask"].sum())
    if "answer_tokens" in host:
        return int(host["answer_tokens"])
    raise ValueError(
        "the MoE routers' auxiliary loss is weighed by the micro-batch's answer tokens "
        "(llm/moe.py): a pipeline stage that reads no samples needs them as answer_tokens"
    )


def embedding_lengths(cfg: Config, audio_lengths: torch.Tensor) -> torch.Tensor:
    """Frames each segment becomes after features, encoder and adapter (no weights needed)."""
    return audio_embedding_lengths(cfg.encoder, cfg.adapter, audio_lengths)


def check_batch(batch: dict) -> None:
    """Name what is missing or inconsistent in a batch instead of failing deep inside (read on
    the host copy)."""
    batch = on_host(batch)
    missing = [key for key in ("input_ids", "answer_mask") if key not in batch]
    if missing:
        raise KeyError(f"the batch has no {', '.join(missing)} (it has {', '.join(sorted(batch))})")
    ids, answer = batch["input_ids"], batch["answer_mask"]
    if ids.dim() != 2 or answer.shape != ids.shape:
        raise ValueError(
            f"input_ids {list(ids.shape)} and answer_mask {list(answer.shape)} must both be [b, s]"
        )
    audio, lengths = batch.get("audio"), batch.get("audio_lengths")
    if (audio is None) != (lengths is None):
        raise ValueError("the batch needs both audio and audio_lengths, or neither")
    text_lengths = batch.get("text_lengths")
    if text_lengths is not None and (
        text_lengths.shape != (ids.shape[0],)
        or bool((text_lengths < 1).any() | (text_lengths > ids.shape[1]).any())
    ):
        raise ValueError(
            f"text_lengths {text_lengths.tolist()} must hold one length in 1..{ids.shape[1]} "
            f"per sample of input_ids {list(ids.shape)}"
        )
    if audio is not None and (audio.dim() != 2 or lengths.shape != (audio.shape[0],)):
        raise ValueError(
            f"audio {list(audio.shape)} must be [n, samples] with audio_lengths [n], "
            f"got audio_lengths {list(lengths.shape)}"
        )


class SpeechLLM(MegatronModule):
    """One pipeline chunk of a speech LLM; subclasses decide how audio enters the sequence."""

    def __init__(
        self,
        cfg: Config,
        *,
        params_dtype: torch.dtype = torch.float32,
        vp_stage: int | None = None,
    ):
        parallel = cfg.parallel
        llm = build_llm(
            cfg.llm,
            parallel,
            params_dtype=params_dtype,
            vp_stage=vp_stage,
            scatter_embedding_sequence_parallel=False,
        )
        apply_lora(llm, cfg.lora, seed=cfg.seed)  # nothing when lora.rank is 0
        super().__init__(config=llm.config)
        self.cfg = cfg
        self.llm = llm
        self.pre_process, self.post_process = llm.pre_process, llm.post_process
        self.vp_stage = vp_stage
        self.pad_multiple = sequence_multiple(parallel, cfg.llm)
        if self.pre_process:
            self.audio = AudioPath(cfg, params_dtype)
            if cfg.model.ctc_weight:
                vocab = cfg.model.ctc_vocab_size or cfg.llm.vocab_size  # fp32, as the encoder
                self.ctc = CTCHead(cfg.encoder.d_model, vocab)
        self.ctc_loss_sum = 0.0  # this step's CTC loss so far (reporting), reset by the trainer
        self.eval_parts = self._freeze()
        self.train(self.training)

    def _freeze(self) -> list[str]:
        """Clear ``requires_grad`` of the frozen parts (LoRA adapters on a frozen LLM still
        train); returns the frozen audio parts in which nothing trains, which stay in eval
        mode."""
        frozen = [prefix for prefix, switch in FROZEN_BY.items() if getattr(self.cfg.model, switch)]
        adapters = {id(p) for p in adapter_parameters(self.llm)}
        for name, param in self.named_parameters():
            if id(param) not in adapters and name.startswith(tuple(p + "." for p in frozen)):
                param.requires_grad_(False)
        eval_parts = []
        # Not the LLM: Megatron's activation recompute (llm.recompute) runs only in training mode,
        # and gradients still flow through a frozen LLM to the audio path.
        for prefix in (p for p in frozen if p != "llm"):
            part = _submodule(self, prefix)  # None where absent (no audio path after stage 0)
            if part is not None and not any(q.requires_grad for q in part.parameters()):
                eval_parts.append(prefix)
        return eval_parts

    def train(self, mode: bool = True):
        """As ``nn.Module.train``, but the frozen parts stay in eval mode: a frozen encoder's
        BatchNorm keeps its pretrained running statistics and its dropout stays off, also when
        the training loop calls ``train()`` after validation."""
        super().train(mode)
        for prefix in self.eval_parts:
            self.get_submodule(prefix).eval()
        return self

    # What Megatron's schedules and finalize_model_grads look up on a model chunk.

    def set_input_tensor(self, input_tensor):
        """Pipeline stages after the first receive hidden states here."""
        self.llm.set_input_tensor(input_tensor)

    @property
    def model_type(self):
        return self.llm.model_type

    @property
    def decoder(self):
        return self.llm.decoder

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        """The tied embedding, all-reduced between the first and last stage."""
        return self.llm.shared_embedding_or_output_weight()

    # -- subclasses --------------------------------------------------------------------------

    def layout(self, batch: dict, sequence_length: int | None, packed: bool = False) -> Layout:
        """The micro-batch's sequence, planned on the host (``models/layout.py``)."""
        raise NotImplementedError

    def embed(self, batch: dict, layout: Layout) -> torch.Tensor:
        """First stage: the LLM's input ``[S, r, h]`` (whole sequence, before CP's cut and SP's
        scatter)."""
        raise NotImplementedError

    # Generation (one stage, no SP): prompts are left-aligned so every sample's next token
    # lands at the same position; their padding is masked out.

    def prompt_embeddings(self, batch: dict):
        """LLM input of the prompts ``[P, b, h]``, left-aligned; ``valid [b, P]`` (False on the
        left padding); and the decoding state :meth:`step_embeddings` continues from."""
        raise NotImplementedError

    def step_embeddings(self, ids: torch.Tensor, valid: torch.Tensor, state) -> torch.Tensor:
        """LLM input ``[1, b, h]`` of the next tokens ``ids [b, 1]``; ``valid [b, T]`` covers
        every position so far, the new one included."""
        return self.text_embeddings(ids, torch.zeros_like(ids))

    # -- shared ------------------------------------------------------------------------------

    def encode_audio(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Audio embeddings ``[n, t, h]``; their lengths ``[n]``, on the host (planned by the
        length formula, which the encoder's own are checked against); and a zero that keeps the
        audio path in the autograd graph when the micro-batch has no audio (every rank then
        produces the same gradient buckets; DDP would wait forever for the missing ones).
        The TP and CP ranks of a sequence split the segments (``models/audio_split.py``)."""
        audio = batch.get("audio")
        if audio is None or not len(audio):
            emb, keep_in_graph = self._silence(self.cfg.encoder.features.sample_rate // 10)
            return emb[:0], torch.zeros(0, dtype=torch.long), keep_in_graph
        planned = embedding_lengths(self.cfg, on_host(batch)["audio_lengths"])
        share = audio_share(self.cfg.parallel.split_audio_over_tp)
        if share.size == 1:
            return self._encode(batch, None, planned), planned, audio.new_zeros(())
        mine = share.segments(len(audio))
        if len(mine):
            emb, keep_in_graph = self._encode(batch, mine, planned), audio.new_zeros(())
        else:  # more sharing ranks than segments: no rows, as wide as the others' (the gather),
            emb, keep_in_graph = self._silence(self.cfg.encoder.features.sample_rate // 10)
            emb = F.pad(emb[:0, :0], (0, 0, 0, int(planned.max())))  # in the graph (its backward)
        return gather_segments(emb, len(audio), share), planned, keep_in_graph

    def _encode(self, batch: dict, rows: torch.Tensor | None, planned: torch.Tensor):
        """Embeddings ``[len(rows), T, h]`` of the segments ``rows`` (host indices; all when
        None), ``T`` the batch's longest planned length (so every rank's are alike), with the
        CTC loss attached. Segments of similar length run together (:func:`length_groups`)."""
        lengths = on_host(batch)["audio_lengths"]
        rows = torch.arange(len(lengths)) if rows is None else rows
        width = int(planned.max())
        pieces, order = [], []
        for group in length_groups(lengths[rows].tolist()):
            pieces.append(self._encode_group(batch, rows[group], planned, width))
            order += group
        emb = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if order == sorted(order):
            return emb
        return emb[sent_like(torch.tensor(order).argsort(), emb)]  # back in the rows' order

    def _encode_group(self, batch: dict, rows: torch.Tensor, planned: torch.Tensor, width: int):
        """Embeddings ``[len(rows), width, h]`` of segments ``rows`` (host indices), padded only
        to their own longest; their lengths must be the ``planned`` ones."""
        host = on_host(batch)
        index = sent_like(rows, batch["audio"])
        longest = int(host["audio_lengths"][rows].max())
        audio, lengths = batch["audio"][index, :longest], batch["audio_lengths"][index]
        encoded, encoded_lengths = self.audio.encode(audio, lengths)
        emb, emb_lengths = self.audio.adapt(encoded, encoded_lengths)
        expected = planned[rows]
        require(
            emb_lengths == sent_like(expected, emb_lengths),
            lambda: (
                f"audio frames planned {expected.tolist()} != encoded {emb_lengths.tolist()} "
                "(the length formula and the encoder disagree)"
            ),
        )
        spoken = host.get("transcript_lengths")
        if hasattr(self, "ctc") and spoken is not None and bool((spoken[rows] > 0).any()):
            transcripts = batch["transcripts"][sent_like(rows, batch["transcripts"])]
            frames = self.encoder_frames(host["audio_lengths"][rows])
            with self.audio.autocast(encoded.device):
                loss = self.ctc(encoded, frames, transcripts, spoken[rows])
            self.ctc_loss_sum = self.ctc_loss_sum + loss.detach()  # read once per step
            if torch.is_grad_enabled():
                emb = attach_loss(emb, self.cfg.model.ctc_weight * loss)
        emb = emb[:, :width]  # an encoder pads its output past the longest segment's frames
        return F.pad(emb, (0, 0, 0, width - emb.shape[1]))

    def encoder_frames(self, audio_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames of each segment (the CTC head's input lengths), by formula."""
        encoder = self.cfg.encoder
        return encoder_output_lengths(encoder, feature_lengths(encoder.features, audio_lengths))

    def _silence(self, samples: int):
        """One silent segment of ``samples`` through the audio path, in eval mode so that
        BatchNorm's running statistics stay as they are: its embeddings ``[1, t, h]`` and a
        zero that keeps the audio path in the graph (see :meth:`encode_audio`)."""
        device = self.llm.embedding.word_embeddings.weight.device
        silence = torch.zeros(1, samples, device=device)
        with evaluating(self.audio):
            emb, _ = self.audio(silence, torch.full((1,), samples, device=device))
        return emb, emb.sum() * 0.0

    def forward(
        self,
        batch: dict | None,
        sequence_length: int | None = None,
        *,
        packed: bool = False,
        with_accuracy: bool = False,
    ) -> torch.Tensor:
        """Last stage: masked per-position loss ``[r, S]`` (with ``with_accuracy``, stacked with
        the masked 0/1 next-token hits: ``[2, r, S]``); other stages: hidden states. Rows are
        the samples, or with ``packed`` one row of ``sequence_length`` positions holding them
        all (``models/layout.py``). With context parallelism ``S`` is this rank's two chunks.

        Chunks holding neither the first nor the last layer need no samples: they take
        ``batch=None`` (packed: a batch holding at least ``packed_lengths``, the samples'
        positions in the row) and the shape from ``sequence_length`` (their input comes through
        ``set_input_tensor``).
        """
        if not (self.pre_process or self.post_process):
            rows = self._packed_rows(batch, sequence_length) if packed else None
            output = self.llm(
                input_ids=None, position_ids=None, attention_mask=None, packed_seq_params=rows
            )
            return self._weigh_aux_loss(output, batch)
        if batch is None:
            raise ValueError("the first and last pipeline stages need the batch")
        check_batch(batch)
        layout = self.layout(batch, sequence_length, packed)
        given = on_host(batch).get("packed_lengths")
        if packed and given is not None and given.tolist() != layout.lengths.tolist():
            raise ValueError(  # the other stages would attend over other bounds
                f"packed_lengths {given.tolist()} are not the samples' positions in the row "
                f"{layout.lengths.tolist()}"
            )
        decoder_input = None
        if self.pre_process:
            decoder_input = local_chunks(self.embed(batch, layout), dim=0)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        with hidden_states_only(self.llm):  # the output layer runs at the answer positions only
            output = self.llm(
                input_ids=None,
                position_ids=None,  # RoPE: positions from the sequence (packed: from its bounds)
                attention_mask=None,
                decoder_input=decoder_input,
                packed_seq_params=layout.packed,
            )
        output = self._weigh_aux_loss(output, batch)
        if not self.post_process:
            return output
        labels, loss_mask, host_mask = (
            local_chunks(x, dim=1) for x in (layout.labels, layout.loss_mask, layout.host_loss_mask)
        )
        return answer_loss(self.llm, output, labels, loss_mask, host_mask, with_accuracy)

    def _weigh_aux_loss(self, output: torch.Tensor, batch: dict | None) -> torch.Tensor:
        """MoE: the routers' auxiliary losses of this micro-batch weighed by its answer tokens
        in the backward pass (``llm/moe.py``); the output as it is otherwise."""
        if not (has_aux_loss(self.config) and self.training and torch.is_grad_enabled()):
            return output
        return weigh_aux_loss(output, microbatch_answer_tokens(batch), self.config)

    def _packed_rows(self, batch: dict | None, sequence_length: int | None):
        """The packed row's sequence bounds on a chunk that reads no samples."""
        host = on_host(batch) if batch is not None else {}
        if "packed_lengths" in host:
            return packed_rows(host["packed_lengths"].tolist(), sequence_length, self._device())
        if "input_ids" in host:
            return self.layout(batch, sequence_length, True).packed
        raise ValueError(
            "a packed micro-batch needs packed_lengths (each sample's positions in the row) on "
            "every pipeline stage"
        )

    def _device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def text_embeddings(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[s, b, h]`` from the LLM's (vocab-parallel) embedding."""
        return self.llm.embedding(input_ids=ids, position_ids=position_ids)


def left_align(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``x [S, b, h]`` holding ``lengths [b]`` positions per sample -> the same
    positions at the end (zeros in front), and ``valid [b, S]``."""
    length = x.shape[0]
    aligned = torch.zeros_like(x)
    valid = torch.zeros(x.shape[1], length, dtype=torch.bool, device=x.device)
    for i, n in enumerate(lengths.tolist()):
        aligned[length - n :, i] = x[:n, i]
        valid[i, length - n :] = True
    return aligned, valid
