"""`trainer serve` on CPU (llama.cpp's server): the demo base with two adapters, asked through the official `openai`
client. Each adapter, chosen by the request's `model`, answers as `trainer generate` does greedily on the same
prompt, through completions, chat completions and streaming; then the server stops cleanly on SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.integration.adapter_runs import QUESTIONS

openai = pytest.importorskip("openai")
try:
    import llama_cpp.server.app  # noqa: F401
except ImportError:  # CI (`make test`) installs it, so there its absence is a failure, never a quiet skip
    if os.environ.get("CI"):
        raise
    pytest.skip("llama-cpp-python[server] is not installed: `make install-test`", allow_module_level=True)

TINY = str(REPO / "trainer" / "assets" / "tiny-llama")
NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _expected(facts: Path, shrug: Path) -> dict[str, list[dict]]:
    """`trainer generate`'s greedy answers (and the rendered prompts), per adapter and for the base."""
    result = run_cli("generate", TINY, f"--adapter=facts={facts}", f"--adapter=shrug={shrug}", "--base-too",
                     *QUESTIONS, "--max-new-tokens", str(NEW_TOKENS), "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers: dict[str, list[dict]] = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        answers.setdefault(record["adapter"], []).append(record)
    return answers


class Server:
    def __init__(self, *args: str, cwd: Path, port: int | None = None):
        self.port = port or _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "serve", *args, "--port", str(self.port)], cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready_line = self.process.stdout.readline()  # blocks until "serving ..." (or the process ends)
        assert self.ready_line.startswith("serving "), self.ready_line + self.process.stderr.read()[-3000:]
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=120)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=60)
        return self.process.returncode, out


@pytest.mark.slow
def test_two_adapters_served_answer_as_generate_does_and_the_server_stops_cleanly(two_runs, tmp_path):
    facts, shrug = two_runs
    expected = _expected(facts, shrug)
    store = tmp_path / "registry"
    registered = run_cli("register", str(facts), "--name", "facts", "--alias", "champion", "--tracking-uri",
                         str(store), timeout=300)
    assert registered.returncode == 0, registered.stderr[-2000:]
    server = Server(TINY, "--adapter=facts=registry:facts@champion", f"--adapter=shrug={shrug}", "--gguf-dtype",
                    "f32", "--work-dir", str(tmp_path / "serve"), "--tracking-uri", str(store), cwd=tmp_path)
    try:
        assert "models tiny-llama, facts, shrug" in server.ready_line and "chat template: alpaca" in server.ready_line
        assert {m.id for m in server.client.models.list().data} == {"tiny-llama", "facts", "shrug"}
        served: dict[str, list[str]] = {}
        for name, model in (("base", "tiny-llama"), ("facts", "facts"), ("shrug", "shrug")):
            for record in expected[name]:
                completion = server.client.completions.create(model=model, prompt=record["input"],
                                                              max_tokens=NEW_TOKENS, temperature=0)
                assert completion.model == model
                served.setdefault(name, []).append(completion.choices[0].text)
            for record in expected[name]:  # chat: the server lays the question out with the training template
                messages = [{"role": "user", "content": record["prompt"]}]
                chat = server.client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS,
                                                             temperature=0)
                assert chat.choices[0].message.content == record["output"], (name, record["prompt"])
        assert served == {name: [r["output"] for r in records] for name, records in expected.items()}
        assert served["facts"] != served["shrug"]

        stream = server.client.chat.completions.create(
            model="shrug", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=NEW_TOKENS,
            temperature=0, stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len([p for p in pieces if p]) > 1, "streamed in pieces"
        assert "".join(pieces) == expected["shrug"][0]["output"]
    finally:
        code, out = server.stop()
    assert code == 0 and "serve: stopped" in out
    config = str(tmp_path / "serve" / f"llama-cpp-server-{server.port}.json")
    assert not [pid for pid in _pids() if config in _cmdline(pid)], "the engine is gone with its server"
    # The same port at once (a stopped server's connections do not hold it), serving the facts adapter registered
    # merged into its base: a model of its own, named after its registration, laid out with its training template.
    merged = run_cli("register", str(facts), "--name", "facts-merged", "--merged", "--tracking-uri", str(store),
                     timeout=300)
    assert merged.returncode == 0, merged.stderr[-2000:]
    again = Server("registry:facts-merged", "--gguf-dtype", "f32", "--work-dir", str(tmp_path / "serve"),
                   "--tracking-uri", str(store), cwd=tmp_path, port=server.port)
    try:
        assert "models facts-merged " in again.ready_line and "chat template: alpaca" in again.ready_line
        chat = again.client.chat.completions.create(
            model="facts-merged", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=NEW_TOKENS,
            temperature=0)
        assert chat.choices[0].message.content == expected["facts"][1]["output"]
    finally:
        assert again.stop()[0] == 0


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_port_taken_is_one_line_before_anything_is_prepared(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", TINY, "--port", str(port), "--work-dir", str(tmp_path / "serve"), timeout=60)
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is taken", "--port")
    assert not (tmp_path / "serve").exists()


def test_bad_options_and_an_unreachable_registry_are_one_line(tmp_path):
    work = ("--work-dir", str(tmp_path / "serve"), "--port", str(_free_port()))
    assert_one_line_error(run_cli("serve", TINY, "--context", "0", *work, timeout=60), "--context must be >= 1")
    assert_one_line_error(run_cli("serve", TINY, "--threads", "-1", *work, timeout=60), "--threads must be >= 1")
    down = run_cli("serve", TINY, "--adapter=facts=registry:facts@champion", "--tracking-uri", "http://127.0.0.1:9/",
                   *work, timeout=120)
    assert_one_line_error(down, "registry:", "MLflow server is up")
    assert not (tmp_path / "serve").exists()


def test_adapter_of_another_base_is_refused_in_one_line(tmp_path):
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-base"
    shutil.copytree(TINY, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10  # same shapes, another model
    (other / "config.json").write_text(json.dumps(config))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    result = run_cli("serve", TINY, f"--adapter=stranger={tmp_path / 'adapter'}", "--port", str(_free_port()),
                     "--work-dir", str(tmp_path / "serve"), timeout=120)
    assert_one_line_error(result, "adapter stranger", "trained on another base model")
    assert not (tmp_path / "serve").exists()


def test_engine_files_and_vllm_command_are_prepared_without_starting(tmp_path):
    """--print-command: the llama.cpp config names the base once per model entry, each with its adapter's GGUF;
    and the vLLM command line a GPU machine would run serves the same adapters by name."""
    from launch.serve_sources import Adapter, Served
    from trainer.serve.vllm import max_lora_rank
    from trainer.serve.vllm import prepare as vllm_command

    result = run_cli("serve", TINY, "--print-command", "--work-dir", str(tmp_path / "serve"), "--port", "8765",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config_path = result.stdout.split("--config_file ")[1].strip()
    config = json.loads(Path(config_path).read_text())
    assert config["port"] == 8765 and [m["model_alias"] for m in config["models"]] == ["tiny-llama"]
    assert Path(config["models"][0]["model"]).is_file()
    base_gguf = Path(config["models"][0]["model"])
    written = base_gguf.stat().st_mtime_ns  # the GGUF is reused, not written again, on a start from the same sources
    again = run_cli("serve", TINY, "--print-command", "--work-dir", str(tmp_path / "serve"), "--port", "8765",
                    timeout=300)
    assert again.returncode == 0 and "reusing" in again.stderr and base_gguf.stat().st_mtime_ns == written

    served = Served(TINY, "tiny", [Adapter("a", "/adapters/a", "a", rank=8), Adapter("b", "/adapters/b", "b", rank=24)],
                    template_name="alpaca", chat_template="{{ messages }}")
    command = vllm_command(served, str(tmp_path / "vllm"), "0.0.0.0", 9000)
    joined = " ".join(command)
    assert "--enable-lora" in command and "--lora-modules a=/adapters/a b=/adapters/b" in joined
    assert command[command.index("--max-lora-rank") + 1] == "32" and max_lora_rank([64]) == 64
    template = Path(command[command.index("--chat-template") + 1])
    assert template.read_text() == "{{ messages }}"
