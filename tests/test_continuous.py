"""Continuous batching: requests that join and leave a running batch at any step answer exactly as each alone
(greedy), on the MiniMind backbone (step by step, fixed-shape steps, a mixture of experts) and on Hugging Face
backbones; slots are freed at once and reused; KV memory is one pool allocated once."""

import threading

import pytest
import torch
from PIL import Image

from helpers import tiny_config
from minimind_v import MiniMindVLM
from minimind_v.build import new_model
from minimind_v.generation import Engine, GenerationRequest, RequestError, SamplingParams
from minimind_v.generation.scheduler import ContinuousBatch
from minimind_v.generation.slots import SlotPool
from test_backbone import save_backbone

COLORS = [(220, 30, 30), (30, 200, 40), (20, 60, 230)]


def requests() -> list[GenerationRequest]:
    """Prompts of different lengths, with and without images, different limits, a stop string, a sampled one."""
    out = []
    for i in range(7):
        images = [Image.new("RGB", (40 + 9 * i, 30), COLORS[i % 3])] if i % 2 == 0 else []
        text = "<image>" * len(images) + "tell me about it " * (i % 3 + 1)
        params = SamplingParams(max_new_tokens=5 + 3 * i, stop=["zz"] if i == 3 else [],
                                temperature=0.8 if i == 5 else 0.0, seed=7 if i == 5 else None)
        out.append(GenerationRequest(messages=[{"role": "user", "content": text}], images=images, params=params))
    return out


def interleaved(batch: ContinuousBatch, todo: list[GenerationRequest], arrivals: list[int]) -> dict:
    """Admit todo[k] before step arrivals[k] (when a slot is free), stepping until all are done: index -> result."""
    results, queue, step = {}, list(enumerate(todo)), 0
    while queue or batch.active:
        while queue and arrivals[queue[0][0]] <= step and batch.free:
            index, request = queue.pop(0)
            results.update({k: d.result for k, d in batch.admit([(index, request, None)]) if d.result})
        results.update({k: d.result for k, d in batch.step() if d.result})
        step += 1
    return results


def alone(engine: Engine) -> list:
    return [engine.generate([r])[0] for r in requests()]


@pytest.fixture(scope="module", params=["dense", "moe"])
def engine(request, clip_dir, tokenizer):
    torch.manual_seed(0)
    extra = dict(use_moe=True, n_routed_experts=4, num_experts_per_token=2) if request.param == "moe" else {}
    model = MiniMindVLM(tiny_config(vocab_size=len(tokenizer), **extra), vision_model_path=clip_dir)
    return Engine(model, tokenizer)


@pytest.mark.parametrize("fixed, overlap", [(False, False), (True, False), (False, True), (True, True)])
def test_interleaved_arrivals_answer_as_each_request_alone(engine, fixed, overlap):
    expected = alone(engine)
    batch = ContinuousBatch(engine, slots=3, overlap=overlap)  # overlapped: one step launched ahead (GPU default)
    if fixed:  # the fixed-shape step (a CUDA graph on a GPU), here without a graph
        batch.pool = SlotPool(engine.model, 3, batch.max_len, fixed=True)
    got = interleaved(batch, requests(), arrivals=[0, 0, 2, 3, 3, 9, 10])
    for i, result in enumerate(expected):
        assert got[i].token_ids == result.token_ids, i
        assert got[i].text == result.text and got[i].finish_reason == result.finish_reason
    assert batch.active == 0 and batch.free == 3
    assert batch.pool.keys[0].shape[:1] == (3,)  # one pool of 3 slots, whatever ran


def test_an_overlapped_step_hands_over_the_previous_steps_tokens(engine):
    """Launched ahead: a step's deltas come one call later; a row that ended (EOS, stop string) in the step handed
    over was already in the next one, whose token for it is dropped; greedy rows stay on the device."""
    todo = [GenerationRequest(text="tell me", params=SamplingParams(max_new_tokens=6, ignore_eos=True)),
            GenerationRequest(text="tell me more", params=SamplingParams(max_new_tokens=3, ignore_eos=True))]
    expected = [engine.generate([r])[0] for r in todo]
    batch = ContinuousBatch(engine, slots=2, overlap=True)
    first = batch.admit([(0, todo[0], None), (1, todo[1], None)])
    assert batch.step() == [] and batch.inflight is not None  # step 1 in flight, nothing handed over yet
    calls, results = 1, {k: d.result for k, d in first if d.result}
    while batch.active:
        results.update({k: d.result for k, d in batch.step() if d.result})
        calls += 1
    assert [results[i].token_ids for i in range(2)] == [r.token_ids for r in expected]
    assert calls == 6 and batch.inflight is None  # 5 steps for the longer row, plus the call that handed over the last


@pytest.mark.parametrize("overlap", [False, True])
def test_a_row_that_needs_its_logits_on_the_host_makes_the_batch_step_in_lockstep(engine, overlap):
    def todo():
        out = requests()
        out[2].params = SamplingParams(max_new_tokens=9, repetition_penalty=1.3)
        return out

    expected = [engine.generate([r])[0] for r in todo()]
    got = interleaved(ContinuousBatch(engine, slots=4, overlap=overlap), todo(), arrivals=[0, 0, 3, 4, 4, 8, 12])
    assert [got[i].token_ids for i in range(7)] == [r.token_ids for r in expected]


def test_everything_at_once_and_one_by_one_give_the_same_answers(engine):
    batch = ContinuousBatch(engine, slots=8)
    together = interleaved(batch, requests(), arrivals=[0] * 7)
    one_slot = interleaved(ContinuousBatch(engine, slots=1), requests(), arrivals=[0] * 7)
    assert [together[i].token_ids for i in range(7)] == [one_slot[i].token_ids for i in range(7)]


def test_a_cancelled_request_frees_its_slot_at_the_next_step(engine):
    batch = ContinuousBatch(engine, slots=2, overlap=False)
    todo = requests()
    for r in todo[:2]:
        r.params.max_new_tokens = 40
        r.cancel = threading.Event()
    released = [d.text for i in range(2) for k, d in batch.admit([(i, todo[i], None)]) if k == 0]
    released += [d.text for k, d in batch.step() if k == 0]
    assert batch.free == 0 and batch.expire() == []
    todo[0].cancel.set()
    ((key, delta),) = batch.expire()
    assert key == 0 and delta.result.finish_reason == "cancelled" and batch.free == 1
    assert delta.result.text == "".join(released) and len(delta.result.token_ids) == 2
    batch.admit([(2, todo[2], None)])  # the freed slot takes the next request
    assert batch.free == 0 and {k for k, _ in batch.step()} <= {1, 2}


def test_a_deadline_ends_a_running_request_as_timeout(engine):
    batch = ContinuousBatch(engine, slots=2)
    request = requests()[1]
    request.params.max_new_tokens = 40
    batch.admit([("late", request, 100.0)])
    batch.step()
    assert batch.expire(now=99.0) == []
    ((key, delta),) = batch.expire(now=100.0)
    assert key == "late" and delta.result.finish_reason == "timeout" and batch.free == 2


def test_a_prompt_that_does_not_fit_a_slot_is_refused(engine):
    batch = ContinuousBatch(engine, slots=2, max_len=24)
    with pytest.raises(RequestError, match="at most 24 tokens per request"):
        batch.check(GenerationRequest(text="a very long prompt " * 20))
    short = GenerationRequest(text="hi", params=SamplingParams(max_new_tokens=500))
    ((_, delta),) = [x for x in interleaved(batch, [short], [0]).items()]
    assert delta.finish_reason == "length" and len(short.prompt_ids) + delta.completion_tokens <= 24


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_hugging_face_backbones_batch_continuously(kind, clip_dir, tmp_path):
    llm = save_backbone(tmp_path / kind, kind)
    model, tokenizer = new_model("tiny", llm=llm, vision=clip_dir,
                                 overrides={"ve_hidden_size": 32, "image_token_len": 16}, seed=0)
    engine = Engine(model.eval(), tokenizer)
    expected = alone(engine)
    for fixed in (False, True):  # step by step, and the fixed-shape step a GPU captures as a CUDA graph
        batch = ContinuousBatch(engine, slots=3)
        batch.pool = SlotPool(engine.model, 3, batch.max_len, fixed=fixed)
        got = interleaved(batch, requests(), arrivals=[0, 1, 1, 2, 5, 5, 6])
        assert [got[i].token_ids for i in range(7)] == [r.token_ids for r in expected], fixed


def test_sampled_rows_are_warped_together_as_transformers_warps_each():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from minimind_v.generation.sampling import batchable, draw_batch, warp_batch

    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3  # [n, V]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
              ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 40, 0.5), (2.0, 1, 1.0), (1.0, 0, 0.05))]
    warped = warp_batch(logits, params)
    for row, p in zip(range(6), params):
        expected = TemperatureLogitsWarper(p.temperature)(None, logits[row:row + 1])
        if p.top_k:
            expected = TopKLogitsWarper(p.top_k)(None, expected)
        if p.top_p < 1:
            expected = TopPLogitsWarper(p.top_p)(None, expected)
        assert torch.equal(torch.isinf(warped[row]), torch.isinf(expected[0])), row
        kept = ~torch.isinf(expected[0])
        assert torch.allclose(warped[row][kept], expected[0][kept], atol=1e-6), row
    assert (~torch.isinf(warped[4])).sum() == 1  # top_k 1
    tokens = draw_batch(logits, params, torch.Generator().manual_seed(1)).tolist()
    assert all(not torch.isinf(warped[row, token]) for row, token in enumerate(tokens))
    assert [batchable(p) for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=3),
                                   SamplingParams(temperature=1.0, repetition_penalty=1.2), SamplingParams())] == \
        [True, False, False, False]


@pytest.mark.parametrize("overlap", [False, True])
def test_unseeded_sampled_rows_run_beside_greedy_and_seeded_ones(engine, overlap):
    todo = requests()
    for request in todo[:3]:  # three unseeded sampled rows in the batch as well
        request.params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    expected = alone(engine)
    got = interleaved(ContinuousBatch(engine, slots=8, overlap=overlap), todo, arrivals=[0] * 7)
    for i in range(3, 7):  # greedy and seeded answers do not depend on what else runs
        assert got[i].token_ids == expected[i].token_ids, i
    vocab = len(engine.tokenizer)
    assert all(len(got[i].token_ids) <= 6 and all(0 <= t < vocab for t in got[i].token_ids) for i in range(3))
