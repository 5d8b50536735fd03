"""Proves the step streams `salm train` reads: validation is one pass (each sample once, nothing
dropped, then steps of no micro-batches), samples over data.max_tokens are skipped and counted in
`skipped`, and a weighted mix of datasets in data.train_shards draws by weight and resumes
exactly by keys (a resume with other weights is refused); bad mix entries are ConfigErrors
naming the entry, and so are windows that would end in a smaller micro-batch under pipeline
parallelism; step lengths round to data.length_multiple (128 on a GPU by default); with
data.packing each micro-batch is one row of data.pack_tokens positions holding whole samples and
their lengths (over-long samples skipped and counted), its settings checked up front and on
resume, and the rows' bounds reach pipeline stages that read no samples."""

import pytest

from salm_megatron.config import (
    ConfigError,
    absolute_paths,
    apply_overrides,
    config_from_dict,
)
from salm_megatron.data import load_tokenizer
from salm_megatron.data.batching import llm_sequence_length, token_cost
from salm_megatron.data.loader import SampleStream
from salm_megatron.data.samples import make_sample
from salm_megatron.training.compatible import check_same_data, data_settings
from salm_megatron.training.data import StepBatches
from salm_megatron.training.loop import check_training_config
from tests.speech_fixtures import make_hf_tokenizer, tiny_config, write_speech_shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    write_speech_shards(root / "a", 24, seed=0, per_shard=8)
    write_speech_shards(root / "b", 8, seed=100, per_shard=4)
    write_speech_shards(root / "valid", 11, seed=500, per_shard=4)  # 3 shards: 4, 4, 3
    make_hf_tokenizer(root / "tok")
    return root


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder / "tok")


def _config(folder, tokenizer, *overrides):
    return apply_overrides(
        tiny_config("salm"),
        [
            f"llm.vocab_size={tokenizer.vocab_size}",
            f"model.audio_token_id={tokenizer.audio_token_id}",
            f"data.valid_shards={folder}/valid/shard-{{000000..000002}}.tar",
            f"data.train_shards={folder}/a/shard-{{000000..000002}}.tar",
            "data.micro_batch_size=2", "data.num_workers=2", "data.bucket_window=8",
            "data.shuffle_buffer=4", "train.num_microbatches=2",
            *overrides,
        ],
    )  # fmt: skip


def _valid_samples(cfg, tokenizer):
    stream = SampleStream(cfg.data.valid_shards, shuffle=False, shuffle_buffer=0)
    return [make_sample(raw, tokenizer, cfg.data.prompt_format, "salm") for raw in stream]


def test_validation_is_one_pass_each_sample_once(single_rank, folder, tokenizer):
    cfg = _config(folder, tokenizer)
    batches = StepBatches(cfg, tokenizer, 1, train=False)
    steps = [next(batches) for _ in range(5)]
    # 11 samples in micro-batches of 2: 2 + 2, 2 + 2, 2 + 1, then nothing (no repeat, no drop)
    assert [s.count for s in steps] == [2, 2, 2, 0, 0]
    assert [s.samples for s in steps] == [4, 4, 3, 0, 0]
    keys = [k for s in steps for k in s.keys]
    assert sorted(keys) == sorted(s.key for s in _valid_samples(cfg, tokenizer))
    assert steps[-1].microbatches is None and steps[-1].keys == []


def test_samples_over_max_tokens_are_skipped_and_counted(single_rank, folder, tokenizer):
    probe = _config(folder, tokenizer)
    samples = _valid_samples(probe, tokenizer)
    costs = sorted(token_cost(probe)(s) for s in samples)
    limit = costs[len(costs) // 2]
    fitting = sorted(s.key for s in samples if token_cost(probe)(s) <= limit)
    assert 0 < len(fitting) < len(samples)
    # validation windows of data.micro_batch_size samples: one sample each, cut by max_tokens
    cfg = _config(folder, tokenizer, f"data.max_tokens={limit}", "data.micro_batch_size=1")
    batches = StepBatches(cfg, tokenizer, 1, train=False)
    keys = [k for _ in range(len(samples)) for k in next(batches).keys]
    assert sorted(keys) == fitting  # the others skipped, none raised
    assert batches.skipped["over_max_tokens"] == len(samples) - len(fitting)


def test_weighted_mix_from_the_config_draws_by_weight_and_resumes_exactly(
    single_rank, folder, tokenizer
):
    mix = (
        f"data.train_shards=[{{shards: '{folder}/a/shard-{{000000..000002}}.tar', weight: 3}}, "
        f"{{shards: '{folder}/b/shard-*.tar', weight: 1}}]"
    )
    cfg = _config(folder, tokenizer, mix)
    assert cfg.data.train_datasets == [
        (f"{folder}/a/shard-{{000000..000002}}.tar", 3.0),
        (f"{folder}/b/shard-*.tar", 1.0),
    ]
    full = StepBatches(cfg, tokenizer, 1, train=True)
    expected = [next(full).keys for _ in range(10)]
    keys = [k for step in expected for k in step]
    from_b = sum(k.startswith("utt-100-") for k in keys)
    assert 0 < from_b < len(keys) / 2  # about 1 in 4
    first = StepBatches(cfg, tokenizer, 1, train=True)
    seen = [next(first).keys for _ in range(3)]  # stops inside a bucket window
    again = StepBatches(cfg, tokenizer, 1, train=True)
    again.load_state_dict(first.state_dict())
    assert seen + [next(again).keys for _ in range(7)] == expected
    plain = StepBatches(_config(folder, tokenizer), tokenizer, 1, train=True)
    with pytest.raises(ValueError, match="saved from one, this run mixes 2 datasets"):
        again.load_state_dict(plain.state_dict())
        next(again)


@pytest.mark.parametrize(
    "value, message",
    [
        ([], r"data.train_shards=\[\] must be a shard pattern or a non-empty list"),
        ([{"shards": "a.tar"}], r"data.train_shards\[0\]=.* must be a mapping with exactly"),
        ([{"shards": "a.tar", "weight": 1}, {"shards": "b.tar", "weight": 0}],
         r"data.train_shards\[1\].weight=0 must be a positive number"),
        ([{"shards": "a.tar", "weight": True}], r"data.train_shards\[0\].weight=True must be"),
        ([{"shards": "", "weight": 1}], r"data.train_shards\[0\].shards='' must be a shard"),
        ([{"shards": "a.tar", "weight": 1, "wieght": 2}], r"data.train_shards\[0\]=.*exactly"),
        (3, r"data.train_shards=3 must be a shard pattern"),
    ],
)  # fmt: skip
def test_bad_mix_entries_are_named(value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"train_shards": value}})


def test_a_missing_dataset_of_a_mix_is_named_up_front(folder, tmp_path):
    cfg = config_from_dict({
        "data": {"tokenizer": str(folder / "tok"), "train_shards": [
            {"shards": f"{folder}/a/shard-000000.tar", "weight": 1},
            {"shards": f"{tmp_path}/none-{{0..1}}.tar", "weight": 1},
        ]},
    })  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.train_shards\[1\].shards: 2 of 2 shards"):
        check_training_config(cfg)
    again = config_from_dict(cfg.to_dict())  # the resolved config round-trips
    assert again.data.train_shards == cfg.data.train_shards
    mix = [{"shards": "a/{0..1}.tar", "weight": 2}, *cfg.data.train_shards]
    relative = config_from_dict({"data": {"train_shards": mix}})
    assert [shards for shards, _ in absolute_paths(relative, tmp_path).data.train_datasets] == [
        f"{tmp_path}/a/{{0..1}}.tar",
        *(shards for shards, _ in cfg.data.train_datasets),
    ]  # saved runs name each dataset's shards absolute


def test_pipeline_stages_need_windows_of_whole_micro_batches():
    data = {"bucket_window": 10, "micro_batch_size": 4}
    config_from_dict({"data": data})  # one stage: a smaller last micro-batch is fine
    with pytest.raises(ConfigError, match="data.bucket_window=10 is not a multiple of data.micro"):
        config_from_dict({"data": data, "parallel": {"pipeline_model_parallel_size": 2}})


def test_a_mix_records_its_weights_for_resume(single_rank, folder, tokenizer):
    def settings(weight_b):
        mix = (
            f"data.train_shards=[{{shards: '{folder}/a/shard-{{000000..000002}}.tar', weight: 3}}, "
            f"{{shards: '{folder}/b/shard-*.tar', weight: {weight_b}}}]"
        )
        cfg = _config(folder, tokenizer, mix)
        return data_settings(cfg, tokenizer, StepBatches(cfg, tokenizer, 1, train=True).streams)

    assert settings(1)["data.train_shards weights"] == [3.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.train_shards weights: checkpoint \[3.0, 1.0\], "):
        check_same_data("ckpt", settings(1), settings(2))


def test_step_lengths_round_to_the_length_multiple(single_rank, folder, tokenizer):
    assert _config(folder, tokenizer).data.step_length_multiple(cuda=True) == 128
    assert _config(folder, tokenizer).data.step_length_multiple(cuda=False) == 1
    cfg = _config(folder, tokenizer, "data.length_multiple=128")
    lengths = {next(StepBatches(cfg, tokenizer, 4, train=True)).sequence_length for _ in range(3)}
    assert lengths and all(n % 128 == 0 for n in lengths)
    plain = next(StepBatches(_config(folder, tokenizer), tokenizer, 4, train=True))
    assert plain.sequence_length % 4 == 0 and plain.sequence_length < 128  # the layout's only
    with pytest.raises(ConfigError, match="data.length_multiple=0"):
        _config(folder, tokenizer, "data.length_multiple=0")


def test_packed_steps_hold_rows_of_pack_tokens(single_rank, folder, tokenizer):
    probe = _config(folder, tokenizer)
    samples = _valid_samples(probe, tokenizer)
    length = llm_sequence_length(probe)
    longest = max(length(s) for s in samples)
    pack = 4 * longest  # several samples a row
    cfg = _config(folder, tokenizer, "data.packing=true", f"data.pack_tokens={pack}")
    batches = StepBatches(cfg, tokenizer, 4, train=False)
    steps = [next(batches) for _ in range(4)]
    by_key = {s.key: s for s in samples}
    rows = 0
    for step in steps:
        assert not step.count or (step.sequence_length == pack and step.micro_batch_size == 1)
        keys = iter(step.keys)
        for mb in step.microbatches or []:  # each row's samples and their positions in it
            held = [by_key[next(keys)] for _ in range(len(mb["input_ids"]))]
            assert mb["packed_lengths"].tolist() == [length(s) for s in held]
            assert int(mb["packed_lengths"].sum()) <= pack
            rows += 1
    assert 1 < rows < len(samples)  # whole samples, several to a row
    keys = [k for s in steps for k in s.keys]
    assert sorted(keys) == sorted(s.key for s in samples)  # one pass, each sample once
    # Over pack_tokens: skipped and counted, never cut.
    short = sorted(length(s) for s in samples)[len(samples) // 2]
    cfg = _config(folder, tokenizer, "data.packing=true", f"data.pack_tokens={short}")
    batches = StepBatches(cfg, tokenizer, 1, train=False)
    kept = [k for _ in range(len(samples)) for k in next(batches).keys]
    assert sorted(kept) == sorted(s.key for s in samples if length(s) <= short)
    assert batches.skipped["over_pack_tokens"] == len(samples) - len(kept)


def test_packing_settings_are_checked(single_rank, folder, tokenizer):
    cfg = _config(folder, tokenizer, "data.packing=true", "data.pack_tokens=30")
    with pytest.raises(ConfigError, match="data.pack_tokens=30 is not a multiple of 4.* use 32"):
        StepBatches(cfg, tokenizer, 4, train=True)
    with pytest.raises(ConfigError, match="data.packing=true needs data.pack_tokens"):
        _config(folder, tokenizer, "data.packing=true")
    with pytest.raises(ConfigError, match="data.max_tokens=64 does not apply"):
        _config(folder, tokenizer, "data.packing=true", "data.pack_tokens=64",
                "data.max_tokens=64")  # fmt: skip
    with pytest.raises(ConfigError, match="context_parallel_size=2: packed rows cannot"):
        _config(folder, tokenizer, "data.packing=true", "data.pack_tokens=64",
                "parallel.context_parallel_size=2")  # fmt: skip
    with pytest.raises(ConfigError, match="train.global_batch_size=8 counts samples"):
        _config(folder, tokenizer, "data.packing=true", "data.pack_tokens=64",
                "train.global_batch_size=8")  # fmt: skip
    # A resume reading the rows otherwise is refused, naming the field.
    other = _config(folder, tokenizer, "data.packing=true", "data.pack_tokens=96")
    settings = [data_settings(c, tokenizer, StepBatches(c, tokenizer, 1, train=True).streams)
                for c in (_config(folder, tokenizer, "data.packing=true", "data.pack_tokens=64"),
                          other)]  # fmt: skip
    with pytest.raises(ConfigError, match="data.pack_tokens: checkpoint 64, this run 96"):
        check_same_data("ckpt", *settings)


def test_stages_without_samples_get_each_packed_rows_bounds(monkeypatch):
    """The max-all-reduce over the pipeline group, played between a stage that read two rows and
    one that read none: the second gets each row's sample lengths."""
    import torch

    from salm_megatron.training import data as step_data

    rows = [{"packed_lengths": torch.tensor([5, 3])}, {"packed_lengths": torch.tensor([7])}]
    sent = []
    monkeypatch.setattr(step_data, "maxima_over_ranks", lambda values, group: sent.append(values)
                        or values)  # fmt: skip
    step_data.StepBatches._row_bounds(rows, 2, None)  # the reading stage's side
    received = iter(sent)
    monkeypatch.setattr(step_data, "maxima_over_ranks", lambda values, group: [
        max(a, b) for a, b in zip(values, next(received), strict=True)])  # fmt: skip
    bounds = step_data.StepBatches._row_bounds(None, 2, None)
    assert [b["packed_lengths"].tolist() for b in bounds] == [[5, 3], [7]]
