"""The training loop: Megatron-Core schedules, DDP and optimizer around SALM or BESTOW.

Every process of the job runs :func:`train`. A step reads ``num_microbatches`` micro-batches
(first and last pipeline stages), runs ``forward_backward_func`` (1F1B, or interleaved with
virtual stages), ``finalize_model_grads`` (via the model config), then the optimizer step unless
the global gradient norm is NaN/inf. Rank 0 reports; checkpoints resume exactly. SIGUSR1 or SIGTERM
(a scheduler's warning before a time limit or preemption) ends training at the next step boundary
with a checkpoint and :class:`Preempted`; the same command then resumes from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import parallel
from ..config import Config, ConfigError, absolute_paths
from ..data import load_tokenizer
from ..data.loader import expand_shards
from ..inference.evaluation import decode_samples, evaluation_stream, failure_message, gather
from ..inference.generation import Generator
from ..inference.metrics import metrics_json, task_metrics
from ..llm.moe import aux_loss_report
from ..models import build_speech_llm
from ..models.audio_split import audio_share
from ..models.host import to_device
from ..models.local_copy import decoding_model
from ..models.speech_llm import loss_tokens
from . import checkpoint
from .compatible import check_same_data, check_same_model, data_settings
from .data import SKIP_REASONS, StepBatches, check_ctc_tokenizer, check_tokenizer
from .optimizer import (
    average_batchnorm_statistics,
    build_optimizer,
    current_lr,
    optimizer_step,
    whole_parameters,
    wrap_ddp,
)
from .report import Reporter, peak_memory_gb

log = logging.getLogger("salm.train")


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why and what was saved)."""


class Preempted(RuntimeError):
    """A stop signal ended training after a checkpoint; running it again resumes there."""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """Notes SIGUSR1/SIGTERM instead of dying, so training can stop at a step boundary with a
    checkpoint. A launcher may signal only some ranks: :meth:`agreed` all-reduces the flag."""

    def __init__(self):
        self.received = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._note)

    def _note(self, number, frame) -> None:
        self.received = number

    def agreed(self) -> int:
        """The signal some rank received (0: none), the same number on every rank."""
        return parallel.max_over_ranks(self.received)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def check_training_config(cfg: Config) -> None:
    """What ``salm config`` cannot know is needed: the fields only training reads, and the files
    they name (checked before any process group or model is made)."""
    for name in ("train_shards", "tokenizer"):
        if getattr(cfg.data, name) is None:
            raise ConfigError(f"data.{name} is required for training")
    if cfg.train.eval_interval is not None and cfg.data.valid_shards is None:
        raise ConfigError(f"train.eval_interval={cfg.train.eval_interval} needs data.valid_shards")
    if isinstance(cfg.data.train_shards, str):
        patterns = {"data.train_shards": cfg.data.train_shards}
    else:  # a weighted mix: each entry named
        patterns = {
            f"data.train_shards[{i}].shards": shards
            for i, (shards, _) in enumerate(cfg.data.train_datasets)
        }
    patterns["data.valid_shards"] = cfg.data.valid_shards
    for name, pattern in patterns.items():
        if pattern is not None:
            try:
                expand_shards(pattern)
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"{name}: {err}") from None
    for name, path in (("data.tokenizer", cfg.data.tokenizer),
                       ("model.ctc_tokenizer", cfg.model.ctc_tokenizer)):  # fmt: skip
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{name}={path} does not exist")
    resuming = check_earlier_run(cfg)
    for name in () if resuming else ("pretrained_llm", "pretrained_encoder", "pretrained_model"):
        path = getattr(cfg.checkpoint, name)
        if path is not None:
            checkpoint.check_dist_checkpoint(path, f"checkpoint.{name}")
    layout = cfg.parallel
    if cfg.train.eval_wer_samples and (
        layout.pipeline_model_parallel_size > 1
        or layout.sequence_parallel
        or layout.context_parallel_size > 1
    ):
        raise ConfigError(
            f"train.eval_wer_samples={cfg.train.eval_wer_samples} decodes on one pipeline stage "
            "without sequence or context parallelism, but parallel.pipeline_model_parallel_size="
            f"{layout.pipeline_model_parallel_size}, parallel.sequence_parallel="
            f"{layout.sequence_parallel}, parallel.context_parallel_size="
            f"{layout.context_parallel_size}; set it to 0 and score checkpoints with `salm eval`"
        )
    tp = layout.tensor_model_parallel_size
    if cfg.llm.is_moe and tp > 1 and not layout.sequence_parallel:
        raise ConfigError(
            f"llm.num_moe_experts={cfg.llm.num_moe_experts} at "
            f"parallel.tensor_model_parallel_size={tp} trains with parallel.sequence_parallel="
            "true only (Megatron-Core's MoE layers route each TP rank's share of the sequence); "
            "set it"
        )
    if cfg.train.eval_wer_samples and layout.expert_model_parallel_size > 1:
        raise ConfigError(
            f"train.eval_wer_samples={cfg.train.eval_wer_samples} decodes each data-parallel "
            "rank's samples on their own, but parallel.expert_model_parallel_size="
            f"{layout.expert_model_parallel_size} sends tokens between those ranks at every "
            "step; set it to 0 and score checkpoints with `salm eval` at "
            "parallel.expert_model_parallel_size=1 (checkpoints reshard)"
        )


def check_earlier_run(cfg: Config) -> bool:
    """Whether the run resumes from checkpoints in its ``train.output_dir``. A run that would
    not, over checkpoints there, is refused unless ``checkpoint.start_over`` sets them aside:
    its own checkpoints would be pruned among them and resume would mix the two runs."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    found = checkpoint.complete_checkpoints(root)
    if not found or cfg.checkpoint.start_over:
        return False
    if not cfg.checkpoint.resume:
        names = ", ".join(p.name for p in found[-3:])
        raise ConfigError(
            f"checkpoint.resume=false, but {root} holds checkpoints of an earlier run ({names}): "
            "set checkpoint.start_over=true to move that run's outputs aside (into "
            f"{Path(cfg.train.output_dir) / checkpoint.EARLIER_RUN.format('N')}) and start over, "
            "resume it (checkpoint.resume=true), or train in another train.output_dir"
        )
    return True


def params_dtype(cfg: Config) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _to_device(batch: dict | None) -> dict | None:
    """The micro-batch on this rank's GPU, with its host copy (the model plans from it)."""
    if batch is None or not torch.cuda.is_available():
        return batch
    return to_device(batch, torch.device("cuda", torch.cuda.current_device()))


def _forward_step(data_iterator, model, *, sequence_length: int, packed: bool, with_accuracy: bool):
    batch = _to_device(next(data_iterator))
    output = model(batch, sequence_length, packed=packed, with_accuracy=with_accuracy)

    def loss_func(output):
        loss = output[0] if with_accuracy else output
        loss_sum = loss.float().sum()
        tokens = loss_tokens(batch)
        stats = {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}
        if with_accuracy:
            stats["hits"] = output[1].float().sum().detach()
        return loss_sum, tokens, stats

    return output, loss_func


class Trainer:
    """Model, optimizer, data and counters of one run, on one rank."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.rank0 = torch.distributed.get_rank() == 0
        try:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        except ValueError as err:  # not a tokenizer: the message names the file
            raise ConfigError(f"data.tokenizer: {err}") from None
        self.cfg = cfg = check_tokenizer(cfg, self.tokenizer)  # null audio_token_id filled in
        self.cfg = cfg = check_ctc_tokenizer(cfg)  # and a null ctc_vocab_size
        self.dtype = params_dtype(cfg)

        self.chunks = build_speech_llm(cfg, params_dtype=self.dtype)
        if torch.cuda.is_available():
            for chunk in self.chunks:
                chunk.cuda()
        self.pad_multiple = self.chunks[0].pad_multiple
        if cfg.checkpoint.start_over:
            checkpoint.set_aside_earlier_run(self.output_dir)
        resuming = check_earlier_run(cfg)
        resume_from = checkpoint.latest_checkpoint(self.checkpoints) if resuming else None
        if resume_from is None:
            checkpoint.load_pretrained_parts(cfg, self.chunks)
        else:  # the frozen parts it left out (a LoRA run's LLM) come from pretrained ones
            check_same_model(resume_from, self.chunks, cfg)
            left_out = checkpoint.left_out(resume_from)
            checkpoint.load_pretrained_parts(cfg, self.chunks, left_out, needed_by=resume_from)
        self.model = wrap_ddp(cfg, self.chunks)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.dtype)
        self.data = StepBatches(cfg, self.tokenizer, self.pad_multiple, train=True)
        self.step, self.samples, self.skipped_steps = 0, 0, 0
        self.async_queue = AsyncCallsQueue() if cfg.checkpoint.async_save else None
        if resume_from is not None:
            self._resume(resume_from)

    # ------------------------------------------------------------------------- checkpoints

    @functools.cached_property
    def data_settings(self) -> dict | None:
        """What decides the samples this rank's training steps read (recorded, then checked on
        resume)."""
        return data_settings(self.cfg, self.tokenizer, self.data.streams)

    def _resume(self, path: Path) -> None:
        """Continue from checkpoint ``path``: its data stream first (refused before anything
        loads when this run would read the data otherwise), then model, optimizer, counters."""
        own = checkpoint.own_rank_state(path)
        if own is None:  # alike on every rank, so rank 0 alone says it
            saved = (checkpoint.saved_layout(path) or {}).get("dp", "unknown")
            raise ConfigError(
                f"{path} was saved with data-parallel size {saved}, this run has "
                f"{parallel_state.get_data_parallel_world_size()}: the data stream cannot "
                "continue where it stopped (keep the data-parallel size, or start a new run "
                "from it with checkpoint.pretrained_*)"
            )
        check_same_data(path, own.get("data_settings"), self.data_settings)
        common = checkpoint.load(path, self.chunks, self.optimizer)
        self.scheduler.load_state_dict(common["scheduler"])
        self.step = common["step"]
        self.samples, self.skipped_steps = common["samples"], common["skipped_steps"]
        self.data.load_state_dict(own.get("data"))
        if "rng" in own:
            checkpoint.set_rng_state(own["rng"])
        else:
            log.warning("layout changed since %s: RNG reseeded from the seed and step", path)
            parallel.set_seed(self.cfg.seed + self.step)
        if self.rank0:
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        common = {
            "step": self.step,
            "samples": self.samples,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
        }
        if self.async_queue is not None:  # one checkpoint in flight at a time
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        with whole_parameters(self.model):  # overlap_param_gather: all-gathered first
            path = checkpoint.save(
                self.checkpoints, self.step, self.chunks, self.optimizer, common,
                {"data": self.data.state_dict(), "data_settings": self.data_settings},
                self.cfg.checkpoint.keep, self.async_queue,
                leave_out=checkpoint.parts_left_out(self.cfg),
                optimizer_format=self.cfg.checkpoint.optimizer_format,
            )  # fmt: skip
        if self.rank0 and self.async_queue is not None:
            log.info("writing checkpoint %s in the background", path)
        return path

    def finish_checkpoints(self, blocking: bool = False) -> None:
        """Complete the background checkpoints that are written (all of them when blocking)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def abandon_checkpoints(self) -> None:
        """On an error: stop background writers without completing them (their folders stay
        temporary, so resume never picks them)."""
        if self.async_queue is not None:
            self.async_queue.close(abort=True)

    # ------------------------------------------------------------------------------ steps

    def _run_schedule(self, batches, forward_only: bool) -> tuple[list[dict], object]:
        """The next step of ``batches`` through the schedule; a step of no micro-batches (a DP
        rank whose validation pass has ended) runs nothing and has no losses."""
        step = next(batches)
        self.chunks[0].ctc_loss_sum = 0.0
        n = step.count
        if n == 0:
            return [], step
        iterators = [
            iter(step.microbatches if step.microbatches is not None else [None] * n)
            for _ in self.model
        ]
        losses = get_forward_backward_func()(
            forward_step_func=functools.partial(
                _forward_step,
                sequence_length=step.sequence_length,
                packed=self.cfg.data.packing,
                with_accuracy=forward_only,
            ),  # fmt: skip
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=n,
            seq_length=step.sequence_length,
            micro_batch_size=step.micro_batch_size,
            forward_only=forward_only,
        )
        return losses, step

    # What _totals sums over the job, in order: from the losses, then from the data.
    TOTALS = ("loss_sum", "tokens", "hits", "samples", "llm_tokens", "positions",
              "audio_seconds", "ctc_loss")  # fmt: skip

    def _totals(self, losses: list[dict], step, skipped: dict[str, int] | None = None) -> dict:
        """Sums over the whole job of :attr:`TOTALS` (answer tokens, LLM positions holding a
        sample, LLM positions computed, ...) and of the samples skipped, by reason (a dict under
        "skipped"): each rank adds only what it owns (one TP rank of the last stage the losses of
        its CP chunks, with the answer tokens on CP rank 0; one TP and CP rank of the first stage
        the data counts; each rank encoding its own segments their CTC loss)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        names = self.TOTALS
        values = torch.zeros(len(names) + len(SKIP_REASONS), dtype=torch.float64, device=device)
        first_tp = parallel_state.get_tensor_model_parallel_rank() == 0
        first_cp = parallel_state.get_context_parallel_rank() == 0
        if first_tp and parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
            # Summed on the device: the values are read once, after the all-reduce.
            for i, key in enumerate(names[:3]):
                if key in losses[0]:
                    values[i] = torch.stack([item[key] for item in losses]).double().sum()
        first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        if first_tp and first_cp and first_stage:
            skipped = skipped or {}
            positions = step.count * step.micro_batch_size * step.sequence_length
            counted = [step.samples, step.llm_tokens, positions, step.audio_seconds, 0.0,
                       *(skipped.get(reason, 0) for reason in SKIP_REASONS)]  # fmt: skip
            values[3:] = torch.tensor(counted, dtype=torch.float64).to(device, non_blocking=True)
        if first_stage and audio_share(self.cfg.parallel.split_audio_over_tp).counts_own_segments:
            values[names.index("ctc_loss")] = self.chunks[0].ctc_loss_sum  # device value, or 0.0
        torch.distributed.all_reduce(values)
        values = values.tolist()
        totals = dict(zip(names, values[: len(names)], strict=True))
        counts = zip(SKIP_REASONS, values[len(names) :], strict=True)
        totals["skipped"] = {reason: int(n) for reason, n in counts if n}
        return totals

    def train_step(self) -> dict:
        start = time.time()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses, step = self._run_schedule(self.data, forward_only=False)
        # MoE: the routers' load-balancing loss, per layer and micro-batch (collective)
        balance = aux_loss_report(self.chunks[0].config, step.count)
        applied, grad_norm = optimizer_step(self.optimizer, self.cfg.optim.clip_grad)
        average_batchnorm_statistics(self.cfg, self.chunks)
        if applied:
            self.scheduler.step(increment=1)
        self.step += 1
        totals = self._totals(losses, step, self.data.skipped)
        tokens, samples, skipped = totals["tokens"], totals["samples"], totals["skipped"]
        self.samples += int(samples)
        if not applied:
            self.skipped_steps += 1
        elapsed = time.time() - start
        self._log_keys(step.keys)
        return {
            "step": self.step,
            "loss": totals["loss_sum"] / max(tokens, 1.0),
            "applied": applied,
            "lr": current_lr(self.optimizer),
            "grad_norm": grad_norm,
            "tokens_per_s": totals["llm_tokens"] / elapsed,
            # LLM positions holding a sample among those computed (the rest is padding)
            "useful_token_fraction": totals["llm_tokens"] / max(totals["positions"], 1.0),
            "audio_s_per_s": totals["audio_seconds"] / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time": elapsed,
            "peak_memory_gb": peak_memory_gb(),
            "samples": self.samples,
            "skipped_samples": sum(skipped.values()),
            "skipped": skipped,  # samples the loader skipped, by reason (data/loader.py)
            "skipped_steps": self.skipped_steps,
            **({"load_balancing_loss": balance} if balance is not None else {}),
            **(
                {"ctc_loss": totals["ctc_loss"] / max(samples, 1.0)}
                if self.cfg.model.ctc_weight
                else {}
            ),  # fmt: skip
        }

    def _log_keys(self, keys: list[str]) -> None:
        """With ``train.log_sample_keys``: the keys each DP rank consumed, per step."""
        if not (
            self.cfg.train.log_sample_keys
            and keys
            and parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            return
        folder = self.output_dir / "sample_keys"
        folder.mkdir(parents=True, exist_ok=True)
        dp = parallel_state.get_data_parallel_rank()
        with open(folder / f"dp{dp}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "keys": keys}) + "\n")

    def evaluate(self) -> dict:
        """Validation (:meth:`_evaluate`) of whole parameters (``optim.overlap_param_gather``
        leaves each rank its own shard of them until the next training forward pass)."""
        with whole_parameters(self.model):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Loss and next-token accuracy on answer tokens over one pass of the validation shards
        (each sample once, the same every time), at most ``train.eval_iters`` global batches.
        Every rank joins each step's sums, also one whose share has ended (or had no sample),
        so the result is the one a single rank gets on the same samples."""
        cfg = self.cfg
        for chunk in self.model:
            chunk.eval()
        batches = StepBatches(cfg, self.tokenizer, self.pad_multiple, train=False)
        loss = tokens = hits = samples = 0.0
        try:
            for _ in range(cfg.train.eval_iters):
                losses, step = self._run_schedule(batches, forward_only=True)
                totals = self._totals(losses, step)
                if not totals["samples"]:  # every rank's pass has ended
                    break
                loss, tokens = loss + totals["loss_sum"], tokens + totals["tokens"]
                hits, samples = hits + totals["hits"], samples + totals["samples"]
            if not samples and self.rank0:
                log.warning("validation at step %d: no sample (data.valid_shards)", self.step)
            decoded = self._decoded() if cfg.train.eval_wer_samples else {}
        finally:
            for chunk in self.model:
                chunk.train()
        tokens = max(tokens, 1.0)
        return {
            "step": self.step, "loss": loss / tokens, "accuracy": hits / tokens,
            "samples": int(samples), **decoded,
        }  # fmt: skip

    def _decoded(self) -> dict:
        """WER (ASR-like tasks) and answer accuracy of the first ``train.eval_wer_samples``
        validation samples, decoded (split over DP ranks) and scored as ``salm eval`` does: the
        same samples (duration limits, empty answers kept); failed batches counted and named."""
        cfg = self.cfg
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        stream = evaluation_stream(cfg, cfg.data.valid_shards, dp_rank, dp_size, seed=cfg.seed)
        fmt = cfg.data.prompt_format
        model = decoding_model(cfg, self.chunks[0])  # with TE: a local-spec copy, freed after
        generator = Generator.for_tokenizer(model, cfg.decode, self.tokenizer, fmt)
        per_rank = -(-cfg.train.eval_wer_samples // dp_size)
        decoded = decode_samples(stream, generator, self.tokenizer, cfg, limit=per_rank)
        del generator, model
        decoded, _ = gather(decoded, stream.stats)
        overall = metrics_json(task_metrics(decoded.rows))["overall"]
        scores = {"answer_accuracy": overall["accuracy"]}
        for key in ("wer", "wer_undefined"):  # an infinite WER is named, not written
            if overall.get(key) is not None:
                scores[key] = overall[key]
        if decoded.failures:
            scores["decode_failed"] = decoded.failed_samples
            if torch.distributed.get_rank() == 0:
                log.warning("validation decoding: %s", failure_message(decoded))
        return scores


def train(cfg: Config) -> dict:
    """Train as ``cfg`` says, in every process of the job; returns the last step's record.
    Relative paths are made absolute first, so the config the run saves holds for any folder."""
    cfg = absolute_paths(cfg)
    check_training_config(cfg)
    stop = StopSignals()  # before the slow start, so that an early signal is kept too
    try:
        parallel.initialize(cfg.parallel, seed=cfg.seed)
        dp_size = parallel_state.get_data_parallel_world_size()
        microbatches = cfg.train.microbatches(cfg.data, dp_size)
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, num_microbatches=microbatches)
        )
        return _train(cfg, stop)
    finally:
        parallel.teardown()
        stop.restore()


def _train(cfg: Config, stop: StopSignals) -> dict:
    rank0 = torch.distributed.get_rank() == 0
    output_dir = Path(cfg.train.output_dir)
    resolved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if rank0:
        log.info("resolved config:\n%s", resolved)
    trainer = Trainer(cfg)
    if rank0:  # only once the checkpoint to resume (if any) has been found to fit
        output_dir.mkdir(parents=True, exist_ok=True)
        filled = yaml.safe_dump(trainer.cfg.to_dict(), sort_keys=False)  # audio_token_id set
        (output_dir / "config.yaml").write_text(filled)
    train_cfg, ckpt_cfg = cfg.train, cfg.checkpoint
    reporter = (
        Reporter(output_dir, train_cfg.steps, train_cfg.log_interval, trainer.step + 1)
        if rank0
        else None
    )
    record: dict = {"step": trainer.step}
    bad_in_a_row = 0
    try:
        while trainer.step < train_cfg.steps:
            record = trainer.train_step()
            checkpoint.fault_point("step", trainer.step)
            trainer.finish_checkpoints()
            if reporter:
                reporter.step(record)
            bad_in_a_row = 0 if record["applied"] else bad_in_a_row + 1
            if bad_in_a_row >= train_cfg.max_bad_steps:
                path = trainer.save()
                trainer.finish_checkpoints(blocking=True)
                raise TrainingError(
                    f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient norm "
                    f"(last: step {trainer.step}, grad norm {record['grad_norm']}); stopped. "
                    f"The weights before them are saved in {path}; lower optim.lr or check "
                    "the data"
                )
            if train_cfg.eval_interval and trainer.step % train_cfg.eval_interval == 0:
                result = trainer.evaluate()
                if reporter:
                    reporter.validation(result)
            last = trainer.step == train_cfg.steps
            saved = last or (ckpt_cfg.interval and trainer.step % ckpt_cfg.interval == 0)
            if saved:
                path = trainer.save()
            signaled = stop.agreed()
            if signaled and not last:
                if not saved:
                    path = trainer.save()
                trainer.finish_checkpoints(blocking=True)
                name = signal.Signals(signaled).name
                if rank0:
                    log.warning("%s: stopped at step %d, checkpoint %s", name, trainer.step, path)
                raise Preempted(
                    f"{name} at step {trainer.step}: saved {path}; run the same command again "
                    "to resume from it"
                )
        trainer.finish_checkpoints(blocking=True)
    except (TrainingError, Preempted):
        raise
    except BaseException:
        trainer.abandon_checkpoints()
        raise
    finally:
        if reporter:
            reporter.close()
    return record
