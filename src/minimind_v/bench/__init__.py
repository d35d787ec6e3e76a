"""The benchmarks, on the top floor: nothing in the library imports them.

    reference.py   the reference setting: the 768 x 8 model, a random SigLIP B/32-256 tower, the generator's data
    train.py       `minimind-v bench train`: samples/s, real tokens/s, MFU and memory of a training step
    decode.py      `minimind-v bench decode`: prefill latency, decode tokens/s, memory, a profiler trace
    serve.py       `minimind-v bench serve`: many clients against a live server; latency, /health, RSS
"""
