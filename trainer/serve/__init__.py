"""`trainer serve`: one base model and its adapters behind an OpenAI-compatible API, through a real engine.

sources.py resolves what to serve (model dirs, run dirs, registry references) and checks that every adapter belongs
to the base; llama_cpp.py (CPU: GGUF files and llama-cpp-python's server) and vllm.py (GPUs: vLLM with LoRA) turn
that into the engine's own config and command line; launch/serve.py starts the engine, waits until it answers and
stops it cleanly. The project writes no inference server of its own.
"""
