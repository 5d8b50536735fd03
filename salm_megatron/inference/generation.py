"""Batched autoregressive decoding for SALM and BESTOW: greedy, sampling and beam search.

Prompts are left-aligned (``SpeechLLM.prompt_embeddings``), so every sample's next token lands at
the same position and one Megatron-Core ``StaticInferenceContext`` holds the LLM's keys and values;
the left padding is masked out of every attention (RoPE only sees relative positions, so the shift
changes nothing). After the prompt, each step feeds one token per row (BESTOW: through its block,
which keeps its own text keys/values and the audio's, computed once). ``use_cache=False`` recomputes
everything from the prompt and the tokens so far at every step: the reference the cache must equal.

All ranks of a tensor-parallel group decode the same batch: the LLM gathers the vocabulary-parallel
logits, and each chosen token is broadcast from the group's first rank. MoE layers decode as the
dense ones (no auxiliary loss outside training, no token dropping: every token reaches its top-k
experts); their expert-parallel ranks must decode together, so they must lie inside one
tensor-parallel group.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ..config import DecodeConfig
from ..data.collate import SpeechSample, collate
from ..data.prompts import generation_prompt
from ..data.tokenizers import Tokenizer
from ..models.host import to_device
from ..models.speech_llm import SpeechLLM


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Megatron attention mask (True = masked) ``[b, 1, P, P]`` for left-padded prompts: causal
    over the valid positions; padding attends to itself only (an empty row would be NaN)."""
    length = valid.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = (valid[:, None, :] & torch.ones_like(eye).tril()) | eye
    return ~allowed[:, None]


def step_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[b, 1, 1, T]``: the new position attends to every valid one."""
    return ~valid[:, None, None, :]


def _check_experts_decode_together() -> None:
    """MoE layers send each token to its experts' ranks (all-to-all) at every step, so every
    rank of an expert-parallel group must decode the same batch, step for step: it must lie
    inside one tensor-parallel group (whose ranks decode together). Ranks of different
    data-parallel ranks decode samples of their own, as many steps as those take."""
    if parallel_state.get_expert_model_parallel_world_size() == 1:
        return
    experts = parallel_state.get_expert_model_parallel_group()
    together = parallel_state.get_tensor_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks
    if not set(ranks(experts)) <= set(ranks(together)):
        raise ValueError(
            f"decoding at parallel.expert_model_parallel_size="
            f"{parallel_state.get_expert_model_parallel_world_size()} would make data-parallel "
            "ranks, which decode samples of their own, wait on each other's MoE layers: decode "
            "at parallel.expert_model_parallel_size=1 (checkpoints reshard), or with the "
            "experts inside the tensor-parallel ranks (expert_tensor_parallel_size=1)"
        )


class _Cached:
    """Rows decoded with the KV cache: prompt once, then one token per step."""

    def __init__(self, generator: Generator, samples: list[SpeechSample], rows: int):
        self.generator, self.model = generator, generator.model
        batch = generator.to_device(collate(samples, generator.pad_id))
        emb, self.valid, self.state = self.model.prompt_embeddings(batch)
        max_length = emb.shape[0] + generator.decoding.max_new_tokens
        self.context = StaticInferenceContext(max(rows, len(samples)), max_length)
        self.logits = generator.llm(emb, prefill_mask(self.valid), self.context)
        self.context.sequence_len_offset += emb.shape[0]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the cache (beam search: which hypotheses continue), in place and
        over the positions filled so far: the buffers are sized for the whole decode."""
        used, rows = self.context.sequence_len_offset, len(index)
        for key, value in self.context.key_value_memory_dict.values():
            key[:used, :rows] = key[:used, index]
            value[:used, :rows] = value[:used, index]
        self.valid, self.logits = self.valid[index], self.logits[index]
        if self.state is not None:
            self.state.reorder(index)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [rows]``; the next logits ``[rows, V]``."""
        self.valid = F.pad(self.valid, (0, 1), value=True)
        emb = self.model.step_embeddings(tokens[:, None], self.valid, self.state)
        self.logits = self.generator.llm(emb, step_mask(self.valid), self.context)
        self.context.sequence_len_offset += 1
        return self.logits


class _Recomputed:
    """The same rows without a cache: each step re-runs the prompts plus the tokens so far."""

    def __init__(self, generator: Generator, samples: list[SpeechSample], rows: int):
        self.generator, self.samples = generator, samples
        self.rows = torch.arange(len(samples))
        self.history = [[] for _ in samples]
        self.logits = self._run()

    def _run(self) -> torch.Tensor:
        sources = [self.samples[r] for r in self.rows.tolist()]
        extended = [
            SpeechSample(s.input_ids + h, [0] * (len(s.input_ids) + len(h)), s.audio, s.key)
            for s, h in zip(sources, self.history, strict=True)
        ]
        batch = self.generator.to_device(collate(extended, self.generator.pad_id))
        emb, valid, _ = self.generator.model.prompt_embeddings(batch)
        return self.generator.llm(emb, prefill_mask(valid), None)

    def reorder(self, index: torch.Tensor) -> None:
        index = index.cpu()
        self.rows = self.rows[index]
        self.history = [list(self.history[i]) for i in index.tolist()]
        self.logits = self.logits[index.to(self.logits.device)]

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        for history, token in zip(self.history, tokens.tolist(), strict=True):
            history.append(token)
        self.logits = self._run()
        return self.logits


@dataclass
class _Hypotheses:
    """Finished beam hypotheses of one utterance, best first."""

    size: int
    penalty: float
    items: list[tuple[float, list[int]]] = field(default_factory=list)

    def add(self, logprob: float, tokens: list[int]) -> None:
        self.items.append((logprob / max(len(tokens), 1) ** self.penalty, tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.size :]

    def full(self) -> bool:
        return len(self.items) >= self.size


class Generator:
    """Decodes prompts (``SpeechSample`` without answers) with a one-stage speech model."""

    def __init__(
        self,
        model: SpeechLLM,
        decoding: DecodeConfig,
        *,
        stop_ids: set[int],
        vocab_size: int,
        banned_ids: tuple[int, ...] = (),
        pad_id: int = 0,
    ):
        if not (model.pre_process and model.post_process):
            raise ValueError("generation needs the whole model on one pipeline stage (PP=1)")
        if model.config.sequence_parallel:
            raise ValueError("generation runs without sequence parallelism")
        _check_experts_decode_together()
        self.model, self.decoding = model.eval(), decoding
        self.stop_ids, self.pad_id = sorted(stop_ids), pad_id
        self.vocab_size, self.banned_ids = vocab_size, list(banned_ids)
        self.device = model.llm.embedding.word_embeddings.weight.device

    @classmethod
    def for_tokenizer(
        cls, model: SpeechLLM, decoding: DecodeConfig, tokenizer: Tokenizer, prompt_format: str
    ) -> Generator:
        """Stops at the prompt format's end token (and EOS); never produces ids outside the
        tokenizer, nor the audio placeholder."""
        _, end = generation_prompt(tokenizer, prompt_format, "", 0)
        return cls(
            model,
            decoding,
            stop_ids={end, tokenizer.eos_id},
            vocab_size=tokenizer.vocab_size,
            banned_ids=(tokenizer.audio_token_id,),
            pad_id=tokenizer.pad_id,
        )

    def text(self, tokenizer: Tokenizer, tokens: list[int]) -> str:
        """The answer's text: ``tokens`` up to (without) the stop token."""
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return tokenizer.decode(tokens).strip()

    def to_device(self, batch: dict) -> dict:
        """The batch on the model's device, with its host copy (the model plans from it)."""
        return to_device(batch, self.device)

    def llm(self, emb: torch.Tensor, mask: torch.Tensor, context) -> torch.Tensor:
        """Last position's logits ``[b, V]`` (float32; ids outside the tokenizer and banned ids
        at -inf)."""
        logits = self.model.llm(
            input_ids=None,
            position_ids=None,
            attention_mask=mask,
            decoder_input=emb,
            inference_context=context,
            runtime_gather_output=True,
        )[:, -1].float()
        logits[:, self.vocab_size :] = -math.inf
        logits[:, self.banned_ids] = -math.inf
        return logits

    @torch.no_grad()
    def generate(self, samples: list[SpeechSample], use_cache: bool = True) -> list[list[int]]:
        """Each sample's new tokens, up to and including its stop token."""
        if not samples:
            return []
        stepper = _Cached if use_cache else _Recomputed
        if self.decoding.strategy == "beam":
            return self._beam(samples, stepper)
        return self._one_path(samples, stepper)

    # ---------------------------------------------------------------------- greedy / sampling

    def _choose(self, logits: torch.Tensor, streams: list[torch.Generator]) -> torch.Tensor:
        d = self.decoding
        if d.strategy == "greedy":
            return logits.argmax(-1)
        logits = logits / d.temperature
        if d.top_k:
            kth = logits.topk(min(d.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if d.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            above = probs.cumsum(-1) - probs  # mass of the likelier tokens; the first stays
            drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= d.top_p)
            logits = logits.masked_fill(drop, -math.inf)
        probs = logits.softmax(-1).cpu()
        drawn = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, streams, strict=True)]
        return torch.cat(drawn).to(logits.device)

    def _streams(self, samples: list[SpeechSample]) -> list[torch.Generator]:
        """One random stream per sample, seeded from ``decode.seed`` and the sample's key (else
        its prompt and audio), so what a sample draws depends on neither its batch nor its
        position in it."""
        if self.decoding.strategy != "sample":
            return []
        streams = []
        for sample in samples:
            digest = hashlib.sha256(f"{self.decoding.seed}|".encode())
            if sample.key is not None:
                digest.update(f"key|{sample.key}".encode())
            else:
                digest.update(f"prompt|{sample.input_ids}".encode())
                for segment in sample.audio:
                    digest.update(segment.detach().float().cpu().contiguous().numpy().tobytes())
            seed = int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)
            streams.append(torch.Generator().manual_seed(seed))
        return streams

    def _one_path(self, samples, stepper) -> list[list[int]]:
        rows = stepper(self, samples, len(samples))
        streams = self._streams(samples)
        stops = torch.tensor(self.stop_ids, device=self.device)
        outputs = [[] for _ in samples]
        done = torch.zeros(len(samples), dtype=torch.bool, device=self.device)
        logits = rows.logits
        for step in range(self.decoding.max_new_tokens):
            tokens = _same_on_tp_group(self._choose(logits, streams))
            for i in (~done).nonzero().flatten().tolist():
                outputs[i].append(int(tokens[i]))
            done |= torch.isin(tokens, stops)
            if bool(done.all()) or step + 1 == self.decoding.max_new_tokens:
                break
            logits = rows.advance(tokens)
        return outputs

    # ----------------------------------------------------------------------------- beam search

    def _beam(self, samples, stepper) -> list[list[int]]:
        d, n, width = self.decoding, len(samples), self.decoding.beam_size
        rows = stepper(self, samples, n * width)
        rows.reorder(torch.arange(n, device=self.device).repeat_interleave(width))
        # Only the first of each utterance's identical rows starts a beam.
        scores = torch.full((n, width), -math.inf, device=self.device)
        scores[:, 0] = 0.0
        tokens_so_far = [[] for _ in range(n * width)]
        finished = [_Hypotheses(width, d.length_penalty) for _ in range(n)]
        logits = rows.logits
        for step in range(d.max_new_tokens):
            logprobs = logits.log_softmax(-1).view(n, width, -1)
            vocab = logprobs.shape[-1]
            total = (scores[:, :, None] + logprobs).view(n, -1)
            top, index = _same_on_tp_group(total.topk(2 * width, dim=-1))
            last = step + 1 == d.max_new_tokens
            keep_rows, keep_tokens, keep_scores = [], [], []
            for i in range(n):
                chosen = []
                for score, flat in zip(top[i].tolist(), index[i].tolist(), strict=True):
                    if score == -math.inf or len(chosen) == width:
                        break
                    row, token = i * width + flat // vocab, flat % vocab
                    path = tokens_so_far[row] + [token]
                    if token in self.stop_ids or last:
                        if not finished[i].full():
                            finished[i].add(score, path)
                    else:
                        chosen.append((row, token, score))
                while len(chosen) < width:  # a finished utterance keeps dead rows in step
                    chosen.append((i * width, self.pad_id, -math.inf))
                for row, token, score in chosen:
                    keep_rows.append(row)
                    keep_tokens.append(token)
                    keep_scores.append(score)
            if last or all(h.full() for h in finished):
                break
            order = torch.tensor(keep_rows, device=self.device)
            tokens_so_far = [
                tokens_so_far[r] + [t] for r, t in zip(keep_rows, keep_tokens, strict=True)
            ]
            scores = torch.tensor(keep_scores, device=self.device).view(n, width)
            rows.reorder(order)
            logits = rows.advance(torch.tensor(keep_tokens, device=self.device))
        return [h.items[0][1] if h.items else [] for h in finished]


def _same_on_tp_group(value):
    """Every TP rank continues with its first rank's choice (a tensor or a tuple of them)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return value
    group = parallel_state.get_tensor_model_parallel_group()
    source = parallel_state.get_tensor_model_parallel_src_rank()
    for tensor in value if isinstance(value, tuple) else (value,):
        torch.distributed.broadcast(tensor, source, group=group)
    return value
