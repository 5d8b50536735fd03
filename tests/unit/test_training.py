"""Proves the training pieces on one process: which checkpoint folder a resume picks, that pruning
goes by write order and never deletes the checkpoint just written, that a fresh run over an
earlier one is refused unless told to start over (which moves it aside, deleting nothing), that
a resume reading the data otherwise names both values, that a run's paths are saved absolute,
that frozen parameters get no gradient buffer and no optimizer state, weight decay and per-part
learning rates in the param groups, the clipped optimizer step that skips NaN/inf gradients
without a trace, recompute equal to no recompute (MoE layers and their load-balancing loss
too), the ``salm train`` command line (files it names checked first; the config fields a
refused resume names), pretrained LLM and encoder weights loaded exactly, MoE layouts that
cannot train refused before anything starts, and dp_reshardable optimizer state refused at
another expert-parallel size."""

import dataclasses
import math
import re

import pytest
import torch
import yaml

from salm_megatron import train
from salm_megatron.config import Config, ConfigError, absolute_paths, apply_overrides, load_config
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.training import checkpoint, optimizer_state
from salm_megatron.training.compatible import MODEL_SECTIONS, check_same_data, config_differences
from salm_megatron.training.optimizer import (
    build_optimizer,
    current_lr,
    optimizer_step,
    wrap_ddp,
)
from tests.speech_fixtures import speech_samples, tiny_config


def _config(arch: str, *overrides: str) -> Config:
    return apply_overrides(tiny_config(arch), list(overrides))


def _setup(cfg: Config, seed: int = 0):
    """A tiny speech LLM under Megatron DDP with its optimizer and LR schedule, as training has
    them (fp32 on CPU)."""
    torch.manual_seed(seed)
    chunks = build_speech_llm(cfg)
    model = wrap_ddp(cfg, chunks)
    optimizer, scheduler = build_optimizer(cfg, model, torch.float32)
    return chunks[0], model, optimizer, scheduler


def _backward(model, optimizer, batch) -> None:
    """One real forward/backward, as a training step runs it: gradients land in ``main_grad``."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    model[0](batch).sum().backward()
    model[0].finish_grad_sync()


def _groups(optimizer) -> dict[int, dict]:
    """id(model parameter) -> its param group (the distributed optimizer holds shards of model
    parameters, so its groups are found through its index map)."""
    found = {}
    for part in optimizer.chained_optimizers:
        index = getattr(part, "model_param_group_index_map", None)
        if index is not None:
            for param, (group, _) in index.items():
                found[id(param)] = part.optimizer.param_groups[group]
        else:
            for group in part.optimizer.param_groups:
                for param in group["params"]:
                    found[id(param)] = group
    return found


def _part(name: str) -> str:
    if name.startswith("audio.encoder."):
        return "encoder"
    if name.startswith("audio.adapter.") or name.startswith("cross_attention."):
        return "adapter"
    assert name.startswith("llm."), name
    return "llm"


# ------------------------------------------------------------------------- checkpoint folders


def test_resume_picks_complete_checkpoints_only(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert checkpoint.latest_checkpoint(root) is None  # no folder at all
    root.mkdir()
    assert checkpoint.latest_checkpoint(root) is None  # an empty folder
    (root / ".step_0000008.tmp").mkdir()  # being written (or killed while written)
    assert checkpoint.complete_checkpoints(root) == []
    assert checkpoint.latest_checkpoint(root) is None

    for step in (2, 10, 9, 9_999_999, 10_000_000):  # as text, 10000000 sorts before 9999999
        (root / checkpoint.step_name(step)).mkdir()
    (root / "step_12").mkdir()  # not a checkpoint name
    (root / "step_0000011").write_text("")  # a file, not a folder
    names = [p.name for p in checkpoint.complete_checkpoints(root)]
    assert names == [
        "step_0000002",
        "step_0000009",
        "step_0000010",
        "step_9999999",
        "step_10000000",
    ]
    assert checkpoint.latest_checkpoint(root) == root / "step_10000000"  # no marker: newest

    (root / checkpoint.LATEST).write_text("step_0000009\n")
    assert checkpoint.latest_checkpoint(root) == root / "step_0000009"  # the marker rules

    for named in ("step_0000050", ".step_0000008.tmp"):  # missing, and unfinished
        (root / checkpoint.LATEST).write_text(named)
        with caplog.at_level("WARNING", logger="salm.checkpoint"):
            assert checkpoint.latest_checkpoint(root) == root / "step_10000000"
        assert named in caplog.text
        caplog.clear()


def test_pruning_goes_by_write_order_and_keeps_the_checkpoint_just_written(single_rank, tmp_path):
    """A new run in a folder holding an older run's higher steps (from before runs over one were
    refused; none has a write order): each new checkpoint survives its own pruning, the older
    run's go first, and ``latest`` always names a folder that exists."""
    root = tmp_path / "checkpoints"
    torch.manual_seed(0)
    (model,) = build_speech_llm(tiny_config("salm"))
    for step in (100, 200):  # the older run's
        checkpoint.save(root, step, [model], None, {}, {}, None)
        (root / checkpoint.step_name(step) / checkpoint.WRITE_ORDER).unlink()

    def names():
        return [p.name for p in checkpoint.complete_checkpoints(root)]

    expected = {1: ["step_0000200", "step_0000001"], 2: ["step_0000001", "step_0000002"]}
    for step in (1, 2):
        written = checkpoint.save(root, step, [model], None, {}, {}, keep=2)
        assert written.is_dir() and names() == expected[step]
        assert checkpoint.latest_checkpoint(root) == written
        assert (root / checkpoint.LATEST).read_text() == written.name

    # step 1 saved again (a resume after a crash before `latest` named step 2): now the newest
    checkpoint.save(root, 1, [model], None, {}, {}, keep=2)
    assert names() == ["step_0000002", "step_0000001"]
    (root / checkpoint.LATEST).unlink()  # without the marker: the newest written, not the highest
    assert checkpoint.latest_checkpoint(root) == root / "step_0000001"
    assert checkpoint.prune(root, 1, root / "step_0000002") == [root / "step_0000001"]
    assert names() == ["step_0000002"]


def test_a_new_run_over_an_earlier_one_is_refused_unless_it_starts_over(tmp_path, capsys):
    (tmp_path / "shard-0.tar").write_bytes(b"")
    out = tmp_path / "run"
    (out / "checkpoints" / "step_0000005").mkdir(parents=True)
    (out / "checkpoints" / ".step_0000006.tmp").mkdir()
    named = [f"data.train_shards={tmp_path / 'shard-0.tar'}", f"data.tokenizer={tmp_path}",
             f"train.output_dir={out}"]  # fmt: skip
    assert train.main([*named, "checkpoint.resume=false"]) == 2
    assert capsys.readouterr().err == (
        f"salm train: error: checkpoint.resume=false, but {out}/checkpoints holds checkpoints of "
        "an earlier run (step_0000005): set checkpoint.start_over=true to move that run's "
        f"outputs aside (into {out}/old-run-N) and start over, resume it "
        "(checkpoint.resume=true), or train in another train.output_dir\n"
    )
    assert (out / "checkpoints" / "step_0000005").is_dir()  # untouched


def test_start_over_moves_the_earlier_run_aside_and_deletes_nothing(single_rank, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_0000005").mkdir(parents=True)
    (out / "tensorboard").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5}\n')
    (out / "config.yaml").write_text("seed: 1\n")
    (out / "notes.txt").write_text("mine")  # not a run output: stays
    assert checkpoint.set_aside_earlier_run(out) == out / "old-run-1"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "old-run-1"]
    assert sorted(p.name for p in (out / "old-run-1").iterdir()) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "tensorboard",
    ]  # fmt: skip
    assert (out / "old-run-1" / "checkpoints" / "step_0000005").is_dir()
    assert checkpoint.set_aside_earlier_run(out) is None  # nothing left to move
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert checkpoint.set_aside_earlier_run(out) == out / "old-run-2"
    assert (out / "old-run-1" / "metrics.jsonl").read_text() == '{"step": 5}\n'


def test_a_resume_reading_the_data_otherwise_names_both_values(single_rank, caplog):
    saved = {"data.shuffle_buffer": 8, "data.bucket_window": 16, "data.tokenizer": "sha1 ab"}
    check_same_data("ckpt", saved, dict(saved))  # the same: resumes
    check_same_data("ckpt", saved, None)  # a rank that reads no data
    changed = {**saved, "data.shuffle_buffer": 4, "data.tokenizer": "sha1 cd", "new": 1}
    with pytest.raises(ConfigError) as error:
        check_same_data("ckpt", saved, changed)
    assert str(error.value) == (
        "ckpt was trained reading the data otherwise than this run would (data.shuffle_buffer: "
        "checkpoint 8, this run 4; data.tokenizer: checkpoint sha1 ab, this run sha1 cd): "
        "resuming would read samples twice or never. Resume with the checkpoint's values, or "
        "start over (checkpoint.start_over=true) or in another train.output_dir"
    )
    with caplog.at_level("WARNING", logger="salm.checkpoint"):  # saved before they were recorded
        check_same_data("ckpt", None, changed)
    assert "ckpt records no data settings" in caplog.text


def test_a_run_saves_its_paths_absolute(tmp_path):
    relative = apply_overrides(Config(), [
        "data.train_shards=data/shard-{000000..000003}.tar", "data.valid_shards=/abs/valid.tar",
        "data.tokenizer=tok", "checkpoint.pretrained_llm=../llm",
    ])  # fmt: skip
    cfg = absolute_paths(relative, tmp_path)
    assert cfg.data.train_shards == f"{tmp_path}/data/shard-{{000000..000003}}.tar"
    assert cfg.data.valid_shards == "/abs/valid.tar"
    assert cfg.data.tokenizer == f"{tmp_path}/tok"
    assert cfg.train.output_dir == f"{tmp_path}/runs/salm"
    assert cfg.checkpoint.pretrained_llm == f"{tmp_path}/../llm"
    assert cfg.checkpoint.pretrained_encoder is None
    assert absolute_paths(cfg, "/elsewhere") == cfg  # absolute ones stay
    mixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_shards="{/a,b}.tar"))
    with pytest.raises(ConfigError, match="data.train_shards='{/a,b}.tar' mixes absolute and rel"):
        absolute_paths(mixed, tmp_path)


# ------------------------------------------------------------------- DDP buffers and groups


@pytest.mark.parametrize("distributed", [True, False], ids=["distributed", "plain"])
def test_frozen_parameters_get_no_gradient_buffer_and_no_optimizer_state(single_rank, distributed):
    cfg = _config("salm", "model.freeze_llm=true", f"optim.distributed={str(distributed).lower()}")
    chunk, model, optimizer, _ = _setup(cfg)
    named = dict(chunk.named_parameters())
    trainable = {id(p): p for p in named.values() if p.requires_grad}
    frozen = [p for p in named.values() if not p.requires_grad]
    assert frozen and trainable
    assert {_part(n) for n, p in named.items() if not p.requires_grad} == {"llm"}

    buffered = [p for buffer in model[0].buffers for p in buffer.params]
    assert {id(p) for p in buffered} == set(trainable)
    assert sum(p.numel() for p in buffered) == sum(p.numel() for p in trainable.values())
    assert not any(hasattr(p, "main_grad") for p in frozen)
    assert set(_groups(optimizer)) == set(trainable)

    before = {n: p.detach().clone() for n, p in named.items()}
    _backward(model, optimizer, collate(speech_samples("salm")))
    applied, _ = optimizer_step(optimizer, cfg.optim.clip_grad)
    assert applied
    state = [s for part in optimizer.chained_optimizers for s in part.optimizer.state.values()]
    assert len(state) == len(trainable)
    assert sum(s["exp_avg"].numel() for s in state) == sum(p.numel() for p in trainable.values())
    for name, p in named.items():  # the trainable ones moved, the frozen ones did not
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_param_groups_no_decay_on_1d_and_own_lr_per_part(single_rank, arch):
    lr, min_lr = 1e-4, 1e-5
    peak = {"llm": lr, "encoder": 1e-3, "adapter": 5e-4}
    cfg = _config(
        arch,
        f"optim.lr={lr}",
        f"optim.min_lr={min_lr}",
        f"optim.encoder_lr={peak['encoder']}",
        f"optim.adapter_lr={peak['adapter']}",
        "optim.weight_decay=0.1",
        "optim.warmup_steps=0",
        "train.steps=10",
    )
    chunk, _, optimizer, scheduler = _setup(cfg)
    groups = _groups(optimizer)
    seen = set()
    for name, p in chunk.named_parameters():
        group, part, flat = groups[id(p)], _part(name), p.dim() == 1
        assert group["wd_mult"] == (0.0 if flat else 1.0), name
        assert group["weight_decay"] == pytest.approx(0.1 * group["wd_mult"]), name
        assert group["max_lr"] == pytest.approx(peak[part]), name
        assert group["min_lr"] == pytest.approx(min_lr * peak[part] / lr), name
        assert group["lr"] == pytest.approx(peak[part]), name  # no warmup: at the peak
        assert group["default_config"] == (part == "llm"), name
        seen.add((part, flat))
    assert seen == {(part, flat) for part in peak for flat in (True, False)}
    assert current_lr(optimizer) == pytest.approx(lr)  # the LLM's

    # One schedule shape: halfway every group is at the same fraction of its peak, at the end at
    # its own minimum.
    scheduler.step(increment=5)
    fractions = {round(g["lr"] / g["max_lr"], 9) for g in optimizer.param_groups}
    assert len(fractions) == 1 and 0.1 < fractions.pop() < 1
    scheduler.step(increment=5)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["min_lr"])


def test_nothing_to_train_is_refused(single_rank):
    cfg = _config(
        "salm", "model.freeze_llm=true", "model.freeze_encoder=true", "model.freeze_adapter=true"
    )
    with pytest.raises(ConfigError, match="nothing to train"):
        _setup(cfg)


# ------------------------------------------------------------------------------ optimizer step


@pytest.mark.parametrize(
    "bad, distributed", [(math.inf, True), (math.nan, False)], ids=["inf", "nan-plain"]
)
def test_step_skips_non_finite_gradients_and_clips_finite_ones(single_rank, bad, distributed):
    # Adam's first step moves each parameter by lr * g / (|g| + eps) (no weight decay): with a
    # large eps that depends on the gradient's scale, so the clipped gradient shows in the update.
    lr, eps, clip = 0.1, 1.0, 1.0
    cfg = _config(
        "salm",
        f"optim.lr={lr}",
        "optim.weight_decay=0",
        f"optim.adam_eps={eps}",
        f"optim.clip_grad={clip}",
        f"optim.distributed={str(distributed).lower()}",
    )
    chunk, model, optimizer, _ = _setup(cfg)
    batch = collate(speech_samples("salm"))
    params = dict(chunk.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}

    _backward(model, optimizer, batch)
    params["llm.decoder.layers.1.mlp.linear_fc1.weight"].main_grad[3, 5] = bad
    applied, norm = optimizer_step(optimizer, clip)
    assert not applied and not math.isfinite(norm)
    for name, p in params.items():
        assert torch.equal(p, before[name]), f"{name} changed in a skipped step"
    assert not any(part.optimizer.state for part in optimizer.chained_optimizers)

    # The next step is Adam's first: the skipped one left no moments and no step count.
    _backward(model, optimizer, batch)
    grads = {n: p.main_grad.double() for n, p in params.items()}
    expected_norm = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    assert expected_norm > 10 * clip  # clipping matters here
    applied, norm = optimizer_step(optimizer, clip)
    assert applied
    assert norm == pytest.approx(expected_norm, rel=1e-5)  # the norm before clipping
    groups = _groups(optimizer)
    scale = clip / (norm + 1e-6)  # Megatron's clip coefficient
    for name, p in params.items():
        assert groups[id(p)]["lr"] == pytest.approx(lr)
        g = grads[name] * scale
        update = before[name].double() - p.detach().double()
        torch.testing.assert_close(update, lr * g / (g.abs() + eps), rtol=1e-4, atol=1e-7, msg=name)


# -------------------------------------------------------------------------------- recompute


MOE = ("llm.preset=tiny-moe", "llm.moe_aux_loss_coeff=0.5")  # the aux loss's gradient counts


@pytest.mark.parametrize(
    "recompute, llm",
    [
        ("full", ()),
        ("selective", ()),
        ("full", MOE),
        ("selective", (*MOE, "llm.recompute_modules=[moe]")),  # router, dispatch, experts
    ],
    ids=["full", "selective", "full-moe", "selective-moe"],
)
def test_recompute_changes_neither_loss_nor_gradients(single_rank, recompute, llm):
    batch = collate(speech_samples("salm"))
    torch.manual_seed(0)
    (reference,) = build_speech_llm(_config("salm", *llm[:2]))
    (model,) = build_speech_llm(_config("salm", *llm, f"llm.recompute={recompute}"))
    assert model.llm.config.recompute_granularity == recompute
    model.load_state_dict(reference.state_dict())
    losses = []
    for m in (reference, model):
        loss = m(batch)
        loss.sum().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


# --------------------------------------------------------------------------- command line


def test_cli_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_cli_names_missing_and_bad_fields(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("optim: {lr: 3e-4}\ntrain: {steps: 3}\n")
    assert train.main([str(run), "train.steps=5"]) == 2
    assert "data.train_shards is required" in capsys.readouterr().err

    assert train.main(["optim.schedule=wavy"]) == 2  # an override in the file's place
    err = capsys.readouterr().err
    assert "optim.schedule='wavy'" in err and "salm train: error:" in err

    sweep = tmp_path / "lr=3e-4" / "run.yaml"  # a path with "=" is still the config file
    sweep.parent.mkdir()
    sweep.write_text(run.read_text())
    assert train.main([str(sweep)]) == 2
    assert "data.train_shards is required" in capsys.readouterr().err

    # the files a run names are checked before anything starts
    (tmp_path / "shard-0.tar").write_bytes(b"")
    named = [f"data.train_shards={tmp_path / 'shard-0.tar'}", f"train.output_dir={tmp_path}/run"]
    assert train.main([*named, f"data.tokenizer={tmp_path / 'tok.model'}"]) == 2
    error = capsys.readouterr().err
    assert error == f"salm train: error: data.tokenizer={tmp_path}/tok.model does not exist\n"
    named.append(f"data.tokenizer={tmp_path}")
    assert train.main([*named, f"checkpoint.pretrained_llm={tmp_path / 'llm'}"]) == 2
    assert capsys.readouterr().err == (
        f"salm train: error: checkpoint.pretrained_llm={tmp_path}/llm is not a Megatron dist "
        "checkpoint (no such folder)\n"
    )
    assert train.main([*named, f"checkpoint.pretrained_encoder={tmp_path}"]) == 2
    assert "(no metadata.json)" in capsys.readouterr().err


def test_config_differences_name_the_model_fields_that_changed():
    old = Config().to_dict()
    new = apply_overrides(Config(), ["llm.hidden_size=96", "optim.lr=1e-3", "lora.rank=8"])
    differences = [
        "llm.hidden_size: checkpoint 64, this run 96",
        "lora.rank: checkpoint 0, this run 8",
    ]
    assert config_differences(old, new.to_dict(), MODEL_SECTIONS) == differences
    del old["lora"]["rank"]  # a field an older checkpoint's config does not have is left out
    assert config_differences(old, new.to_dict(), MODEL_SECTIONS) == differences[:1]


def test_exponent_notation_reads_as_float(tmp_path):
    cfg = apply_overrides(Config(), ["optim.lr=3e-4"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 3e-4
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"  # YAML 1.1: no dot, so a string
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 3e-4, min_lr: 1e-6}\n")
    optim = load_config(path).optim
    assert type(optim.lr) is float and optim.lr == 3e-4
    assert type(optim.min_lr) is float and optim.min_lr == 1e-6


# ------------------------------------------------------------------------ pretrained weights


def test_pretrained_llm_and_encoder_load_exactly(single_rank, tmp_path):
    torch.manual_seed(0)
    (source,) = build_speech_llm(tiny_config("salm"))
    with torch.no_grad():  # training mode: BatchNorm's running statistics move off their init
        source(collate(speech_samples("salm")))
    checkpoint.save_module(source.llm, tmp_path / "llm")
    checkpoint.save_module(source.audio.encoder, tmp_path / "encoder")

    torch.manual_seed(1)
    (target,) = build_speech_llm(tiny_config("salm"))
    initial = {k: v.clone() for k, v in target.state_dict().items() if torch.is_tensor(v)}
    adapter = {k: v.clone() for k, v in target.audio.adapter.state_dict().items()}
    checkpoint.load_pretrained(target.llm, tmp_path / "llm", "LLM")
    checkpoint.load_pretrained(target.audio.encoder, tmp_path / "encoder", "encoder")

    expected, loaded = source.state_dict(), target.state_dict()
    for prefix in ("llm.", "audio.encoder."):
        keys = [k for k in expected if k.startswith(prefix) and not k.endswith("_extra_state")]
        assert keys
        for key in keys:
            assert torch.equal(loaded[key], expected[key]), key
    moved = {k for k in expected if k in initial and not torch.equal(initial[k], expected[k])}
    assert "llm.embedding.word_embeddings.weight" in moved  # the seeds differ
    assert any(k.startswith("audio.encoder.") and "running_mean" in k for k in moved)
    for key, value in target.audio.adapter.state_dict().items():  # not part of either
        assert torch.equal(value, adapter[key]), key
        assert not torch.equal(value, source.audio.adapter.state_dict()[key]), key

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
            checkpoint.load_pretrained(target.llm, folder, "LLM")


def test_moe_layouts_that_cannot_train_are_refused_first(tmp_path, capsys):
    """Before any process group: MoE at TP>1 without sequence parallelism (Megatron's MoE layers
    route each TP rank's share of the sequence), and decoding validation at EP>1 (DP ranks decode
    on their own, but their MoE layers would wait on each other)."""
    (tmp_path / "shard-0.tar").write_bytes(b"")
    named = [f"data.train_shards={tmp_path / 'shard-0.tar'}", f"data.tokenizer={tmp_path}",
             f"train.output_dir={tmp_path}/run", "llm.preset=tiny-moe"]  # fmt: skip
    assert train.main([*named, "parallel.tensor_model_parallel_size=2"]) == 2
    error = capsys.readouterr().err
    assert "llm.num_moe_experts=4 at parallel.tensor_model_parallel_size=2 trains with" in error
    assert "parallel.sequence_parallel=true only" in error
    validation = [f"data.valid_shards={tmp_path / 'shard-0.tar'}", "train.eval_interval=5",
                  "train.eval_wer_samples=4", "parallel.expert_model_parallel_size=2"]  # fmt: skip
    assert train.main([*named, *validation]) == 2
    error = capsys.readouterr().err
    assert "train.eval_wer_samples=4 decodes each data-parallel rank's samples" in error
    assert "parallel.expert_model_parallel_size=2 sends tokens" in error


def test_dp_reshardable_optimizer_state_is_refused_at_another_ep(tmp_path):
    """Its buffers hold this rank's experts; fully_reshardable loads at any EP. A record from
    before expert parallelism (no ep, etp) reads as EP=1."""
    here = {"tp": 2, "pp": 1, "vpp": 1, "dp": 2, "ep": 1, "etp": 2, "world": 4}
    saved = {**here, "ep": 2}
    dp_reshardable = optimizer_state.sharding_metadata("dp_reshardable")
    with pytest.raises(ConfigError) as error:
        optimizer_state.check_loads_here(tmp_path, dp_reshardable, saved, here)
    expected = (
        "(TP=2, PP=1, VPP=1, EP=2, ETP=2), not at this run's (TP=2, PP=1, VPP=1, EP=1, ETP=2)"
    )
    assert expected in str(error.value)
    with pytest.raises(ConfigError, match=r"ETP=1\), not at this run's"):  # experts split alike
        optimizer_state.check_loads_here(tmp_path, dp_reshardable, {**here, "etp": 1}, here)
    fully = optimizer_state.sharding_metadata("fully_reshardable")
    optimizer_state.check_loads_here(tmp_path, fully, saved, here)
    before_ep = {k: v for k, v in here.items() if k not in ("ep", "etp")}
    optimizer_state.check_loads_here(tmp_path, dp_reshardable, before_ep, here)
    # a dense run's message names what it has: TP, PP, VPP
    with pytest.raises(ConfigError, match=r"\(TP=2, PP=1, VPP=1\), not at this run's \(TP=1, "):
        dense = {**here, "tp": 1, "etp": 1}
        optimizer_state.check_loads_here(tmp_path, dp_reshardable, here, dense)
