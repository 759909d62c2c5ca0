"""`trainer serve BASE [--adapter NAME=SOURCE ...]`: an OpenAI-compatible server for one base and its adapters.

The engine (trainer/serve/: llama.cpp on CPU, vLLM on GPUs) is configured and started as a child process; this
process checks the sources and the port first, waits until the engine answers GET /v1/models, prints where it is,
and on Ctrl-C or SIGTERM stops it (SIGTERM, then SIGKILL after a grace period) and exits 0. If the engine dies on its
own, the last line of its log is shown and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from launch.cli_args import OneLineParser
from launch.register import registry_errors
from trainer.errors import UserError

DESCRIPTION = """\
Serve BASE (a model dir, a run dir or registry:NAME@ALIAS) with each --adapter NAME=SOURCE (a PEFT run dir, an
adapter dir or registry:NAME@ALIAS) through an OpenAI-compatible API: /v1/chat/completions, /v1/completions
(streaming too) and /v1/models. A request's "model" picks the adapter by NAME, or the base by its name (--base-name,
default the base dir's name). Chat requests are laid out with the template the adapters were trained with.

Engines: llama.cpp on CPU (the base and adapters exported to GGUF in --work-dir, reused while the sources are
unchanged; pip install 'trainer[serve]'), vLLM on CUDA GPUs (pip install 'trainer[serve-gpu]').

e.g. trainer serve trainer/assets/tiny-llama --adapter facts=runs/facts --adapter style=registry:style@champion
     curl localhost:8000/v1/chat/completions -d '{"model": "facts", "messages": [{"role": "user", "content": "Hi"}]}'
"""
READY_TIMEOUT_S = 600
STOP_GRACE_S = 15


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainer serve", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="a model dir, run dir or registry:NAME@ALIAS")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=SOURCE",
                        help="an adapter served under NAME (a run dir, adapter dir or registry:NAME@ALIAS); repeatable")
    parser.add_argument("--base-name", help="the name requests use for the base alone (default: its dir's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--engine", choices=["auto", "llama-cpp", "vllm"], default="auto",
                        help="auto: vLLM when a CUDA GPU and vLLM are here, else llama.cpp")
    parser.add_argument("--template", choices=["auto", "tokenizer", "chatml", "llama-3", "alpaca"], default="auto",
                        help="chat layout (auto: the one the adapters were trained with)")
    parser.add_argument("--gguf-dtype", choices=["f16", "q8_0", "f32"], default="f16",
                        help="llama.cpp: the base model's GGUF weights (adapters are f32)")
    parser.add_argument("--context", type=int, help="tokens of context per request (default: the model's, at most "
                        "4096 on llama.cpp)")
    parser.add_argument("--threads", type=int, help="llama.cpp: CPU threads (default: all available)")
    parser.add_argument("--work-dir", help="where engine files go (default: runs/serve)")
    parser.add_argument("--tracking-uri", help="the registry for registry: references (default: MLFLOW_TRACKING_URI, "
                        "else runs/registry)")
    parser.add_argument("--print-command", action="store_true",
                        help="prepare the engine's files, print its command line and exit without starting it")
    return parser


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"serve: --port {port} is not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the engines bind: connections of a server stopped a moment ago (TIME_WAIT) do not block a restart.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"serve: port {port} on {host} is taken ({err.strerror}): stop what listens there or "
                            "choose another with --port") from None


def choose_engine(name: str) -> str:
    if name != "auto":
        return name
    from importlib.util import find_spec

    if find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "llama-cpp"


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Engine:
    """The engine's process (its own process group, so a stop reaches its workers too) and its log file."""

    def __init__(self, command: list[str], log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def died(self) -> UserError:
        return UserError(f"serve: the engine stopped (exit {self.process.returncode}): {_last_line(self.log_path)} "
                         f"(its log: {self.log_path})")


@registry_errors  # registry: references go through MLflow: a store that cannot be reached is one line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("context", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"serve: --{name} must be >= 1 (leave it out for the default)")
    check_port_free(args.host, args.port)
    engine_name = choose_engine(args.engine)
    from trainer.serve import llama_cpp, vllm

    engine_module = vllm if engine_name == "vllm" else llama_cpp
    engine_module.check_installed()
    from launch.serve_sources import resolve
    from trainer.registry import tracking_uri

    served = resolve(args.base, args.adapter, tracking_uri(args.tracking_uri), args.base_name, args.template)
    work_dir = os.path.abspath(args.work_dir or os.path.join("runs", "serve"))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 -- stdout is the ready line
    if engine_name == "vllm":
        command = vllm.prepare(served, work_dir, args.host, args.port, args.context, log=log)
    else:
        command, _ = llama_cpp.prepare(served, work_dir, args.host, args.port, args.gguf_dtype, args.context,
                                       args.threads, log=log)
    if args.print_command:
        print(" ".join(command))
        return 0
    check_port_free(args.host, args.port)  # GGUF writing may have taken minutes
    return _run(command, served, engine_module.ENGINE, work_dir, args.host, args.port)


def _run(command: list[str], served, engine_name: str, work_dir: str, host: str, port: int) -> int:
    stop_requested = []

    def request_stop(signum, _frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = Engine(command, os.path.join(work_dir, f"engine-{port}.log"))
    try:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        started = time.monotonic()
        while not _http_ok(f"{url}/v1/models"):
            if stop_requested:
                return 0
            if not engine.alive():
                raise engine.died()
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise UserError(f"serve: the engine did not answer {url}/v1/models within {READY_TIMEOUT_S} s "
                                f"(its log: {engine.log_path})")
            time.sleep(0.5)
        names = [served.base_name, *(a.name for a in served.adapters)]
        print(f"serving {url}/v1 with {engine_name} in {time.monotonic() - started:.1f} s: models {', '.join(names)} "
              f"(chat template: {served.template_name}); Ctrl-C stops", flush=True)
        while not stop_requested:
            if not engine.alive():
                sys.stderr.write(f"trainer: {engine.died()}\n")
                return 1
            time.sleep(0.5)
        return 0
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_requested:
            print("serve: stopped", flush=True)
