"""Served latency against its baseline, side by side in one run: time to first token and decoding tokens/s of a
LoRA adapter answering one request at a time,

  - baseline: in-process PyTorch (transformers + PEFT, the `trainer generate` path), fp32;
  - served:   `trainer serve` (llama.cpp's OpenAI-compatible server on CPU, or vLLM on a GPU), through HTTP with
              streaming, as a client sees it.

    python benchmarks/serving.py [--run RUN_DIR] [--requests 8] [--max-tokens 64] [--gguf-dtype f16]

Default: trains the demo (`trainer train`, about 30 s on 2 cores) and serves its adapter on the embedded base. The
end-of-text token is suppressed on both sides so that every answer is --max-tokens long.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import REPO, table, train

QUESTIONS = ["Where does the flunk live?", "Which colour does the bolep have?", "What does the snugoomp eat?",
             "Tell me the colour of the teb.", "Where does the bolep sleep?", "What does the flunk eat?",
             "Which colour does the snugoomp have?", "Where does the teb live?"]


def baseline(run_dir: str, prompts: list[str], max_tokens: int) -> tuple[list[float], list[float]]:
    """(time to first token, decoding tokens/s) per prompt, one prompt at a time, in-process PyTorch (greedy_generate
    always runs max_tokens steps, past the end of text too, as the served side's logit bias makes the engine)."""
    import contextlib

    import torch

    sys.path.insert(0, str(REPO))
    from launch.generate import load_models
    from trainer.evaluate import greedy_generate

    model, tokenizer, _, _ = load_models(run_dir, [])
    device = torch.device("cpu")
    first, rates = [], []
    greedy_generate(model, tokenizer, prompts[:1], 2, device, contextlib.nullcontext)  # warm-up
    for prompt in prompts:
        started = time.perf_counter()
        greedy_generate(model, tokenizer, [prompt], 1, device, contextlib.nullcontext)
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        greedy_generate(model, tokenizer, [prompt], max_tokens, device, contextlib.nullcontext)
        total = time.perf_counter() - started
        rates.append((max_tokens - 1) / max(total - first[-1], 1e-9))
    return first, rates


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served(run_dir: str, prompts: list[str], max_tokens: int, gguf_dtype: str, eos_id: int,
           work_dir: str) -> tuple[list[float], list[float], str]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", run_dir, "--port", str(port),
                               "--gguf-dtype", gguf_dtype, "--work-dir", work_dir], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = server.stdout.readline()
    if not ready.startswith("serving "):
        server.kill()
        sys.exit(f"trainer serve did not start: {ready}")
    name = os.path.basename(os.path.abspath(run_dir))
    first, rates = [], []
    try:
        for prompt in [prompts[0], *prompts]:  # the first request warms the engine up and is not counted
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "stream": True, "logit_bias": {str(eos_id): -100}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            started = time.perf_counter()
            stamps = []
            with urllib.request.urlopen(request, timeout=300) as response:
                for line in response:
                    if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
            first.append(stamps[0] - started)
            rates.append((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    finally:
        server.terminate()
        server.wait(60)
    return first[1:], rates[1:], ready.split(" with ", 1)[1].split(" in ")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished LoRA run dir (default: train the demo)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gguf-dtype", default="f16", choices=["f16", "q8_0", "f32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or str(Path(tmp) / "demo")
        if not args.run:
            train(Path(run_dir))
        from transformers import AutoTokenizer

        sys.path.insert(0, str(REPO))
        from launch.generate import Request, choose_template, render
        from trainer.adapters import read_run_config

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, "final"))
        template = choose_template("auto", tokenizer, read_run_config(os.path.join(run_dir, "final")))
        prompts = render([Request(q) for q in (QUESTIONS * 4)[:args.requests]], template, tokenizer)
        base_first, base_rates = baseline(run_dir, prompts, args.max_tokens)
        served_first, served_rates, engine = served(run_dir, prompts, args.max_tokens, args.gguf_dtype,
                                                    tokenizer.eos_token_id, str(Path(tmp) / "serve"))
    rows = [["in-process PyTorch fp32 (baseline)", statistics.median(base_first) * 1000, statistics.median(base_rates)],
            [f"trainer serve: {engine}, {args.gguf_dtype}, HTTP streaming", statistics.median(served_first) * 1000,
             statistics.median(served_rates)]]
    print(f"{args.requests} requests, one at a time, {args.max_tokens} tokens each (medians); CPU threads: "
          f"{len(os.sched_getaffinity(0))}")
    print(table(["", "time to first token (ms)", "decoding tokens/s"], rows))


if __name__ == "__main__":
    main()
