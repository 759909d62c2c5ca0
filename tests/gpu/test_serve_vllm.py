"""`trainer serve --engine vllm` on a CUDA GPU: the embedded base with two LoRA adapters behind vLLM's
OpenAI-compatible server, each adapter chosen by the request's `model`, answering as `trainer generate` does
greedily. Skipped without a GPU or without vLLM (pip install 'trainer[serve-gpu]').
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.gpu]
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

TINY = str(REPO / "trainer" / "assets" / "tiny-llama")
PROMPTS = ["Where does the flunk live?", "Which colour does the bolep have?"]


def _adapter(path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(r=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return str(path)


def test_vllm_serves_two_adapters_like_generate(tmp_path):
    adapters = {"one": _adapter(tmp_path / "one", 1), "two": _adapter(tmp_path / "two", 2)}
    specs = [f"--adapter={name}={path}" for name, path in adapters.items()]
    expected = run_cli("generate", TINY, *specs, *PROMPTS, "--template", "none", "--max-new-tokens", "8", "--json",
                       timeout=600)
    assert expected.returncode == 0, expected.stderr[-3000:]
    answers: dict[str, list[str]] = {}
    for line in expected.stdout.splitlines():
        record = json.loads(line)
        answers.setdefault(record["adapter"], []).append(record["output"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", TINY, *specs, "--engine", "vllm",
                               "--port", str(port), "--work-dir", str(tmp_path / "serve")], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready = server.stdout.readline()
        assert ready.startswith("serving ") and "vLLM" in ready, ready
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
        for name in adapters:
            served = [client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
                      .choices[0].text for prompt in PROMPTS]
            assert served == answers[name], name
        assert answers["one"] != answers["two"]
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=120)
    assert server.returncode == 0
