"""``salm bench-train``: training throughput of four ways to batch the same speech samples.

One process (TP=PP=1), one model shape, the same samples in the same order for every
configuration, each doing real training steps (forward, backward, optimizer step; one
micro-batch per step):

- (a) naive: ``--batch`` samples in arrival order, padded to the longest (a Hugging Face
  collator's batches), through our model, DDP and optimizer as ``salm train`` runs them;
- (b) bucketing: ``BucketBatcher`` micro-batches of up to max_tokens padded tokens;
- (c) packing: ``PackBatcher`` rows of pack_tokens LLM positions through the packed path
  (both ``--tokens``; by default each is ``--batch`` mean samples' worth, so that every row
  makes about as many optimizer steps);
- (d) Hugging Face: transformers' Llama (SDPA) of the same shape, fed its own token embeddings
  with our audio path's spliced in, AdamW, naive padding (what an Ultravox-style stack runs).

The configurations take their steps in turn (one step of each, then the next of each), so that
a machine slowing down or speeding up meanwhile (a shared host) weighs on all alike; with
``--sequential`` one after the other, holding one model at a time (less memory).

The FLOP count is that of the useful work (each sample alone, unpadded), the same for every
row, so padding shows as lost MFU. MFU is against this machine's measured GEMM rate (on a GPU
in bf16: the GPU's dense bf16 peak), or ``--peak-tflops``. "useful tok" is the share of the LLM
positions computed that hold a sample (a packed row's unused tail is padding); "useful wav" the
same for the waveform samples the encoder reads (ours in groups of similar length,
``models/audio_path.py``; Hugging Face's padded to the batch's longest). The corpus is
LibriSpeech-like: durations Gamma(4, 3 s) clipped to 1-35 s (mean ~12 s), noise audio, random
token ids, a 10-16-token prompt and 3 answer tokens per second of audio.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .bench import (
    _free,
    _matmul_weights,
    _model,
    _sync,
    _time,
    decoder_weights_per_token,
    one_process,
    peak_tflops,
)
from .config import Config, ConfigError, apply_overrides
from .data import SpeechSample, collate
from .data.batching import BucketBatcher, ListSource, llm_sequence_length, token_cost
from .data.packing import PackBatcher
from .models.audio_path import length_groups

# The benchmark's model: a small Llama-like LLM (32k vocabulary, GQA) and FastConformer.
DEFAULTS = [
    "llm.num_layers=8", "llm.hidden_size=512", "llm.ffn_hidden_size=1536",
    "llm.num_attention_heads=8", "llm.num_query_groups=2", "llm.vocab_size=32000",
    "llm.max_position_embeddings=4096", "encoder.d_model=256", "encoder.num_layers=6",
    "encoder.num_heads=4", "encoder.subsampling_conv_channels=256",
]  # fmt: skip
TARGET_USEFUL, TARGET_SPEEDUP = 0.95, 1.5  # packing's useful-token fraction; (c) over (d)


def durations(count: int, rng: random.Random) -> list[float]:
    """LibriSpeech-like utterance lengths in seconds: Gamma(4, 3 s) in [1, 35], mean ~12 s."""
    return [min(35.0, max(1.0, rng.gammavariate(4.0, 3.0))) for _ in range(count)]


def corpus(cfg: Config, count: int, seed: int) -> list:
    """``count`` LibriSpeech-like samples (see the module docstring), seeded."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    rate, salm = cfg.encoder.features.sample_rate, cfg.model.arch == "salm"
    samples = []
    for i, seconds in enumerate(durations(count, rng)):
        prompt, answer = rng.randint(10, 16), max(1, round(3 * seconds))
        text = rng.choices(range(cfg.placeholder_id), k=prompt + answer)
        at = rng.randint(0, prompt) if salm else prompt  # the placeholder, inside the prompt
        ids = text[:at] + ([cfg.placeholder_id] if salm else []) + text[at:]
        mask = [0] * (len(ids) - answer) + [1] * answer
        audio = 0.1 * torch.randn(int(seconds * rate), generator=g)
        samples.append(SpeechSample(ids, mask, [audio], key=f"bench{i:06d}"))
    return samples


def default_tokens(sizes: list[int], batch: int) -> int:
    """Bucketing's max_tokens (``sizes``: token costs) or packing's row length (LLM lengths):
    ``batch`` mean samples, at least the longest (none skipped), rounded up to 64. A step then
    holds about as many samples as a naive one: as many optimizer steps in every row."""
    tokens = max(max(sizes), math.ceil(batch * sum(sizes) / len(sizes)))
    return -(-tokens // 64) * 64


def _audio_seconds(cfg: Config, samples: list) -> float:
    return sum(len(w) for s in samples for w in s.audio) / cfg.encoder.features.sample_rate


# ---------------------------------------------------------------------------------- batching


@dataclass
class Plan:
    """One configuration: its micro-batches, the LLM positions and waveform samples they make the
    model compute (padding included) and, once trained, its time (or why it did not train)."""

    name: str
    batches: list  # lists of samples
    positions: int = 0
    waves: int = 0
    packed_tokens: int | None = None  # a packed plan's row length
    why: str = ""  # why it did not train ("": it did)
    seconds: float = 0.0
    optimizer_seconds: float = 0.0


def plan(
    cfg: Config, name: str, batches: list, multiple: int, packed: int | None = None,
    grouped: bool = True,
) -> Plan:  # fmt: skip
    """A configuration's micro-batches and what they make the model compute: LLM positions
    (padded rows, or packed ones), and waveform samples (``grouped``: our encoder's groups of
    similar length; else each micro-batch padded to its longest clip)."""
    length = llm_sequence_length(cfg)
    if packed:
        positions = packed * len(batches)
    else:  # each micro-batch padded to its longest sample, rounded up to the model's multiple
        positions = sum(len(b) * -(-max(map(length, b)) // multiple) * multiple for b in batches)
    waves = 0
    for batch in batches:
        clips = [len(w) for s in batch for w in s.audio]
        groups = length_groups(clips) if grouped else [list(range(len(clips)))]
        waves += sum(len(g) * clips[g[0]] if grouped else len(g) * max(clips) for g in groups)
    return Plan(name, batches, positions, waves, packed)


def plans(cfg: Config, samples: list, tokens: list[int], batch: int, multiple: int) -> dict:
    """(a) to (d)'s micro-batches (``tokens``: max_tokens, pack_tokens)."""
    naive = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    max_tokens, pack_tokens = tokens
    window = {"window": cfg.data.bucket_window, "seed": cfg.seed}
    buckets = BucketBatcher(ListSource(samples), token_cost(cfg), max_tokens=max_tokens, **window)
    length = llm_sequence_length(cfg)
    rows = PackBatcher(ListSource(samples), length, pack_tokens=pack_tokens, **window)
    return {
        "a": plan(cfg, f"(a) naive, batch {batch}", naive, multiple),
        "b": plan(cfg, f"(b) bucketing, {max_tokens} tokens", list(buckets), multiple),
        "c": plan(cfg, f"(c) packing, {pack_tokens} tokens", list(rows), multiple, pack_tokens),
        "d": plan(cfg, f"(d) HF Llama sdpa, batch {batch}", naive, 1, grouped=False),
    }


def useful_flops(cfg: Config, model, samples: list) -> float:
    """Matmul FLOPs of training on each sample alone, unpadded, counted as
    ``bench.training_flops`` counts them (3 forwards' worth): per LLM position 2 per decoder and
    output-layer weight; causal attention; per encoder frame 2 per audio-path weight; per text
    token 2 per weight of BESTOW's block."""
    llm, lengths = cfg.llm, [llm_sequence_length(cfg)(s) for s in samples]
    output_layer = llm.padded_vocab_size * llm.hidden_size
    per_position = 2 * (decoder_weights_per_token(model) + output_layer)
    attention = 2 * llm.num_layers * llm.num_attention_heads * llm.head_dim
    frames = int(model.encoder_frames(torch.tensor([len(s.audio[0]) for s in samples])).sum())
    block = 2 * _matmul_weights(getattr(model, "cross_attention", None))
    tokens = sum(len(s.input_ids) for s in samples)
    return 3.0 * (
        per_position * sum(lengths) + attention * sum(n * n for n in lengths)
        + 2 * _matmul_weights(model.audio) * frames + block * tokens
    )  # fmt: skip


def gemm_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """FLOP/s of a large square matmul here (median of 5, torch's threads), and its size."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / _time(lambda: a @ b, warmup=2, repeats=5), size


# ---------------------------------------------------------------------------------- trainers


def _forward_step(data_iterator, model, *, sequence_length: int | None, packed: bool):
    """As training/loop.py's: the masked per-position loss, summed over the answer tokens."""
    from .models.speech_llm import loss_tokens

    batch = next(data_iterator)
    output = model(batch, sequence_length, packed=packed)

    def loss_func(output):
        return output.float().sum(), loss_tokens(batch), {}

    return output, loss_func


class MegatronTrainer:
    """Our model under Megatron's DDP and optimizer, stepped as ``Trainer.train_step`` does."""

    def __init__(self, cfg: Config, device, dtype):
        from .training.optimizer import build_optimizer, wrap_ddp

        self.cfg, self.device, self.model = cfg, device, _model(cfg, device, dtype).train()
        (self.ddp,) = wrap_ddp(cfg, [self.model])
        self.optimizer, self.scheduler = build_optimizer(cfg, [self.ddp], dtype)

    def backward(self, batch: dict, packed_tokens: int | None) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        step = functools.partial(
            _forward_step, sequence_length=packed_tokens, packed=packed_tokens is not None
        )
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=self.ddp,
            num_microbatches=1, seq_length=packed_tokens or batch["input_ids"].shape[1],
            micro_batch_size=batch["input_ids"].shape[0], forward_only=False,
        )  # fmt: skip

    def update(self) -> None:
        from .training.optimizer import optimizer_step

        if optimizer_step(self.optimizer, self.cfg.optim.clip_grad)[0]:  # applied
            self.scheduler.step(increment=1)


class HFTrainer:
    """transformers' Llama (SDPA) of our LLM's shape with our audio path, AdamW, gradient
    clipping; in bf16, fp32 weights under autocast (the Hugging Face Trainer's bf16 mode)."""

    def __init__(self, cfg: Config, device, dtype):
        import transformers

        from .convert.llm_families import hf_config_from_llm
        from .models.audio_path import AudioPath

        fields = hf_config_from_llm(cfg.llm, torch.float32)
        fields["vocab_size"] = cfg.llm.padded_vocab_size  # our output layer's rows
        fields["attention_dropout"] = cfg.llm.attention_dropout
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        torch.manual_seed(cfg.seed)
        self.llm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        self.llm.to(device).train()
        self.audio = AudioPath(cfg, dtype).to(device).train()
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.params = [*self.llm.parameters(), *self.audio.parameters()]
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
            eps=optim.adam_eps, weight_decay=optim.weight_decay,
        )  # fmt: skip

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``inputs_embeds [b, S, h]``, ``attention_mask [b, S]`` and ``labels [b, S]`` (-100
        off the answer tokens), each placeholder replaced by its segment's audio frames."""
        from torch.nn.utils.rnn import pad_sequence

        from .models.host import on_host
        from .models.speech_llm import embedding_lengths

        host = on_host(batch)
        audio, _ = self.audio(batch["audio"], batch["audio_lengths"])
        frames = embedding_lengths(self.cfg, host["audio_lengths"]).tolist()
        text = self.llm.get_input_embeddings()(batch["input_ids"])
        is_audio = (host["input_ids"] == self.cfg.placeholder_id).tolist()
        ids = host["input_ids"].masked_fill(host["answer_mask"] == 0, -100)
        rows, labels, segment = [], [], 0
        for i, n in enumerate(host["text_lengths"].tolist()):
            pieces, marks, start = [], [], 0
            for at in [j for j in range(n) if is_audio[i][j]] + [n]:
                pieces.append(text[i, start:at])
                marks.append(ids[i, start:at])
                if at < n:  # a placeholder: its segment's frames, no labels
                    pieces.append(audio[segment, : frames[segment]].to(text.dtype))
                    marks.append(torch.full((frames[segment],), -100))
                    segment += 1
                start = at + 1
            rows.append(torch.cat(pieces))
            labels.append(torch.cat(marks))
        mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        labels = pad_sequence(labels, batch_first=True, padding_value=-100)
        return pad_sequence(rows, batch_first=True), mask.to(self.device), labels.to(self.device)

    def backward(self, batch: dict, packed_tokens: None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        lower = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=lower):
            embeds, mask, labels = self.inputs(batch)
            loss = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()

    def update(self) -> None:
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad)
        self.optimizer.step()


def training(make_trainer, plan_: Plan, warmup: int, device) -> Iterator[None]:
    """Trains ``plan_``'s micro-batches, a step each, after ``warmup`` untimed steps on the first
    ones, adding each step's seconds (and of them the optimizer's) to the plan; yields after
    every timed step. The trainer is made when it starts and dropped when it ends. Batches are
    collated before the clock starts, as loader workers would have."""
    from .models.host import to_device

    trainer = make_trainer()
    ready = [collate(b) for b in plan_.batches]
    if device.type == "cuda":
        ready = [to_device(b, device) for b in ready]
    for batch in ready[:warmup]:
        trainer.backward(batch, plan_.packed_tokens)
        trainer.update()
    _sync()
    for batch in ready:
        start = time.perf_counter()
        trainer.backward(batch, plan_.packed_tokens)
        _sync()
        update = time.perf_counter()
        trainer.update()
        _sync()
        plan_.seconds += time.perf_counter() - start
        plan_.optimizer_seconds += time.perf_counter() - update
        yield
    print(f"{plan_.name}: {plan_.seconds:.1f} s", file=sys.stderr, flush=True)
    del trainer
    _free(device)


def take_turns(runs: list[Iterator[None]], sequential: bool) -> None:
    """Advance the runs a step each in turn until all end (or each to its end, in order)."""
    if sequential:
        for run in runs:
            for _ in run:
                pass
        return
    while runs:
        runs = [run for run in runs if next(run, StopIteration) is not StopIteration]


# ------------------------------------------------------------------------------------ report


def _blocked(key: str, cfg: Config) -> str:
    """Why configuration ``key`` cannot run here ("" when it can)."""
    if key == "d" and cfg.model.arch != "salm":
        return "the Hugging Face baseline splices audio: SALM only"
    if key == "d" and importlib.util.find_spec("transformers") is None:
        return "needs transformers (pip install transformers)"  # a test dependency
    return ""


def print_table(rows: dict, cfg: Config, samples: list, flops: float, peak: float) -> None:
    useful = sum(map(llm_sequence_length(cfg), samples))
    waves, audio_s = sum(len(s.audio[0]) for s in samples), _audio_seconds(cfg, samples)
    print(
        f"{'configuration':<30}{'steps':>6}{'seconds':>9}{'optim s':>8}{'samples/s':>10}"
        f"{'audio s/s':>10}{'useful tok':>11}{'useful wav':>11}{'TFLOP/s':>9}{'MFU':>7}"
    )
    for p in rows.values():
        fractions = f"{useful / p.positions:11.3f}{waves / p.waves:11.3f}" if p.batches else ""
        head = f"{p.name:<30}{len(p.batches):6d}"
        if p.why:
            print(f"{head}{'':37}{fractions:22}  {p.why}")
            continue
        rate = flops / p.seconds
        print(f"{head}{p.seconds:9.1f}{p.optimizer_seconds:8.1f}"
              f"{len(samples) / p.seconds:10.3f}{audio_s / p.seconds:10.2f}{fractions}"
              f"{rate / 1e12:9.3f}{rate / peak:7.1%}")  # fmt: skip


def print_ratios(rows: dict, cfg: Config, samples: list) -> None:
    """(c)'s samples/s over the others' ((a)/(d): our stack against transformers at the same
    batches), and the issue's targets, with what decides them when one is missed."""
    ran = {key: p for key, p in rows.items() if not p.why}
    pairs = [(x, y) for x, y in ("ca", "cb", "cd", "ad") if x in ran and y in ran]
    ratios = [f"({x})/({y}) {ran[y].seconds / ran[x].seconds:.2f}" for x, y in pairs]
    print("samples/s ratios: " + ("   ".join(ratios) or "none"))
    packed, hf = rows["c"], rows["d"]
    p, length = packed, llm_sequence_length(cfg)
    fraction = sum(map(length, samples)) / p.positions
    fill = [sum(map(length, row)) / p.packed_tokens for row in p.batches]
    print(
        f"target: packing's useful-token fraction {fraction:.3f} >= {TARGET_USEFUL}: "
        f"{'met' if fraction >= TARGET_USEFUL else 'MISSED'} ({len(p.batches)} rows of "
        f"{p.packed_tokens} positions, {len(samples) / len(p.batches):.2f} samples a row, "
        f"filled {min(fill):.0%} to {max(fill):.0%}; few rows: the emptiest weighs more)"
    )
    if hf.why:
        return
    speedup = hf.seconds / packed.seconds
    print(f"target: packed / Hugging Face samples/s {speedup:.2f} >= {TARGET_SPEEDUP}: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'} ((d) computes "
          f"{hf.positions / p.positions:.2f}x (c)'s LLM positions and "
          f"{hf.waves / p.waves:.2f}x its waveform samples; optimizer "
          f"{hf.optimizer_seconds:.1f} s vs {packed.optimizer_seconds:.1f} s)")  # fmt: skip


def _peak(device, dtype, args) -> float:
    """FLOP/s that MFU is against, printed with the measured GEMM rate."""
    rate, size = gemm_rate(device, dtype)
    peak, against = rate, "it"
    known = peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    if args.peak_tflops is not None:
        peak, against = args.peak_tflops * 1e12, "--peak-tflops"
    elif known and dtype == torch.bfloat16:
        peak, against = known * 1e12, f"the dense bf16 peak of {torch.cuda.get_device_name()}"
    print(f"GEMM rate: {rate / 1e12:.3f} TFLOP/s ({args.dtype} {size}^3 matmuls, median of 5); "
          f"MFU against {against}: {peak / 1e12:.3f} TFLOP/s", flush=True)  # fmt: skip
    return peak


def _start(cfg: Config, args) -> tuple[torch.device, torch.dtype]:
    """:func:`bench.one_process`, printed with the model's sizes."""
    device, dtype = one_process(cfg, args.dtype)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    llm, encoder = cfg.llm, cfg.encoder
    print(
        f"device {where}, {torch.get_num_threads()} threads, {args.dtype}; {cfg.model.arch}; "
        f"encoder d_model {encoder.d_model} x {encoder.num_layers} layers, adapter "
        f"{cfg.adapter.type}; LLM hidden {llm.hidden_size} x {llm.num_layers} layers, heads "
        f"{llm.num_attention_heads} (kv {llm.num_query_groups}), vocab {llm.vocab_size}"
    )
    return device, dtype


def run(cfg: Config, args) -> None:
    from . import parallel

    samples = corpus(cfg, args.samples, args.seed)
    costs, lengths = [list(map(f(cfg), samples)) for f in (token_cost, llm_sequence_length)]
    if args.tokens is not None and args.tokens < max(costs):  # samples would be skipped
        raise ConfigError(f"--tokens={args.tokens} is below the longest sample's {max(costs)}")
    tokens = [args.tokens or default_tokens(n, args.batch) for n in (costs, lengths)]
    device, dtype = _start(cfg, args)
    try:
        peak = _peak(device, dtype, args)
        seconds = _audio_seconds(cfg, samples)
        print(
            f"{len(samples)} samples, {seconds:.0f} s of audio (mean "
            f"{seconds / len(samples):.1f} s); LLM positions per sample {min(lengths)}-"
            f"{max(lengths)} (mean {sum(lengths) / len(samples):.0f})"
        )
        reference = [MegatronTrainer(cfg, device, dtype)]  # (a)'s, and the FLOP count's
        flops = useful_flops(cfg, reference[0].model, samples)
        rows = plans(cfg, samples, tokens, args.batch, reference[0].model.pad_multiple)
        makers = {
            "a": reference.pop,
            "b": lambda: MegatronTrainer(cfg, device, dtype),
            "c": lambda: MegatronTrainer(cfg, device, dtype),
            "d": lambda: HFTrainer(cfg, device, dtype),
        }
        runs = []
        for key, p in rows.items():
            p.why = _blocked(key, cfg)
            if not p.why:
                runs.append(training(makers[key], p, args.warmup, device))
        take_turns(runs, args.sequential)
        reference.clear()
        print_table(rows, cfg, samples, flops, peak)
        print_ratios(rows, cfg, samples)
    finally:
        parallel.teardown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salm bench-train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  salm bench-train --samples 32 --batch 4\n"
        "  salm bench-train llm.preset=llama3.2-1b encoder.preset=fastconformer-large "
        "--dtype bf16 --samples 512 --batch 8",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="config key.sub=value overrides")
    parser.add_argument("--samples", type=int, default=32, help="samples trained (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="naive batch size (default 4)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="bucketing's max_tokens and packing's row length (default: --batch "
                        "mean samples, at least the longest, rounded up to 64)")  # fmt: skip
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--arch", choices=("salm", "bestow"), default="salm")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the corpus, the batch order and the models (default 0)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2)")
    parser.add_argument("--sequential", action="store_true",
                        help="train the configurations one after the other, one model in memory "
                        "at a time (default: their steps in turn)")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU (default: the measured GEMM rate; on a GPU "
                        "in bf16 its dense bf16 peak)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("samples", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be at least 1")
    if args.warmup < 0 or (args.tokens is not None and args.tokens < 1):
        parser.error("--warmup must be at least 0 and --tokens at least 1")
    try:
        fixed = [*DEFAULTS, f"model.arch={args.arch}", f"seed={args.seed}"]
        cfg = apply_overrides(Config(), [*fixed, *args.overrides])
        run(cfg, args)
    except ConfigError as err:
        print(f"salm bench-train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
