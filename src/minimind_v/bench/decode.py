"""`minimind-v bench`: prefill latency, decode tokens/s at batch 1 and a larger batch, peak memory; `--profile`
writes a torch profiler Chrome trace. Also the usage guide's `benchmark_model_performance` and
`profile_model_execution` for a plain forward pass."""

from __future__ import annotations

import resource
import statistics
import time

import torch
from PIL import Image

from ..device import synchronize
from ..generation import Engine, GenerationRequest, SamplingParams


def bench_requests(engine: Engine, prompt_tokens: int, new_tokens: int, batch: int,
                   images: int) -> list[GenerationRequest]:
    """`batch` raw prompts of about `prompt_tokens` tokens (placeholders included), each with `images` images."""
    has_tower = engine.features is not None
    images = images if has_tower else 0
    pictures = [Image.new("RGB", (224, 224), (40 * i % 255, 90, 160)) for i in range(images)]
    text, filler = "<image>" * images, "the quick brown fox jumps over the lazy dog. "
    while len(engine.encode(GenerationRequest(text=text, images=pictures))) < prompt_tokens:
        text += filler
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)  # every row decodes new_tokens
    return [GenerationRequest(text=text, images=pictures, params=params) for _ in range(batch)]


def timed_generate(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, tokens decoded after the first) of one batch, EOS ignored so every row
    runs to its limit. Prefill ends with each row's first token; decode makes the rest."""
    synchronize(engine.device)
    results = engine.generate(requests)  # the requests ignore EOS
    first = results[0]
    return (first.prefill_seconds, max(r.decode_seconds for r in results),
            sum(r.completion_tokens - 1 for r in results))


def end_to_end(engine: Engine, requests: list[GenerationRequest], use_generate: bool) -> float:
    """Generated tokens per second of wall time for the whole batch, by the engine or by transformers'
    `model.generate` (its own loop and DynamicCache) on the same left-padded prompts and image features."""
    new = requests[0].params.max_new_tokens
    synchronize(engine.device)
    start = time.perf_counter()
    if use_generate:
        with torch.inference_mode():
            ids, mask, features = engine.prepare(requests)  # [B, L], [B, L], [num_images, T, ve] or None
        extra = {"image_features": features} if features is not None else {}
        with torch.inference_mode():
            engine.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=engine.pad_id, **extra)
    else:
        timed_generate(engine, requests)
    synchronize(engine.device)
    return len(requests) * new / (time.perf_counter() - start)


def table_rows(report: dict) -> tuple[str, list[tuple[str, str]]]:
    """(title, [(figure, value)]) of a report, for the table `bench decode` prints."""
    title = (f"bench decode: {report['device']}, {report['dtype'].replace('torch.', '')}, {report['decoding']}, "
             f"{report['prompt_tokens']}-token prompt with {report['images']} image(s), "
             f"{report['new_tokens']} new tokens")
    rows = []
    for key in sorted((k for k in report if k.startswith("batch_")), key=lambda k: int(k.split("_")[1])):
        size, figures = key.split("_")[1], report[key]
        rows += [(f"batch {size}: prefill", f"{figures['prefill_ms']} ms"),
                 (f"batch {size}: decode tokens/s", f"{figures['decode_tokens_per_s']:,}")]
        for name, label in (("engine", "engine"), ("transformers_generate", "transformers generate")):
            if f"{name}_end_to_end_tokens_per_s" in figures:
                rows.append((f"batch {size}: {label}, end to end tokens/s",
                             f"{figures[f'{name}_end_to_end_tokens_per_s']:,}"))
    return title, rows + [("peak memory", report["peak_memory"])]


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB GPU (peak allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB process (peak RSS)"


def bench(engine: Engine, prompt_tokens: int = 128, new_tokens: int = 64, batch: int = 8, images: int = 1,
          runs: int = 3, profile: str | None = None, compare: bool = False) -> dict:
    """Median over `runs` (after one warm-up) of prefill latency and decode throughput at batch 1 and `batch`;
    `compare`: also end-to-end tokens/s of the engine and of transformers' `generate`."""
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    report = {"device": str(engine.device), "dtype": str(next(engine.model.parameters()).dtype),
              "decoding": engine.decoding_mode(), "prompt_tokens": None, "new_tokens": new_tokens,
              "images": images if engine.features else 0}
    for size in sorted({1, batch}):
        requests = bench_requests(engine, prompt_tokens, new_tokens, size, images)
        report["prompt_tokens"] = len(engine.encode(requests[0]))
        timed_generate(engine, requests)  # warm-up
        samples = [timed_generate(engine, requests) for _ in range(runs)]
        prefill = statistics.median(s[0] for s in samples)
        decode = statistics.median(s[2] / s[1] for s in samples if s[1] > 0)
        report[f"batch_{size}"] = {"prefill_ms": round(prefill * 1000, 2), "decode_tokens_per_s": round(decode, 1)}
        if compare:
            for name, flag in (("engine", False), ("transformers_generate", True)):
                end_to_end(engine, requests, flag)  # warm-up
                rate = statistics.median(end_to_end(engine, requests, flag) for _ in range(runs))
                report[f"batch_{size}"][f"{name}_end_to_end_tokens_per_s"] = round(rate, 1)
    report["peak_memory"] = peak_memory(engine.device)
    if profile:
        report["trace"] = trace(engine, bench_requests(engine, prompt_tokens, min(new_tokens, 16), 1, images),
                                profile)
    return report


def trace(engine: Engine, requests: list[GenerationRequest], path: str) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as profiler:
        timed_generate(engine, requests)
    profiler.export_chrome_trace(path)
    return path


def benchmark_model_performance(model, sample_inputs: dict, num_runs: int = 100, warmup: int = 10) -> dict:
    """Forward-pass latency (seconds) over `num_runs` after `warmup` runs, and the memory each run adds."""
    device = next(model.parameters()).device
    model.eval()
    times, memory = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**sample_inputs)
        for _ in range(num_runs):
            synchronize(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            start = time.perf_counter()
            model(**sample_inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
            memory.append((torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - before)
    return {"latency_mean": statistics.fmean(times), "latency_std": statistics.pstdev(times),
            "latency_min": min(times), "latency_max": max(times), "memory_mean": statistics.fmean(memory),
            "memory_std": statistics.pstdev(memory)}


def profile_model_execution(model, sample_inputs: dict, trace_path: str = "model_trace.json",
                            row_limit: int = 10) -> str:
    """Profile one forward pass; write a Chrome trace; return the top operators by time as a table."""
    device = next(model.parameters()).device
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as profiler:
        with torch.inference_mode():
            model(**sample_inputs)
    profiler.export_chrome_trace(trace_path)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=row_limit)
