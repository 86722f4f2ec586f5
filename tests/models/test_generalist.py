"""Model invariants: packed equals per-example, KV-cached decoding equals recompute, checkpoint
round trip is exact, presets instantiate, bad input is named, and a tiny model can overfit."""

import json
import math

import pytest
import torch

from generalist.data.packing import Example, ExampleEncoder
from generalist.modalities import TextTokenizer
from generalist.models.config import PRESETS, preset
from generalist.models.decoding import generate
from generalist.models.generalist import GeneralistModel

CORPUS = [
    "a photo of a small cat", "a sheep in a field", "the digit seven", "the digit three",
    "a spoken word", "a moving digit going left", "a table of measurements", "what is shown here",
    "an answer in a few words", "red green blue yellow", "one two three four five six seven eight nine",
]
TASKS = ["caption", "classify", "vqa"]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CORPUS * 4, vocab_size=300)


def _model(tokenizer, seed=0, **over):
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, n_tasks=len(TASKS), bos_id=tokenizer.token_id("<bos>"),
                 eos_id=tokenizer.token_id("<eos>"), **over)
    return GeneralistModel(cfg).eval()


def _examples(gen):
    t = torch.linspace(0, 0.25, 4000)
    return [
        Example([("image", torch.rand(3, 8, 12, generator=gen)), ("text", "what is shown here")], "a small cat", "vqa"),
        Example([("audio", (torch.sin(2 * math.pi * 440 * t), 16000))], "the digit seven", "classify"),
        Example([("video", torch.rand(4, 8, 8, 3, generator=gen))], "a moving digit going left", "caption"),
        Example([("table", (torch.tensor([0, 3, 5]), torch.tensor([1.5, float("nan"), -2.0])))], "three", "classify"),
        Example([("text", "red green blue")], "one two", "caption"),
    ]


def _encode(tokenizer, examples):
    enc = ExampleEncoder(tokenizer, TASKS)
    return [enc.encode(e) for e in examples]


def test_packed_equals_per_example(tokenizer, gen):
    model = _model(tokenizer)
    batch = _encode(tokenizer, _examples(gen))
    with torch.no_grad():
        packed = model(batch)
        alone = [model([ex]) for ex in batch]
    torch.testing.assert_close(packed.logits, torch.cat([a.logits for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.labels, torch.cat([a.labels for a in alone]))
    emb = model.embed(batch)
    torch.testing.assert_close(emb, torch.cat([model.embed([ex]) for ex in batch]), atol=1e-5, rtol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(batch)))


def test_the_encoder_stream_layout_and_its_gradients(tokenizer, gen):
    """Each example's stretch of the encoder stream: its task's row, then per segment the
    modality's opening boundary row, the segment's tokens (plus axial positions, text aside) and
    the closing boundary row; task and modality ids per row, cu_seqlens per example. The stream
    embeds each modality's segments together (one projection for all of them); values and every
    parameter's gradient (embedders, axial tables, task and boundary rows) equal those of each
    segment embedded on its own, with segments of one modality in several sizes."""
    from generalist.modalities import MODALITIES

    # float64, where summing a gradient's rows in another order changes nothing visible; eval: no
    # dropout, so two embeddings of a batch agree
    model = _model(tokenizer).double()
    t = torch.linspace(0, 0.4, 6400)
    more = [
        Example([("table", (torch.tensor([7, 1]), torch.tensor([0.25, 3.0]))),
                 ("image", torch.rand(5, 9, generator=gen)), ("audio", (torch.cos(2 * math.pi * 300 * t), 16000))],
                "a table of measurements", "classify"),
        Example([("video", torch.rand(2, 4, 12, generator=gen)), ("text", "a sheep"),
                 ("image", (torch.rand(6, 6, 3, generator=gen) * 255).to(torch.uint8))], "a sheep in a field", "vqa"),
    ]
    batch = _encode(tokenizer, _examples(gen) + more + _examples(gen)[:2])
    x, enc = model.embed_inputs(batch)
    rows, mods, tasks, lens = [], [], [], []
    for ex in batch:
        n = len(rows)
        rows.append(model.task_emb.weight[ex.task_id][None])
        mods.append(0)
        for modality, data in ex.segments:
            tok, pos = model.embedders[modality](data)
            if modality != "text":
                tok = tok + model.axial[modality](pos)
            mid = MODALITIES[modality]
            rows += [model.boundary[mid, 0][None], tok, model.boundary[mid, 1][None]]
            mods += [mid] * (tok.shape[0] + 2)
        lens.append(sum(r.shape[0] for r in rows[n:]))
        tasks += [ex.task_id] * lens[-1]
    want = torch.cat(rows)
    torch.testing.assert_close(x, want)
    assert enc.modality_ids.tolist() == mods and enc.task_ids.tolist() == tasks
    assert enc.cu_seqlens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)] and enc.max_seqlen == max(lens)
    g = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    params = [model.task_emb.weight, model.boundary, *model.embedders.parameters(), *model.axial.parameters()]
    for got, expected in zip(torch.autograd.grad((x * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(got, expected)


def test_a_bad_segment_is_named_by_example_and_position(tokenizer, gen):
    model = _model(tokenizer)
    batch = _encode(tokenizer, _examples(gen))
    batch[3].segments[0] = ("image", torch.rand(3, 0, 4))
    with pytest.raises(ValueError, match=r"example 3, segment 0 \(image\): image height 0 is empty"):
        model.embed_inputs(batch)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_kv_cache_decoding_equals_recompute(tokenizer, gen, beam_size):
    model = _model(tokenizer, seed=1)
    batch = _encode(tokenizer, _examples(gen))
    cached = generate(model, batch, max_new_tokens=12, beam_size=beam_size, use_cache=True)
    full = generate(model, batch, max_new_tokens=12, beam_size=beam_size, use_cache=False)
    assert cached == full
    assert all(tokenizer.token_id("<eos>") not in s for s in cached)
    assert generate(model, [], max_new_tokens=3, beam_size=beam_size) == []
    for ex in batch:  # one example alone, as `predict` decodes (a batch of one sequence in the kernels)
        assert generate(model, [ex], max_new_tokens=12, beam_size=beam_size, use_cache=True) == \
            generate(model, [ex], max_new_tokens=12, beam_size=beam_size, use_cache=False)


def test_beam_search_keeps_a_finished_hypothesis_that_later_beams_do_not_beat(tokenizer, gen):
    """A finished hypothesis pushed out of the beam by unfinished ones that then score less than
    it is still the answer (the sum of its tokens' log-probabilities is the highest): a decoder
    of fixed next-token probabilities, where "C eos" (0.1) loses its place at step 2 to the two
    children of "A A" (0.45 each), which end at 0.054."""
    model = _model(tokenizer)
    v, eos, (a, b, c) = model.cfg.vocab_size, model.cfg.eos_id, (10, 11, 12)

    def next_token(prefix):
        if not prefix:
            return {a: 0.9, c: 0.1}
        if prefix == [c]:
            return {eos: 1.0}
        if prefix == [a]:
            return {a: 1.0}
        return {a: 0.495, b: 0.495, eos: 0.01} if len(prefix) < 6 else {eos: 1.0}

    def decode(ids_T, dec, h, enc):
        cu = dec.cu_seqlens.tolist()
        logits = torch.full((ids_T.shape[0], v), -1e4)
        for start, end in zip(cu, cu[1:]):
            for token, p in next_token(ids_T[start + 1:end].tolist()).items():
                logits[end - 1, token] = math.log(p)
        return logits, []

    model.decode = decode
    batch = _encode(tokenizer, _examples(gen))[:2]
    assert generate(model, batch, max_new_tokens=8, beam_size=2, use_cache=False) == [[c], [c]]
    assert generate(model, batch, max_new_tokens=8, beam_size=1, use_cache=False) == [[a] * 6] * 2  # greedy


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_decoder_that_overflows_is_refused_not_answered_empty(tokenizer, gen, use_cache, beam_size):
    """Finite encoder, decoder logits NaN (its FFN weights scaled out of range): an error naming
    the examples, not a NaN argmax decoded as an empty answer."""
    from generalist.models.decoding import NonFiniteError

    model = _model(tokenizer)
    with torch.no_grad():
        for p in model.decoder[0].moe.parameters():
            if p.dim() >= 2:
                p.mul_(1e30)
    batch = _encode(tokenizer, _examples(gen))
    with pytest.raises(NonFiniteError, match=r"not finite for example\(s\) \[0, 1, 2, 3, 4\]"):
        generate(model, batch, max_new_tokens=4, beam_size=beam_size, use_cache=use_cache)


def test_generate_decodes_in_eval_mode_and_restores_the_mode(tokenizer, gen):
    """A model left in training mode (as a training loop leaves it) drops tokens at its MoE
    layers' capacity; generate decodes as in eval mode and hands the model back in training mode."""
    model = _model(tokenizer, seed=1, capacity_factor=0.25)
    batch = _encode(tokenizer, _examples(gen))
    want = generate(model, batch, max_new_tokens=10, beam_size=2)
    model.train()
    assert generate(model, batch, max_new_tokens=10, beam_size=2) == want
    assert generate(model, batch, max_new_tokens=10, beam_size=2, use_cache=False) == want
    assert model.training and all(m.training for m in model.modules())


def test_decoder_streams_longer_than_the_text_max_len(tokenizer, gen):
    """max_len bounds one text, not a packed stream: each decoding step embeds one token for each
    of the N = examples x beams rows, and training packs every target into one stream; both may
    exceed it. Bad target ids are still refused, by name."""
    model = _model(tokenizer, seed=1, modalities={"text": {"max_len": 16}})
    batch = _encode(tokenizer, _examples(gen))
    assert len(batch) * 4 > 16
    cached = generate(model, batch, max_new_tokens=4, beam_size=4, use_cache=True)
    assert cached == generate(model, batch, max_new_tokens=4, beam_size=4, use_cache=False)
    # training packs every example's target into one decoder stream: longer than max_len in all
    assert sum(len(ex.target_ids) + 1 for ex in batch) > 16 and torch.isfinite(model(batch).loss)
    batch[1].target_ids = torch.tensor([3, tokenizer.vocab_size])  # an id past the vocabulary
    with pytest.raises(ValueError, match=r"target token ids must be in \[0, 300\)"):
        model(batch)


def test_generate_stops_at_the_text_max_len_on_both_paths(tokenizer, gen):
    """One decoded sequence reads at most max_len tokens (bos and the tokens generated but the
    last), cached or recomputed: more new tokens than that is refused up front, by both paths
    alike (the cached one used to decode past every position training reaches)."""
    model = _model(tokenizer, seed=1, modalities={"text": {"max_len": 16}})
    batch = _encode(tokenizer, _examples(gen))[:2]
    assert generate(model, batch, max_new_tokens=16, use_cache=True) == \
        generate(model, batch, max_new_tokens=16, use_cache=False)  # max_len itself: both decode, alike
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="max_new_tokens is 17, but the decoder reads at most the text "
                                             "embedder's max_len of 16 tokens"):
            generate(model, batch, max_new_tokens=17, use_cache=use_cache)
    for kwargs, match in [(dict(beam_size=True), "beam_size must be an integer >= 1, got True"),
                          (dict(beam_size=0), "beam_size must be an integer >= 1, got 0"),
                          (dict(max_new_tokens=1.5), "max_new_tokens must be an integer >= 0, got 1.5"),
                          (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1")]:
        with pytest.raises(ValueError, match=match):
            generate(model, batch, **kwargs)


def test_cached_decoding_checks_cu_seqlens_values_once_not_per_step(tokenizer, gen, monkeypatch):
    """Reading cu_seqlens values is a device sync on a GPU: the decoding loop's per-step
    cross-attention reuses one cu_q, so the number of value checks does not grow with the steps."""
    import sys

    checks = sys.modules["generalist.ops._attention_checks"]
    model = _model(tokenizer, seed=1)
    batch = _encode(tokenizer, _examples(gen))
    read = []
    remember = checks.remember_checked
    monkeypatch.setattr(checks, "remember_checked", lambda x, key: read.append(key) or remember(x, key))
    counts = []
    for steps in (2, 10):
        read.clear()
        out = generate(model, batch, max_new_tokens=steps, beam_size=2)
        counts.append(len(read))
    assert max(len(s) for s in out) > 2  # the second run did take more steps
    assert counts[0] == counts[1] > 0


def test_checkpoint_round_trip_is_exact(tokenizer, gen, tmp_path):
    model = _model(tokenizer, seed=2, modalities={"image": {"patch": 4, "max_size": 32}, "table": {"n_columns": 8}})
    batch = _encode(tokenizer, _examples(gen))
    model.save(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = GeneralistModel.load(tmp_path / "ckpt").eval()
    assert GeneralistModel.load_tokenizer(tmp_path / "ckpt").encode("a small cat") == tokenizer.encode("a small cat")
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)
    assert loaded.cfg == model.cfg
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        GeneralistModel.load(tmp_path)
    path = tmp_path / "ckpt" / "tokenizer.json"
    path.write_text(path.read_text()[:100])  # a file cut short: named
    with pytest.raises(ValueError, match=r"ckpt/tokenizer.json: not a serialized tokenizer"):
        GeneralistModel.load_tokenizer(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weights_saved_in_another_dtype_load_in_it_exactly(tokenizer, dtype, tmp_path):
    model = _model(tokenizer, seed=3).to(dtype)
    with torch.no_grad():  # values a cast to fp32 and back would not keep (fp64)
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 1e-3)
    model.save(tmp_path / "ckpt")
    loaded = GeneralistModel.load(tmp_path / "ckpt")
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                     model.state_dict().values()))


def test_embeddings_are_unit_norm_in_fp32_under_autocast(tokenizer, gen):
    model = _model(tokenizer, seed=4)
    batch = _encode(tokenizer, _examples(gen))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.embed(batch)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(batch)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_instantiates(name):
    cfg = preset(name, vocab_size=1000, n_tasks=7)
    with torch.device("meta"):
        model = GeneralistModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0 and len(model.encoder) == cfg.enc_layers and len(model.decoder) == cfg.dec_layers
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge", vocab_size=1000)


def test_preset_modalities_are_merged_into_the_presets_own():
    """model.modalities changes the fields it names and keeps the preset's others (it replaced
    the whole dict, so an audio option silently dropped demo's image and video patches)."""
    cfg = preset("demo", vocab_size=1000, modalities={"audio": {"patch_time": 8}, "image": {"max_size": 32}})
    assert cfg.modalities == {"image": {"patch": 7, "max_size": 32}, "video": {"patch": 8, "tubelet_time": 8},
                              "audio": {"patch_time": 8}}
    assert preset("demo", vocab_size=1000, modalities={"image": None}).modalities["image"] is None  # left out
    assert preset("demo", vocab_size=1000, d_model=64).modalities == PRESETS["demo"]["modalities"]
    assert PRESETS["demo"]["modalities"]["image"] == {"patch": 7}  # the preset itself untouched


def test_answer_logprobs_checks_its_batch_size(tokenizer, gen):
    model = _model(tokenizer, seed=1).eval()
    example = _encode(tokenizer, _examples(gen))[0]
    targets = [torch.tensor(tokenizer.encode(t)) for t in ("a cat", "a dog", "three")]
    with torch.no_grad():
        whole = model.answer_logprobs(example, targets)
        torch.testing.assert_close(model.answer_logprobs(example, targets, batch_size=2), whole)
        assert model.answer_logprobs(example, []).shape == (0,)
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
                model.answer_logprobs(example, targets, batch_size=bad)


@pytest.mark.parametrize("segments,task,match", [
    ([("image", torch.rand(2, 8, 8))], "vqa", "channel"),
    ([("image", torch.rand(3, 9, 80))], "vqa", "width 80 exceeds max_size"),
    ([], "vqa", "no input segments"),
    ([("smell", torch.rand(3))], "vqa", "unknown modality 'smell'"),
    ([("image", torch.full((3, 8, 8), float("nan")))], "vqa", "(?i)nan"),
    ([("text", "hello")], "translate", "unknown task 'translate'"),
])
def test_bad_inputs_are_named(tokenizer, segments, task, match):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match=match):
        model(_encode(tokenizer, [Example(segments, "x", task)]))


def test_a_prepared_segment_of_another_config_is_named(tokenizer, gen):
    """A Prepared segment is checked against the embedder that reads it (it skips `prepare`):
    the same as raw data when it fits, named by example and segment when it does not."""
    from dataclasses import replace

    from generalist.modalities import Prepared
    from generalist.train.trainer import prepare_example

    model = _model(tokenizer)
    image = torch.rand(3, 8, 12, generator=gen)
    [enc] = _encode(tokenizer, [Example([("image", image), ("text", "what is shown here")], "a small cat", "vqa")])
    ready, _ = prepare_example(model, enc)
    torch.testing.assert_close(model([ready]).loss, model([enc]).loss)

    patches, positions = model.embedders["image"].prepare(image)
    ids = enc.segments[1][1]
    other = _model(tokenizer, modalities={"image": {"patch": 2}})
    for segment, match in (
            (("image", Prepared(*other.embedders["image"].prepare(image))),
             r"example 0, segment 0 \(image\): Prepared image features have shape \(24, 12\), but this model's image "
             r"embedder takes \(L, 48\)"),
            (("image", Prepared(patches, positions + torch.tensor([0, 50, 0]))), "Prepared positions reach"),
            (("image", Prepared(patches, positions[:, :2])), r"positions must be an int tensor \(L, 3\)"),
            (("image", Prepared(patches[:-1], positions)), "features must be tensors of 6 rows"),
            (("text", Prepared(ids + 10_000, torch.zeros(len(ids), 3, dtype=torch.long))),
             r"Prepared token ids must be integers in \[0, 300\)"),
            (("text", Prepared(ids.to(torch.int16), torch.zeros(len(ids), 3, dtype=torch.long))),
             r"Prepared token ids must be int64 \(or int32\), got torch.int16")):
        with pytest.raises(ValueError, match=match):
            model([replace(enc, segments=[segment])])


def test_tiny_model_overfits_a_mixed_batch(tokenizer, gen):
    model = _model(tokenizer, seed=3).train()
    batch = _encode(tokenizer, _examples(gen))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.lm_loss.item()
    assert out.lm_loss.item() < 0.1 * first, (first, out.lm_loss.item())
    model.eval()
    assert generate(model, batch, max_new_tokens=16) == [ex.target_ids.tolist() for ex in batch]


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_and_trains(tokenizer, gen):
    """On a GPU (kernels chosen by "auto"): the packed forward under bf16 autocast agrees with
    the fp32 CPU model, and a few bf16 training steps overfit the batch."""
    cpu = _model(tokenizer, seed=3)
    cuda = _model(tokenizer, seed=3).cuda()
    batch = _encode(tokenizer, _examples(gen))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = cuda(batch)
    with torch.no_grad():
        want = cpu(batch)
    assert got.logits.isfinite().all()
    err = (got.logits.float().cpu() - want.logits).norm() / want.logits.norm()
    assert err < 3e-2, err
    cuda.train()
    opt = torch.optim.AdamW(cuda.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(100):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = cuda(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.lm_loss.item()
    assert out.lm_loss.item() < 0.2 * first, (first, out.lm_loss.item())


def test_lm_loss_weighs_each_example_once(tokenizer, gen):
    """lm_loss is the mean over examples of each target's mean token loss, so packing a long
    target with a short one gives the average of their separate losses."""
    model = _model(tokenizer)
    batch = _encode(tokenizer, _examples(gen))
    with torch.no_grad():
        packed = model(batch).lm_loss
        alone = torch.stack([model([ex]).lm_loss for ex in batch])
    torch.testing.assert_close(packed, alone.mean(), atol=1e-5, rtol=1e-5)


def test_an_empty_batch_runs_every_block_on_no_tokens(tokenizer):
    """What a data-parallel rank with nothing to do runs: zero losses, yet a graph through every
    encoder and decoder block (its backward must meet the other ranks' in every MoE layer)."""
    model = _model(tokenizer).train()
    out = model([])
    assert out.logits.shape == (0, tokenizer.vocab_size) and out.labels.shape == (0,) and out.n_input_tokens == 0
    assert out.loss.item() == out.lm_loss.item() == out.aux_loss.item() == 0.0
    assert len(out.moe_stats) == len(model.encoder) + len(model.decoder)
    assert all(int(s.counts_by_task.sum()) == 0 for s in out.moe_stats)
    emb = model.embed([])
    assert emb.shape == (0, model.cfg.embed_dim)
    (out.loss + emb.sum()).backward()
    for blocks in (model.encoder, model.decoder):
        for block in blocks:
            assert block.moe.w1_EDF.grad is not None and block.moe.router.weight.grad is not None
            assert not block.moe.w1_EDF.grad.any()


def test_save_writes_a_given_state_dict(tokenizer, tmp_path):
    model, other = _model(tokenizer, seed=0), _model(tokenizer, seed=1)
    model.save(tmp_path / "ckpt", tokenizer=tokenizer, state_dict=other.state_dict())
    loaded = GeneralistModel.load(tmp_path / "ckpt")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="state_dict keys differ"):
        model.save(tmp_path / "bad", state_dict={k: v for k, v in other.state_dict().items() if "decoder" not in k})


def test_loads_a_checkpoint_with_the_older_scalar_logit_scale(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(tokenizer)
    model.save(tmp_path / "ckpt", tokenizer=tokenizer)
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    weights["logit_scale"] = torch.tensor(1.5)  # shape () as saved before it became (1,)
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    loaded = GeneralistModel.load(tmp_path / "ckpt")
    assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == 1.5


@pytest.mark.gpu
def test_cuda_inference_loads_on_the_gpu_in_bf16(tokenizer, gen, tmp_path):
    """Generalist.load puts a saved model on the GPU by default and runs it under bf16 autocast:
    it generates with and without the KV cache, and its embeddings are the fp32 CPU model's to
    bf16 accuracy."""
    from generalist.data.packing import Example
    from generalist.infer.generalist import Generalist

    _model(tokenizer, seed=5).save(tmp_path, tokenizer)
    (tmp_path / "meta.json").write_text(json.dumps({"tasks": TASKS}))
    g = Generalist.load(tmp_path)
    cpu = Generalist.load(tmp_path, device="cpu")
    assert g.model.boundary.device.type == "cuda" and cpu.model.boundary.device.type == "cpu"
    examples = [Example(ex.segments, "", ex.task) for ex in _examples(gen)]
    encoded = [g.encoder.encode(e) for e in examples]
    with torch.no_grad(), g._precision():
        for use_cache in (True, False):  # (bf16 ties may pick other tokens: the lengths only)
            ids = generate(g.model, encoded, max_new_tokens=8, use_cache=use_cache)
            assert len(ids) == len(examples) and all(len(i) <= 8 for i in ids)
    assert all(isinstance(a, str) for a in g.generate(examples))
    emb, want = g.embed(examples), cpu.embed(examples)
    assert emb.device.type == "cuda" and emb.dtype == torch.float32
    assert (emb.cpu() * want).sum(-1).min() > 0.99  # unit vectors: cosine


def test_a_training_step_reads_no_stream_tensor_back(tokenizer, gen):
    """The stream tensors the model builds (cu_seqlens, task and modality ids) come from values it
    checked on the host, so the ops' and layers' value checks, a device sync each on a GPU, do
    not read them back: no tolist/item from generalist/ops or generalist/modules in a training
    step with the checks on."""
    import traceback

    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "item"):
                frames = [f.filename for f in traceback.extract_stack()[:-1]]
                if any(("generalist/ops/" in f or "generalist/modules/" in f) for f in frames):
                    self.seen.append(frames[-1])
            return func(*args, **(kwargs or {}))

    model = _model(tokenizer).train()
    batch = _encode(tokenizer, _examples(gen))
    with Reads() as reads:
        model(batch).loss.backward()
    assert reads.seen == []


def _compiled_twin(model):
    import copy

    twin = copy.deepcopy(model).compile_blocks()
    assert list(twin.state_dict()) == list(model.state_dict())  # checkpoints are unchanged
    return twin


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_train_like_eager_and_compile_once_per_stream(tokenizer, gen):
    """`compile_blocks` (inductor, dynamic shapes): the loss and every parameter's gradient equal
    eager ones on batches of different sizes and modalities, and the second batch compiles nothing
    new: one graph for the encoder blocks, one for the decoder blocks. (Inductor's own defaults gave
    the MoE input a wrong gradient here, 100% off; BLOCK_COMPILE turns that pass off.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _model(tokenizer).train()
    compiled = _compiled_twin(eager)
    examples = _examples(gen)
    for batch in (_encode(tokenizer, examples), _encode(tokenizer, examples[1:4] + examples[:2])):
        (want_loss, want), (got_loss, got) = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert got.keys() == want.keys() and {n for n, _ in eager.named_parameters() if 'coder.' in n} <= want.keys()
        for name in want:
            scale = want[name].abs().max().item()
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)
    # a deep copy of the compiled model runs its own weights through the same graphs
    import copy

    copies = copy.deepcopy(compiled), copy.deepcopy(eager)
    w = torch.randn(copies[0].encoder[0].attn.wo.weight.shape, generator=gen)
    with torch.no_grad():
        for m in copies:
            m.encoder[0].attn.wo.weight.copy_(w)
    (copy_loss, _), (copy_eager_loss, _) = (_loss_and_grads(m, batch) for m in copies)
    torch.testing.assert_close(copy_loss, copy_eager_loss, rtol=1e-5, atol=1e-6)
    assert abs(copy_loss.item() - got_loss.item()) > 1e-3  # (the copy changed: loss near log V at init)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.gpu
def test_cuda_compiled_blocks_match_eager_under_bf16(tokenizer, gen):
    """The compiled blocks on a GPU (the Triton kernels inside the graphs) under bf16 autocast:
    the loss and the gradients agree with the eager model's to bf16 accuracy, and two batches
    compile one graph per stream."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _model(tokenizer, seed=5).cuda().train()
    compiled = _compiled_twin(eager)
    examples = _examples(gen)
    for batch in (_encode(tokenizer, examples), _encode(tokenizer, examples[2:] + examples[:1])):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (want_loss, want), (got_loss, got) = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        assert abs(got_loss.item() - want_loss.item()) < 2e-2 * abs(want_loss.item())
        for name in want:
            err = (got[name].float() - want[name].float()).norm() / want[name].float().norm().clamp_min(1e-12)
            assert err < 5e-2, (name, err.item())
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.parametrize("over,message", [
    (dict(d_model=1024, n_heads=2), "the head dim d_model / n_heads = 512 must be in [2, 256]"),
    (dict(d_model=4, n_heads=4, n_kv_heads=1), "the head dim d_model / n_heads = 1 must be in [2, 256]"),  # no rotary
    (dict(top_k=5), "MoEConfig.top_k must be in [1, n_routed=4], got 5"),
    (dict(n_shared=0, n_routed=0), "needs at least one expert"),
    (dict(capacity_factor=0.0), "capacity_factor must be None or a positive number"),
    (dict(aux_loss_weight=-1.0), "aux_loss_weight must be >= 0"),
    (dict(attention_backend="nope"), "attention: unknown backend 'nope'"),
])
def test_the_model_config_refuses_what_its_first_forward_would(over, message):
    """Settings the layers or kernels cannot run are refused when the config is made (a
    checkpoint's config.json names itself), not at the first forward."""
    from generalist.models.config import GeneralistConfig

    with pytest.raises(ValueError) as error:
        GeneralistConfig(vocab_size=300, **over)
    assert str(error.value).startswith("model config: ") and message in str(error.value)
