"""Proves SALM/BESTOW layouts (padded and packed), masks, that a sample's logits do not depend on
what shares its packed row, packed rows training LoRA on a frozen LLM as padded batches do, the
output layer at answer positions only, length-grouped encoding, the no-audio path, freezing,
checkpoint coverage, learning, the audio path kept fp32 in a bf16 model, and a CTC head with its
own vocabulary."""

import pytest
import torch

from salm_megatron.config import apply_overrides
from salm_megatron.data import SpeechSample, collate
from salm_megatron.models import build_speech_llm
from salm_megatron.models.answer_loss import hidden_states_only
from salm_megatron.models.audio_path import length_groups
from salm_megatron.models.salm import splice_layout
from tests.speech_fixtures import (
    AUDIO_TOKEN,
    prompt,
    speech_samples,
    tiny_config,
    waveform,
)

ARCHS = ("salm", "bestow")


def _model(arch, **overrides):
    torch.manual_seed(0)
    (model,) = build_speech_llm(tiny_config(arch, **overrides))
    if arch == "bestow":  # leave the zero-initialised start so the audio matters to the loss
        with torch.no_grad():
            for p in model.cross_attention.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0.0, 0.05)
    return model.eval()


def _position_losses(model, batch):
    with torch.no_grad():
        return model(batch)


def test_splice_layout_places_each_segment_at_its_placeholder():
    ids = torch.tensor([[1, AUDIO_TOKEN, 5, AUDIO_TOKEN, 6, 7], [1, 8, AUDIO_TOKEN, 9, 0, 0]])
    answer = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]])
    layout = splice_layout(ids, answer, torch.tensor([2, 3, 1]), AUDIO_TOKEN, multiple=4)
    # sample 0: 1 | a0 a0 | 5 | a1 a1 a1 | 6 7 -> 9 positions; sample 1: 1 8 | a2 | 9 0 0 -> 6
    # The table: 12 tokens (sample-major), the segments' 2 + 3 + 1 frames, a zero row (18).
    assert layout.length == 12 and layout.lengths.tolist() == [9, 6]
    assert layout.source[0].tolist() == [0, 12, 13, 2, 14, 15, 16, 4, 5, 18, 18, 18]
    assert layout.source[1].tolist() == [6, 7, 17, 9, 10, 11, 18, 18, 18, 18, 18, 18]
    # The loss falls on the positions just before each answer token.
    assert layout.loss_mask[0].nonzero().flatten().tolist() == [6, 7]
    assert layout.labels[0, 6:8].tolist() == [6, 7]
    assert layout.loss_mask[1].nonzero().flatten().tolist() == [2]  # the audio frame predicts 9
    assert layout.labels[1, 2] == 9
    assert layout.packed is None


def test_packed_splice_layout_puts_the_samples_back_to_back():
    ids = torch.tensor([[1, AUDIO_TOKEN, 5, AUDIO_TOKEN, 6, 7], [1, 8, AUDIO_TOKEN, 9, 0, 0]])
    answer = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0]])
    lengths = torch.tensor([6, 4])
    segments = torch.tensor([2, 3, 1])
    padded = splice_layout(ids, answer, segments, AUDIO_TOKEN, 4, None, lengths)
    packed = splice_layout(ids, answer, segments, AUDIO_TOKEN, 4, 20, lengths, packed=True)
    assert packed.length == 20 and packed.source.shape == (1, 20)
    for name in ("source", "labels", "loss_mask"):
        rows = getattr(padded, name)
        expected = torch.cat([rows[0, :9], rows[1, :4], getattr(packed, name)[0, 13:]])
        assert getattr(packed, name)[0].tolist() == expected.tolist(), name
    # Sample 0's last position predicts nothing (not sample 1's first token).
    assert packed.labels[0, 8] == 0 and packed.loss_mask[0, 8] == 0
    assert packed.loss_mask[0].nonzero().flatten().tolist() == [6, 7, 11]
    assert packed.packed.seqlens == (9, 4, 7)  # the tail is a sequence of its own
    assert packed.packed.cu_seqlens_q.tolist() == [0, 9, 13, 20]
    assert packed.packed.max_seqlen_q == 9
    with pytest.raises(ValueError, match="holds 13 positions .* sequence_length=12"):
        splice_layout(ids, answer, segments, AUDIO_TOKEN, 4, 12, lengths, packed=True)
    with pytest.raises(ValueError, match="multiple of 4"):
        splice_layout(ids, answer, segments, AUDIO_TOKEN, 4, 18, lengths, packed=True)


def test_splice_layout_leaves_text_padding_out():
    # Sample 1 has the longer audio, sample 0 the longer text: with text_lengths each sample
    # takes its own length, not its padded row plus its audio.
    ids = torch.tensor([[1, AUDIO_TOKEN, 5, 6, 7, 8], [1, AUDIO_TOKEN, 9, 0, 0, 0]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0]])
    lengths = torch.tensor([6, 3])
    layout = splice_layout(ids, answer, torch.tensor([1, 5]), AUDIO_TOKEN, 1, None, lengths)
    assert layout.length == 7  # sample 1: 1 | a a a a a | 9; padded rows would make it 10
    # 12 tokens, then the segments' 1 + 5 frames from row 12, the zero row at 18
    assert layout.source[1].tolist() == [6, 13, 14, 15, 16, 17, 8]
    assert layout.loss_mask[1].nonzero().flatten().tolist() == [5]
    padded = splice_layout(ids, answer, torch.tensor([1, 5]), AUDIO_TOKEN, 1)
    assert padded.length == 10
    with pytest.raises(ValueError, match="placeholder lies in a sample's padding"):
        splice_layout(ids, answer, torch.tensor([1, 5]), AUDIO_TOKEN, 1, None, torch.tensor([6, 1]))


def test_splice_layout_rejects_mismatched_placeholders():
    ids = torch.tensor([[1, AUDIO_TOKEN, 5]])
    with pytest.raises(ValueError, match="1 audio placeholders .* but 2 audio segments"):
        splice_layout(ids, torch.zeros_like(ids), torch.tensor([2, 2]), AUDIO_TOKEN, 1)
    with pytest.raises(ValueError, match="answer_mask marks an audio placeholder"):
        splice_layout(ids, torch.tensor([[0, 1, 0]]), torch.tensor([2]), AUDIO_TOKEN, 1)
    with pytest.raises(ValueError, match="sequence_length=4 must be >= the batch's 5 positions"):
        splice_layout(ids, torch.zeros_like(ids), torch.tensor([3]), AUDIO_TOKEN, 1, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_masks_keep_the_loss_where_it_belongs(single_rank, arch):
    model = _model(arch)
    batch = collate(speech_samples(arch))
    base = _position_losses(model, batch)
    answer_positions = base != 0
    assert answer_positions.sum() == batch["answer_mask"].sum()  # one loss per answer token

    # Audio padding (beyond each segment's length) never matters.
    padded = dict(batch, audio=batch["audio"].clone())
    for j, length in enumerate(batch["audio_lengths"].tolist()):
        padded["audio"][j, length:] = torch.randn(padded["audio"].shape[1] - length)
    torch.testing.assert_close(_position_losses(model, padded), base, rtol=0, atol=0)

    # Extra text padding never matters.
    longer = dict(batch)
    longer["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, 5), value=77)
    longer["answer_mask"] = torch.nn.functional.pad(batch["answer_mask"], (0, 5))
    torch.testing.assert_close(_position_losses(model, longer)[:, : base.shape[1]], base)

    # A prompt token changes that sample's answer losses only, and never adds prompt losses.
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    prompt_pos = int(batch["answer_mask"][1].nonzero()[0]) - 1  # the last prompt token
    edited["input_ids"][1, prompt_pos] = 123
    changed = _position_losses(model, edited)
    assert ((changed != 0) == answer_positions).all()
    assert not torch.allclose(changed[1], base[1])
    torch.testing.assert_close(changed[[0, 2, 3]], base[[0, 2, 3]])

    # Real audio frames change their own sample's answer losses.
    other = dict(batch, audio=batch["audio"].clone())
    length = int(batch["audio_lengths"][0])
    other["audio"][0, :length] = waveform(length / 16000, seed=99)[:length]
    changed = _position_losses(model, other)
    assert not torch.allclose(changed[0], base[0])
    torch.testing.assert_close(changed[3], base[3])  # the text-only sample is untouched


def _logits(model, samples, length=None, packed=False) -> torch.Tensor:
    """The output layer's logits ``[k, v]`` of one micro-batch: at its k answer-predicting
    positions, in row-major order (the only positions the model runs the output layer at)."""
    captured = []
    hook = model.llm.output_layer.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    with torch.no_grad():
        model(collate(samples), length, packed=packed)
    hook.remove()
    return captured[0][:, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_samples_logits_do_not_depend_on_its_row(single_rank, arch):
    """Packed alone, packed after other samples (multi-segment, text-only), or padded in a batch:
    the same logits at the sample's own positions (positions restart, attention stays inside)."""
    model = _model(arch)
    *others, sample = [speech_samples(arch)[i] for i in (0, 1, 3, 2)]
    length = sum(model.layout(collate([*others, sample]), None).lengths.tolist()) + 4
    alone = _logits(model, [sample], length, packed=True)
    shared = _logits(model, [*others, sample], length, packed=True)
    padded = _logits(model, [*others, sample])
    own = sum(sample.answer_mask)  # its answer tokens: the last rows of a row it comes last in
    assert len(alone) == own
    torch.testing.assert_close(shared[-own:], alone)
    torch.testing.assert_close(padded[-own:], alone)
    assert not torch.allclose(shared[:own], alone)  # other samples' positions come first


def test_the_output_layer_runs_at_answer_positions_only(single_rank):
    """The loss of every position equals the cross entropy of full logits, zero off the answers,
    while the output layer sees only the answer-predicting positions."""
    model = _model("salm")
    batch = collate(speech_samples("salm"))
    layout = model.layout(batch, None)
    with torch.no_grad():
        loss = model(batch)
        with hidden_states_only(model.llm):
            hidden = model.llm(None, None, None, decoder_input=model.embed(batch, layout))
        logits, _ = model.llm.output_layer(hidden)  # every position
    full = torch.nn.functional.cross_entropy(
        logits.transpose(0, 1).flatten(0, 1).float(), layout.labels.flatten(), reduction="none"
    ).view_as(loss)
    torch.testing.assert_close(loss, full * layout.loss_mask)
    assert len(_logits(model, speech_samples("salm"))) == int(layout.loss_mask.sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_train_lora_on_a_frozen_llm_as_padded_batches_do(single_rank, arch):
    """LoRA adapters on a frozen LLM, frozen adapter, auxiliary CTC loss: the packed row gives
    the padded batch's loss and the same gradients (adapters, encoder, CTC head), nothing else."""
    overrides = ["lora.rank=4", "model.freeze_llm=true", "model.freeze_adapter=true",
                 "encoder.conv_norm_type=layer_norm"]  # fmt: skip
    cfg = apply_overrides(tiny_config(arch, ctc_weight=0.5), overrides)
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg)
    with torch.no_grad():  # adapters that matter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.05)
    batch = collate(speech_samples(arch))
    length = sum(model.layout(batch, None).lengths.tolist()) + 3

    def loss_and_grads(packed):
        model.zero_grad()
        loss = model(batch, length if packed else None, packed=packed).sum()
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded = loss_and_grads(False)
    packed_loss, packed = loss_and_grads(True)
    torch.testing.assert_close(packed_loss, padded_loss)
    assert padded.keys() == packed.keys()
    assert any("lora" in n for n in padded) and any(n.startswith("ctc.") for n in padded)
    assert not any(n.startswith("audio.adapter") or "lora" not in n and n.startswith("llm.")
                   for n in padded)  # fmt: skip
    scale = torch.stack([g.norm() for g in padded.values()]).norm()
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_segments_of_very_different_lengths_are_encoded_apart(single_rank):
    """A packed row holds long and short clips: the encoder runs them in groups of similar
    length (none padded to a clip over 1/0.7 of its own), with the embeddings each gets alone."""
    assert length_groups([10, 100, 95, 40, 8]) == [[1, 2], [3], [0, 4]]
    assert length_groups([50, 60, 55]) == [[1, 2, 0]]  # a length bucket: one group
    model = _model("salm")
    samples = [*speech_samples("salm")[:3], speech_samples("salm")[0]]  # 0.23 s to 0.88 s
    with torch.no_grad():
        together, lengths, _ = model.encode_audio(collate(samples))
        for i, segment in enumerate(w for s in samples for w in s.audio):
            alone, _, _ = model.encode_audio(collate([SpeechSample([1, AUDIO_TOKEN], [0, 0],
                                                                   [segment])]))  # fmt: skip
            n = int(lengths[i])
            torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_micro_batch_without_audio_keeps_the_audio_path_in_the_graph(single_rank, arch):
    model = _model(arch).train()
    text_only = [s for s in speech_samples(arch) if not s.audio]
    batch = collate(text_only * 2)
    assert batch["audio"].shape[0] == 0
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model(batch).sum().backward()
    assert model.audio.training, "the audio path must stay in training mode"
    for key, before in statistics.items():  # the stand-in silence does not train BatchNorm
        torch.testing.assert_close(model.state_dict()[key], before, rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} fell out of the graph"
        # What reads audio contributes nothing (BESTOW's text self-attention and MLP still run).
        if name.startswith("audio.") or ".cross_attention" in name:
            assert not p.grad.any(), f"{name} got a non-zero gradient without audio"


def test_freeze_switches(single_rank):
    model = _model("salm", freeze_llm=True, freeze_encoder=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("audio.adapter.") for n in trainable)


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_state_dict_covers_every_part(single_rank, arch):
    model = _model(arch)
    state_keys = set(model.state_dict())
    sharded = model.sharded_state_dict()
    missing = {k for k in state_keys if k not in sharded and not k.endswith("_extra_state")}
    assert not missing, f"not in the sharded state dict: {sorted(missing)[:5]}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_overfits_eight_pairs(single_rank, arch):
    """Eight clips, each with its own 3-token answer to the same prompt: only the audio tells them
    apart, so near-zero loss means the audio path carries the information end to end."""
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(8):
        ids = prompt([5], arch, 1)
        answer = torch.randint(20, 200, (3,), generator=g).tolist() + [2]
        clip = waveform(0.3 + 0.02 * i, seed=i, f0=100 + 50 * i)
        samples.append(SpeechSample(ids + answer, [0] * len(ids) + [1] * 4, [clip]))
    batch = collate(samples)
    torch.manual_seed(0)
    (model,) = build_speech_llm(tiny_config(arch))
    steps = 250
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 3e-3, total_steps=steps, pct_start=0.1
    )
    tokens = batch["answer_mask"].sum()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(batch).sum() / tokens
        loss.backward()
        optimizer.step()
        schedule.step()
    assert loss.item() < 0.05, f"{arch} did not overfit: loss {loss.item():.3f}"


def test_bad_batches_are_named(single_rank):
    model = _model("salm")
    batch = collate(speech_samples("salm"))
    with pytest.raises(KeyError, match="the batch has no answer_mask"):
        model({k: v for k, v in batch.items() if k != "answer_mask"})
    with pytest.raises(ValueError, match=r"answer_mask \[4, 5\] must both be \[b, s\]"):
        model(dict(batch, answer_mask=batch["answer_mask"][:, :5]))
    with pytest.raises(ValueError, match="both audio and audio_lengths, or neither"):
        model({k: v for k, v in batch.items() if k != "audio_lengths"})
    with pytest.raises(ValueError, match=r"audio_lengths \[3\]"):
        model(dict(batch, audio_lengths=batch["audio_lengths"][:3]))


@pytest.mark.parametrize("arch", ARCHS)
def test_ctc_loss_adds_its_gradient_from_the_first_stage(single_rank, arch):
    """With model.ctc_weight the encoder's gradient is the LLM loss's plus weight x the CTC
    loss's (segments without a transcript left out), though only the LLM loss is returned."""
    batch = collate(speech_samples(arch))
    torch.manual_seed(0)
    # LayerNorm in the conv modules: the model encodes segments in length groups, BatchNorm's
    # batch statistics would then differ from those of the one batch ctc_only encodes.
    cfg = apply_overrides(tiny_config(arch, ctc_weight=0.5), ["encoder.conv_norm_type=layer_norm"])
    (model,) = build_speech_llm(cfg)

    def grads(loss_of):
        model.zero_grad()
        loss_of().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_ctc = grads(lambda: model(batch).sum())
    assert model.ctc_loss_sum > 0
    without = grads(lambda: model({k: v for k, v in batch.items() if "transcript" not in k}).sum())

    def ctc_only():
        encoded, lengths = model.audio.encode(batch["audio"], batch["audio_lengths"])
        return 0.5 * model.ctc(encoded, lengths, batch["transcripts"], batch["transcript_lengths"])

    ctc = grads(ctc_only)
    assert set(ctc) >= {"ctc.proj.weight"} and "ctc.proj.weight" not in without
    # Against the gradients' overall size: a conv bias before BatchNorm gets zero up to rounding.
    scale = torch.stack([g.norm() for g in with_ctc.values()]).norm()
    for name, grad in with_ctc.items():
        expected = without.get(name, 0) + ctc.get(name, 0)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bf16_model_keeps_its_audio_path_in_fp32(single_rank, arch):
    """Encoder, adapter and CTC weights and BatchNorm statistics stay fp32 in a bf16 model (the
    LLM and BESTOW block are bf16); the audio path computes under autocast and hands the LLM
    bf16 embeddings; the loss is the fp32 model's to bf16 precision."""
    torch.manual_seed(0)
    (fp32,) = build_speech_llm(tiny_config(arch, ctc_weight=0.5))
    torch.manual_seed(0)
    (bf16,) = build_speech_llm(tiny_config(arch, ctc_weight=0.5), params_dtype=torch.bfloat16)
    audio_side = ("audio.", "ctc.")
    for name, tensor in (*bf16.named_parameters(), *bf16.named_buffers()):
        if tensor.is_floating_point():
            expected = torch.float32 if name.startswith(audio_side) else torch.bfloat16
            assert tensor.dtype == expected, name
    batch = collate(speech_samples(arch))
    emb, _ = bf16.audio(batch["audio"], batch["audio_lengths"])
    assert emb.dtype == torch.bfloat16
    torch.manual_seed(1)  # the same SpecAugment masks in both
    loss = bf16.train()(batch).float().sum()
    loss.backward()
    encoder = [p for n, p in bf16.named_parameters() if n.startswith("audio.encoder")]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in encoder)
    torch.manual_seed(1)
    torch.testing.assert_close(loss, fp32.train()(batch).sum(), rtol=2e-2, atol=0)


def test_the_ctc_head_can_have_its_own_vocabulary(single_rank, tmp_path):
    """``model.ctc_tokenizer`` (e.g. the encoder's own small SentencePiece): training sets the
    head's size from it, refusing a ctc_vocab_size that is not its; transcripts are spelled in
    its ids; the head projects onto those ids (+ blank) and trains."""
    from salm_megatron.config import ConfigError
    from salm_megatron.data import load_tokenizer
    from salm_megatron.data.samples import make_sample
    from salm_megatron.training.data import check_ctc_tokenizer
    from tests.speech_fixtures import make_hf_tokenizer
    from tests.tokenizer_layouts import llama2_sentencepiece

    spm = llama2_sentencepiece(tmp_path / "ctc")  # 384 ids
    cfg = tiny_config("salm", ctc_weight=0.5, ctc_tokenizer=str(spm))
    assert check_ctc_tokenizer(tiny_config("salm")) == tiny_config("salm")  # the LLM's
    with pytest.raises(ConfigError, match="ctc_vocab_size=12, but model.ctc_tokenizer=.* 384 "):
        check_ctc_tokenizer(tiny_config("salm", ctc_tokenizer=str(spm), ctc_vocab_size=12))
    cfg = check_ctc_tokenizer(cfg)
    assert cfg.model.ctc_vocab_size == 384 != cfg.llm.vocab_size
    (model,) = build_speech_llm(cfg)
    assert model.ctc.proj.out_features == 385  # + blank

    spelled, llm_tokenizer = load_tokenizer(spm), load_tokenizer(make_hf_tokenizer(tmp_path))
    raw = {"audio": waveform(0.5, 0), "answer": "hello world", "task": "asr", "key": "k"}
    sample = make_sample(raw, llm_tokenizer, "plain", "salm", ctc_tokenizer=spelled)
    assert sample.transcripts == [spelled.encode("hello world")]
    assert sample.transcripts != [llm_tokenizer.encode("hello world")]

    batch = collate(speech_samples("salm"))
    model.train()(batch).sum().backward()
    assert model.ctc_loss_sum > 0 and model.ctc.proj.weight.grad.abs().sum() > 0
