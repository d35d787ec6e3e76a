"""The generation engine: greedy ≡ model.generate, batch ≡ one by one, preallocated cache ≡ dynamic cache,
stop strings, EOS, length limits, streaming, sampling, and clear errors."""

import pytest
import torch
from PIL import Image
from transformers.cache_utils import DynamicCache

from helpers import tiny_config
from minimind_v import MiniMindVLM
from minimind_v.data.processing import chat_prompt
from minimind_v.generation import Engine, GenerationRequest, RequestError, SamplingParams
from minimind_v.generation.kv_cache import PreallocatedCache


@pytest.fixture(scope="module")
def engine(clip_dir, tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(vocab_size=len(tokenizer)), vision_model_path=clip_dir).eval()
    return Engine(model, tokenizer)


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())


def ask(text: str, images=(), **params) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "<image>" * len(images) + text}],
                             images=list(images), params=SamplingParams(**{"max_new_tokens": 12, **params}))


def test_greedy_equals_model_generate(engine, tokenizer):
    request = ask("describe", [image(1)])
    result = engine.generate([request])[0]
    text = chat_prompt(tokenizer, engine.model.config, request.messages)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    pixels = engine.model.image2tensor(request.images[0], engine.model.processor)[None]  # [1, 1, 3, H, W]
    reference = engine.model.generate(ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = [t for t in reference[0, ids.shape[1]:].tolist() if t != tokenizer.pad_token_id]
    if expected and expected[-1] == tokenizer.eos_token_id:
        expected = expected[:-1]
    assert result.token_ids == expected and result.prompt_tokens == ids.shape[1]


def test_batch_with_different_lengths_and_image_counts_equals_one_by_one(engine):
    requests = [ask("hi", []), ask("what is in these two pictures, please?", [image(2), image(3)]),
                ask("and this one", [image(4)], max_new_tokens=5)]
    batched = engine.generate(requests)
    for request, result in zip(requests, batched):
        alone = engine.generate([request])[0]
        assert result.token_ids == alone.token_ids and result.text == alone.text
    assert len(batched[2].token_ids) <= 5


def test_preallocated_cache_gives_the_dynamic_cache_logits(engine, tokenizer):
    model = engine.model
    ids = tokenizer("hello there, world", return_tensors="pt")["input_ids"]
    logits = {}
    for name, cache in (("dynamic", DynamicCache(config=model.config)),
                        ("preallocated", PreallocatedCache(model.config.num_hidden_layers, ids.shape[1] + 4))):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in (5, 6, 7, 8):
            steps.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[:, -1])
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["preallocated"], logits["dynamic"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 3 positions"):
        model(input_ids=ids[:, :4], past_key_values=PreallocatedCache(2, 3), use_cache=True)


def test_stop_string_length_and_eos(engine):
    free = engine.generate([ask("go", max_new_tokens=12)])[0]
    assert free.finish_reason == "length" and free.completion_tokens == 12
    stop = free.text[4:6]
    assert stop.strip("\ufffd") == stop and len(stop) == 2, "the tiny model's text should allow a 2-char stop"
    stopped = engine.generate([ask("go", max_new_tokens=12, stop=[stop])])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.find(stop)]
    eos = free.token_ids[3]
    engine.eos_ids.add(eos)
    try:
        ended = engine.generate([ask("go", max_new_tokens=12)])[0]
    finally:
        engine.eos_ids.discard(eos)
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:free.token_ids.index(eos)]
    engine.eos_ids.add(eos)
    try:  # a benchmark's request decodes to its limit whatever the model says
        ignored = engine.generate([ask("go", max_new_tokens=12, ignore_eos=True)])[0]
    finally:
        engine.eos_ids.discard(eos)
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids


def test_a_request_is_tokenized_once(engine, monkeypatch):
    """The server checks a request (encode) before it queues it; decoding it then does not tokenize it again."""
    request, calls = ask("count me"), []
    real = type(engine.tokenizer).__call__
    monkeypatch.setattr(type(engine.tokenizer), "__call__",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    ids = engine.encode(request)
    result = engine.generate([request])[0]
    assert len(calls) == 1 and request.prompt_ids is ids and result.prompt_tokens == len(ids)


def test_stream_deltas_add_up_and_never_show_a_stop_string(engine):
    free = engine.generate([ask("stream", max_new_tokens=16)])[0]
    stop = free.text[6:8]
    requests = [ask("stream", max_new_tokens=16), ask("stream", max_new_tokens=16, stop=[stop])]
    texts, finals = ["", ""], [None, None]
    for delta in engine.stream(requests):
        texts[delta.index] += delta.text
        assert stop not in texts[1]
        if delta.result is not None:
            finals[delta.index] = delta.result
    assert texts[0] == finals[0].text == free.text
    assert texts[1] == finals[1].text == free.text[:free.text.find(stop)]


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine):
    greedy = engine.generate([ask("x")])[0].token_ids
    sample = lambda **kw: engine.generate([ask("x", temperature=1.5, **kw)])[0].token_ids  # noqa: E731
    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(seed=3, top_k=1) == greedy
    assert sample(seed=4, top_p=1e-6) == greedy  # nucleus of one token
    penalised = engine.generate([ask("x", repetition_penalty=5.0, max_new_tokens=12)])[0].token_ids
    assert len(set(penalised)) >= len(set(greedy))


def test_bad_requests_are_clear_errors(engine, tokenizer):
    with pytest.raises(RequestError, match="1 <image> marker"):
        engine.generate([GenerationRequest(messages=[{"role": "user", "content": "<image> two?"}],
                                           images=[image(1), image(2)])])
    with pytest.raises(RequestError, match="context is 512 tokens"):
        engine.generate([ask("y" * 600)])
    with pytest.raises(RequestError, match="turned 0 <image> marker.* into 1 placeholder ids"):
        engine.generate([ask("mail me @ home")])  # a typed placeholder character would shift the image splice
    with pytest.raises(RequestError, match="either chat messages or a raw text"):
        engine.generate([GenerationRequest()])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    textonly = Engine(MiniMindVLM(tiny_config(vocab_size=len(tokenizer))).eval(), tokenizer)
    with pytest.raises(RequestError, match="no vision tower"):
        textonly.generate([ask("look", [image(1)])])


def test_raw_text_prompt_and_near_the_context_end(engine):
    result = engine.generate([GenerationRequest(text="<image>the picture shows", images=[image(5)],
                                                params=SamplingParams(max_new_tokens=4))])[0]
    assert result.completion_tokens == 4
    long = engine.generate([ask("z" * 480, max_new_tokens=100)])[0]  # only the context's remainder is generated
    assert long.finish_reason in ("length", "stop") and long.prompt_tokens + long.completion_tokens <= 512


def test_the_guides_helper_functions(engine, tokenizer):
    from minimind_v.generation.helpers import batch_multimodal_inference, multimodal_generate

    model, images = engine.model, [image(6), image(7), image(8)]
    texts = ["describe:", "what is this picture about:", "content:"]
    batched = batch_multimodal_inference(model, tokenizer, texts, images, batch_size=4)
    assert batched == batch_multimodal_inference(model, tokenizer, texts, images, batch_size=1)
    first = engine.generate([GenerationRequest(text=texts[1] + "<image>", images=[images[1]],
                                               params=SamplingParams(max_new_tokens=1))])[0]
    assert (first.token_ids or [next(iter(engine.eos_ids))])[0] == batched[1]  # the engine's first greedy token
    sampled = multimodal_generate(model, tokenizer, "this shows", images[0], max_length=8, temperature=0.7,
                                  top_k=40, seed=3)
    assert sampled == multimodal_generate(model, tokenizer, "this shows", images[0], max_length=8,
                                          temperature=0.7, top_k=40, seed=3)
    greedy = engine.generate([GenerationRequest(text="this shows<image>", images=[images[0]],
                                                params=SamplingParams(max_new_tokens=8))])[0].text
    assert multimodal_generate(model, tokenizer, "this shows", images[0], max_length=8, top_k=1) == greedy
    with pytest.raises(ValueError, match="one image per text"):
        batch_multimodal_inference(model, tokenizer, texts, images[:2])


def test_a_stream_can_be_resumed_on_another_thread(engine):
    """Web servers resume a streaming generator on whichever worker thread is free."""
    import threading

    request = ask("threads", [image(9)], max_new_tokens=10)
    expected = engine.generate([request])[0].text
    stream, pieces = engine.stream([request]), []

    def take(count):
        for _ in range(count):
            delta = next(stream, None)
            if delta is not None:
                pieces.append(delta.text)

    for _ in range(12):  # one delta per thread
        worker = threading.Thread(target=take, args=(1,))
        worker.start()
        worker.join()
    take(20)
    assert "".join(pieces) == expected


def test_static_decode_steps_equal_the_dynamic_cache(engine):
    """The fixed-shape step that CUDA graphs replay (run eagerly on the CPU): same tokens for a padded batch with
    images, and the decoder is reused for the next generation of the same shape."""
    from minimind_v.generation.static_decode import DecoderPool

    requests = [ask("hi", []), ask("what is in these two pictures, please?", [image(2), image(3)]),
                ask("and this one", [image(4)], max_new_tokens=5)]
    dynamic = engine.generate(requests)
    static = Engine(engine.model, engine.tokenizer)
    static.decoders = DecoderPool()
    for _ in range(2):
        assert [r.token_ids for r in static.generate(requests)] == [r.token_ids for r in dynamic]
    assert len(static.decoders.decoders) == 1


def test_chained_greedy_steps_equal_single_steps(engine, monkeypatch):
    """A chain of greedy fixed-shape steps in one call (what one CUDA graph replays on a GPU, run eagerly here)
    gives the tokens of single steps: padded rows with images, different limits, a stop string, streamed deltas
    that add up to the text; a sampled row in the batch decodes step by step (its own generator) and a chain that
    would leave the buffer is refused."""
    from minimind_v.generation.static_decode import DecoderPool, StaticDecoder

    counts, chain = [], StaticDecoder._chain
    monkeypatch.setattr(StaticDecoder, "_chain", lambda self, count: counts.append(count) or chain(self, count))
    requests = [ask("hi", [], max_new_tokens=21), ask("two pictures, please", [image(2), image(3)], max_new_tokens=5),
                ask("and this one", [image(4)], max_new_tokens=13)]
    single = engine.generate(requests)
    stop = single[0].text[3:5]
    requests.append(ask("hi", [], max_new_tokens=21, stop=[stop]))
    single.append(engine.generate(requests[-1:])[0])
    chained = Engine(engine.model, engine.tokenizer, chain=8)
    chained.decoders = DecoderPool()
    texts = [""] * len(requests)
    for delta in chained.stream(requests):
        texts[delta.index] += delta.text
        if delta.result is not None:
            got, want = delta.result, single[delta.index]
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert texts == [r.text for r in single] and single[-1].finish_reason == "stop"
    assert counts == [8, 8, 4]  # 21 tokens: the prefill's, 8 + 8 + 4 chained
    decoder = next(iter(chained.decoders.decoders.values()))
    assert sorted(decoder.chains) == [] and decoder.use_graph is False  # eager: no graphs recorded on a CPU
    sampled = requests[:2] + [ask("hi", [], max_new_tokens=9, temperature=1.0, seed=3)]
    assert [r.token_ids for r in chained.generate(sampled)] == [r.token_ids for r in engine.generate(sampled)]
    assert counts == [8, 8, 4]  # no chain with a sampled row
    with pytest.raises(ValueError, match="leaves the"):
        decoder.chain(torch.zeros(decoder.feed.shape, dtype=torch.long), decoder.max_len - 4, 8)


def test_a_chain_ends_rows_at_eos_and_cancels_at_its_end(engine, monkeypatch):
    """A row whose EOS comes inside a chain ends there (the chain's later tokens dropped), as with single steps;
    a request cancelled while it decodes ends at the end of the running chain, with the text released so far."""
    import threading

    from minimind_v.generation.static_decode import DecoderPool

    chained = Engine(engine.model, engine.tokenizer, chain=8)
    chained.decoders = DecoderPool()
    cancelled = [ask("hi", [], max_new_tokens=40, ignore_eos=True)]
    cancelled[0].cancel = threading.Event()
    for delta in chained.stream(cancelled):
        cancelled[0].cancel.set()  # at the first text
        if delta.result is not None:
            result = delta.result
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 40
    assert (len(result.token_ids) - 1) % 8 == 0  # the prefill's token, then whole chains
    requests = [ask("hi", [], max_new_tokens=20), ask("a picture", [image(5)], max_new_tokens=20)]
    eos = engine.generate(requests)[0].token_ids[5]  # row 0 meets it at its sixth token: inside the first chain
    monkeypatch.setattr(engine, "eos_ids", engine.eos_ids | {eos})
    monkeypatch.setattr(chained, "eos_ids", engine.eos_ids)
    single, got = engine.generate(requests), chained.generate(requests)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in single]
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 5


def test_compiled_cpu_decoding_equals_eager_decoding(engine):
    """On a CPU `compile=True` decodes through the compiled fixed-shape step (weights frozen into it); at batch 1
    every matrix product of the step (7 per layer and the LM head) becomes Inductor's fused multiply-and-sum."""
    from torch._dynamo.utils import counters

    compiled = Engine(engine.model, engine.tokenizer, compile=True)
    assert compiled.decoders is not None and Engine(engine.model, engine.tokenizer).decoders is None
    requests = [ask("hi", [], max_new_tokens=12), ask("two pictures", [image(2), image(3)], max_new_tokens=12)]
    assert [r.token_ids for r in compiled.generate(requests)] == [r.token_ids for r in engine.generate(requests)]
    counters.clear()
    one = [ask("one picture", [image(4)], max_new_tokens=12)]
    assert [r.token_ids for r in compiled.generate(one)] == [r.token_ids for r in engine.generate(one)]
    assert counters["inductor"]["decompose_mm"] == 7 * engine.model.config.num_hidden_layers + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoding_equals_eager_decoding(engine, compile):
    model = engine.model.to("cuda")
    try:
        graphs = Engine(model, engine.tokenizer, compile=compile)
        eager = Engine(model, engine.tokenizer, cuda_graphs=False)
        assert graphs.decoders is not None and eager.decoders is None
        requests = [ask("hi", [], max_new_tokens=20), ask("two pictures", [image(2), image(3)], max_new_tokens=20)]
        for _ in range(2):  # captured on the first call, replayed on the second
            assert [r.token_ids for r in graphs.generate(requests)] == [r.token_ids for r in eager.generate(requests)]
    finally:
        engine.model.to("cpu")


def test_incremental_text_equals_decoding_the_whole_answer(engine, tokenizer):
    """Sampled bytes include broken and split UTF-8: the text built a window at a time (and the stream deltas)
    equal one decode of all the tokens."""
    requests = [ask(f"say something {i}", max_new_tokens=40, temperature=1.5, seed=i) for i in range(6)]
    streamed = [""] * len(requests)
    results = [None] * len(requests)
    for delta in engine.stream(requests):
        streamed[delta.index] += delta.text
        if delta.result is not None:
            results[delta.index] = delta.result
    assert any("\ufffd" in r.text for r in results)  # the case this is about did occur
    for text, result in zip(streamed, results):
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("which", ["tests", "default"])
def test_the_fast_text_decoder_gives_the_tokenizers_text(tokenizer, which):
    """Rows decode through the tokenizer's Rust backend: the same text as tokenizer.decode, special tokens,
    broken UTF-8 and all."""
    from minimind_v.data.tokenizer import load_tokenizer
    from minimind_v.generation.rows import text_decoder

    tok = tokenizer if which == "tests" else load_tokenizer(None)
    decode = text_decoder(tok)
    assert decode != tok.decode  # the backend's, not the wrapper
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 12, (1,), generator=generator)),),
                            generator=generator).tolist()
        for skip in (True, False):
            assert decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), ids


def test_gpu_steps_are_frozen_and_their_kernels_tuned():
    """A GPU step is compiled with its weights frozen in and each kernel's launch shape tuned (a one-row step is a
    chain of tiny kernels); the CPU keeps its own options, without the tuning."""
    from torch._inductor import config

    from minimind_v.generation.static_decode import step_options

    with step_options(torch.device("cuda"))():
        assert config.freezing and config.coordinate_descent_tuning
    with step_options(torch.device("cpu"))():
        assert config.freezing and not config.coordinate_descent_tuning
    assert not config.coordinate_descent_tuning
