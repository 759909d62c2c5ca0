"""`trainer generate SOURCE [PROMPT ...] [--adapter NAME=PATH ...] [--chat]`: answers from a model and its adapters.

One base model is loaded once; every adapter is attached to it under its own name (PEFT's load_adapter) and made
active in turn (set_adapter), so several fine-tunes of one base are served from one copy of its weights. Answers
are greedy by default (trainer/evaluate.py's greedy_generate, the decoding training-time evaluation uses), so they
are reproducible and each adapter answers exactly as it would loaded alone; --temperature samples instead, from a
generator seeded afresh for each adapter, so a seed still gives each adapter the same answers whatever runs beside
it. --chat holds a multi-turn conversation with one model or adapter on stdin/stdout.

Prompts are wrapped in the run's template (data.template of the run that trained the source or the first adapter:
alpaca, chatml, llama-3 or the tokenizer's own), or --template; `--template none` passes them through as written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass

from launch.cli_args import OneLineParser
from trainer.errors import UserError
from trainer.jsonfile import read_json

DESCRIPTION = """\
SOURCE is a model dir, or a run dir: its final/ is either the trained model, or an adapter that is then attached
to its base under the run dir's name. Each --adapter NAME=PATH (an adapter dir or a run dir) is attached too; the
prompts are answered by every adapter in turn (by the base alone when there are none; add --base-too to include it).
Prompts come from the arguments and/or --prompts FILE: one prompt per line (.txt), or JSON lines with "prompt",
"instruction" (+ "input"), or "messages".

Answers are greedy unless --temperature is above 0: then each token is sampled (from the --top-p nucleus), and
--seed makes the answers repeatable, for each adapter whatever else is loaded.

--chat talks with one model or adapter: each line on stdin is a user turn, answered with the conversation so far
(in the run's template) and printed on its own line; /reset forgets the conversation, /exit or end of input ends it.

e.g. trainer generate runs/facts-lora "Where does the flunk live?"
     trainer generate trainer/assets/tiny-llama --adapter facts=runs/a --adapter style=runs/b --prompts qs.jsonl --json
     trainer generate runs/facts-lora "Where does the flunk live?" --temperature 0.8 --top-p 0.9 --seed 1
     trainer generate runs/facts-lora --chat --system "Answer in one sentence."
"""
TEMPLATES = ("auto", "tokenizer", "chatml", "llama-3", "alpaca", "none")



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainer generate", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a model dir or a run dir")
    parser.add_argument("prompts", nargs="*", help="prompts to answer")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="attach an adapter (an adapter dir or run dir) under NAME; repeatable")
    parser.add_argument("--prompts-file", "--prompts", dest="prompts_file", help=".txt (one per line) or .jsonl")
    parser.add_argument("--template", choices=TEMPLATES, default="auto",
                        help="prompt template (auto: the run's data.template, else the tokenizer's chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--base-too", action="store_true", help="also answer with the base model, adapters off")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per answer: adapter, prompt, input (the rendered text), output "
                             "(with --chat also turn)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sample each token at this temperature; 0 (default): greedy, reproducible answers")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only among the most likely tokens that together hold probability P "
                             "(0 < P <= 1; default 1: all tokens)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed of the sampling (default 0); each adapter starts from it afresh")
    parser.add_argument("--chat", action="store_true",
                        help="multi-turn chat on stdin/stdout with one model or adapter; /reset, /exit")
    parser.add_argument("--system", metavar="TEXT", help="a system message before the prompts (or the chat)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code that the model dir ships (auto_map); off unless you trust its source")
    return parser


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded: greedy at temperature 0, else sampled from a generator seeded afresh per answerer."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def decoding(self) -> dict:
        """greedy_generate's keyword arguments, with a new generator (on the CPU, so devices draw alike)."""
        import torch

        generator = torch.Generator().manual_seed(self.seed) if self.temperature > 0 else None
        return {"temperature": self.temperature, "top_p": self.top_p, "generator": generator}


def read_sampling(args: argparse.Namespace) -> Sampling:
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"generate: --temperature must be a number >= 0 (0 answers greedily), got {args.temperature}")
    top_p = 1.0 if args.top_p is None else args.top_p
    if not 0 < top_p <= 1:
        raise UserError(f"generate: --top-p must be in (0, 1] (1 samples from all tokens), got {top_p}")
    seed = 0 if args.seed is None else args.seed
    if not 0 <= seed < 2**63:
        raise UserError(f"generate: --seed must be between 0 and 2**63 - 1, got {seed}")
    if args.temperature == 0 and (args.top_p is not None or args.seed is not None):
        sys.stderr.write("[trainer] --top-p and --seed only matter when sampling (--temperature > 0): answering "
                         "greedily\n")
    return Sampling(args.temperature, top_p, seed)


@dataclass
class Request:
    """What one prompt asks: a conversation turn (instruction, optional input/context) or raw text."""

    instruction: str
    context: str = ""
    messages: tuple = ()


def final_dir(path: str) -> str:
    """A run dir stands for its final/ (the trained model or adapter), whose weight files must be whole."""
    from trainer.weights import check_safetensors_files

    final = os.path.join(path, "final")
    if os.path.isdir(final):
        check_safetensors_files(final)
        return final
    if os.path.isfile(os.path.join(path, "config.yaml")) and not is_adapter(path) \
            and not os.path.isfile(os.path.join(path, "config.json")):
        _refuse_unfinished_run(path)
    if os.path.isdir(path):
        check_safetensors_files(path)
    return path


def _refuse_unfinished_run(run_dir: str) -> None:
    """A run dir without final/: the run has not finished (or stopped early); say what exists and what to do."""
    from trainer.adapters import read_run_config
    from trainer.checkpoint import is_committed, list_checkpoints

    committed = [os.path.basename(d) for d in list_checkpoints(run_dir) if is_committed(d)]
    peft = ((read_run_config(run_dir).get("peft") or {}).get("name") or "none") != "none"
    if committed:
        raise UserError(f"generate: {run_dir} has no final/ (the run has not finished; newest checkpoint "
                        f"{committed[-1]}): finish it with `trainer train run.dir={run_dir}` (resume=auto), or export "
                        f"the checkpoint with `trainer export {run_dir} --to {'adapter' if peft else 'hf'} --out DIR` "
                        "and generate from DIR")
    raise UserError(f"generate: {run_dir} is a run dir with no final/ and no committed checkpoint: nothing trained "
                    f"to generate with; run `trainer train run.dir={run_dir}` first")


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    adapters, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"generate: --adapter {spec!r}: expected NAME=PATH")
        if name in seen:
            raise UserError(f"generate: adapter name {name!r} is given twice")
        path = final_dir(path)
        if not is_adapter(path):
            raise UserError(f"generate: --adapter {name}={path}: not an adapter dir (no adapter_config.json)")
        read_json(os.path.join(path, "adapter_config.json"))  # damaged: say so before the base model loads
        seen.add(name)
        adapters.append((name, path))
    return adapters


def read_requests(prompts: list[str], prompts_file: str | None) -> list[Request]:
    requests = [Request(p) for p in prompts]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise UserError(f"generate: --prompts {prompts_file!r} does not exist")
        with open(prompts_file, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if not prompts_file.endswith(".jsonl"):
                    requests.append(Request(line.rstrip("\n")))
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise UserError(f"{prompts_file}:{line_no}: not JSON ({err})") from None
                requests.append(_request_from_record(record, f"{prompts_file}:{line_no}"))
    if not requests:
        raise UserError("generate: no prompts: give them as arguments or with --prompts FILE")
    return requests


def _request_from_record(record, where: str) -> Request:
    if isinstance(record, str):
        return Request(record)
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            messages = tuple((m["role"], m["content"]) for m in record["messages"])
            return Request(messages[-1][1] if messages else "", messages=messages)
        for key in ("prompt", "instruction"):
            if isinstance(record.get(key), str):
                return Request(record[key], context=str(record.get("input") or record.get("context") or ""))
    raise UserError(f"{where}: expected a string or an object with prompt, instruction (+ input) or messages")


def choose_template(name: str, tokenizer, run_config: dict):
    """The template training used (the run's data.template and format), or the one asked for; None: raw text."""
    from trainer.data.templates import build_template

    if name == "none":
        return None
    if name == "auto" and run_config.get("data"):
        data = run_config["data"]
        return build_template(data.get("template", "auto"), tokenizer, [data.get("format", "alpaca")])
    if name == "auto":
        return build_template("tokenizer", tokenizer, ["chat"]) if getattr(tokenizer, "chat_template", None) else None
    return build_template(name, tokenizer, ["chat"])


def render(requests: list[Request], template, tokenizer, system: str | None = None) -> list[str]:
    """Prompt texts ready for generation (BOS is added by greedy_generate, so a template's own is dropped); `system`
    opens each conversation that has no system message of its own."""
    from trainer.data.formats import Message

    texts = []
    for request in requests:
        if template is None:
            texts.append(request.instruction)
            continue
        turns = request.messages or (("user", request.instruction),)
        if system is not None and turns[0][0] != "system":
            turns = (("system", system), *turns)
        messages = [Message(role, content, context=request.context if i == len(turns) - 1 else "")
                    for i, (role, content) in enumerate(turns)]
        try:
            text = template.render(messages, add_generation_prompt=True)
        except Exception as err:  # a Jinja template's raise_exception() (e.g. no system role), or any error in it
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"generate: the {template.name} template rejected the conversation: {reason} (choose "
                            f"another --template{' or drop --system' if system is not None else ''})") from None
        bos = tokenizer.bos_token
        texts.append(text[len(bos):] if bos and text.startswith(bos) else text)
    return texts


def load_models(source: str, adapters: list[tuple[str, str]], trust_remote_code: bool = False):
    """(model, tokenizer, adapter names in order, run config for the template)."""
    from transformers import AutoTokenizer

    from trainer.adapters import load_adapter_model, load_base_for_adapter, read_adapter_config, read_run_config
    from trainer.remote_code import refuse_untrusted

    source = final_dir(source)
    if is_adapter(source):  # a PEFT run: its adapter goes first, named after the run dir
        run_name = os.path.basename(os.path.dirname(os.path.abspath(source))) or "adapter"
        adapters = [(run_name, source), *adapters]
        base_dir = None
    else:
        base_dir = source
    run_config = read_run_config(source) or (read_run_config(adapters[0][1]) if adapters else {})
    tokenizer_dir = source if os.path.isfile(os.path.join(source, "tokenizer_config.json")) else base_dir
    base_of_adapter = read_adapter_config(adapters[0][1]).get("base_model_name_or_path") if adapters else None
    for directory in {base_dir or base_of_adapter, tokenizer_dir}:  # before transformers imports any of it
        refuse_untrusted(directory, trust_remote_code, "--trust-remote-code")
    trust = {"trust_remote_code": trust_remote_code}
    check_shapes(base_dir or base_of_adapter, bool(base_dir), [path for _, path in adapters], trust_remote_code)
    if not adapters:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", **trust).float()
        return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir, **trust), [], run_config
    first_name, first_path = adapters[0]
    base = load_base_for_adapter(first_path, base_path=base_dir, dtype="fp32", **trust)
    model = load_adapter_model(base, first_path, first_name)
    if len(adapters) > 1 and model.active_peft_config.is_prompt_learning:
        raise UserError(f"generate: {first_name} is a prompt/prefix-tuning adapter, which PEFT cannot hold beside "
                        "other adapters: give it alone")
    for name, path in adapters[1:]:
        model.load_adapter(path, adapter_name=name)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or first_path, **trust)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, [name for name, _ in adapters], run_config


def check_shapes(base: str | None, base_has_weights: bool, adapters: list[str], trust_remote_code: bool,
                 command: str = "generate") -> None:
    """Weights must have the shapes their configs give (a config.json or adapter_config.json edited or copied from
    another run would otherwise fail deep inside transformers or PEFT): compared on the meta device from the files'
    headers, before anything loads. A model that cannot be built on the meta device is left to the loaders."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.weights import WEIGHTS_NAME, first_shape_mismatch, indexed_weight_files, safetensors_shapes

    def meta_base():
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        return
    try:
        model = meta_base()
    except Exception:  # noqa: BLE001 -- remote code, an unknown architecture: the loader's own error will say
        return
    has_safetensors = indexed_weight_files(base) or os.path.isfile(os.path.join(base, WEIGHTS_NAME))
    if base_has_weights and has_safetensors:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        problem = first_shape_mismatch(safetensors_shapes(base), expected)
        if problem:
            raise UserError(f"{command}: the weights in {base} do not match its config.json: {problem}; restore the "
                            "config.json that was written with them")
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict

    for path in adapters:
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapted = get_peft_model(meta_base(), PeftConfig.from_pretrained(path))
                expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(adapted).items()}
        except Exception:  # noqa: BLE001 -- a config PEFT cannot apply: load_adapter_model reports it
            continue
        problem = first_shape_mismatch(safetensors_shapes(path, ["adapter_model.safetensors"]), expected)
        if problem:
            raise UserError(f"{command}: the adapter in {path} does not match its adapter_config.json: {problem}; "
                            "restore the adapter_config.json that was written with it (`trainer export RUN --to "
                            "adapter` writes both from a checkpoint)")


def _to_device(model):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    return device


def generate_all(model, tokenizer, texts: list[str], names: list[str], max_new_tokens: int, base_too: bool,
                 sampling: Sampling = Sampling()):
    """{adapter name (or "base"): [answer per prompt]}, switching the active adapter between runs; each starts from
    its own freshly seeded generator, so its sampled answers do not depend on which others ran before it."""
    from trainer.evaluate import greedy_generate

    device = _to_device(model)
    answers = {}
    if base_too or not names:
        context = model.disable_adapter() if names else contextlib.nullcontext()
        with context:
            answers["base"] = greedy_generate(model, tokenizer, texts, max_new_tokens, device, contextlib.nullcontext,
                                              **sampling.decoding())
    for name in names:
        model.set_adapter(name)
        answers[name] = greedy_generate(model, tokenizer, texts, max_new_tokens, device, contextlib.nullcontext,
                                        **sampling.decoding())
    return answers


def check_one_answerer(source: str, adapters: list[tuple[str, str]], base_too: bool) -> None:
    """--chat talks with one model: the source's own (adapter or model) or a single --adapter."""
    count = len(adapters) + is_adapter(final_dir(source))
    count += bool(base_too and count)
    if count > 1:
        raise UserError(f"generate: --chat talks with one model or adapter, got {count}: give the run dir alone or "
                        "one --adapter (and no --base-too)")


def chat(model, tokenizer, template, name: str | None, args: argparse.Namespace, sampling: Sampling,
         stdin=None, stdout=None) -> None:
    """Each input line is a user turn, answered with the whole conversation so far rendered in the template, then
    kept as the assistant's turn. The marker and notes go to a terminal only, so piped input gets just the answers."""
    from trainer.evaluate import greedy_generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    device = _to_device(model)
    if name:
        model.set_adapter(name)
    decoding = sampling.decoding()  # one generator for the session: a replayed conversation gets the same answers
    limit = getattr(model.config, "max_position_embeddings", None)
    history: list[tuple[str, str]] = []
    if interactive:
        sys.stderr.write(f"[trainer] chatting with {name or 'the model'}: /reset forgets the conversation, /exit or "
                         "Ctrl-D ends it\n")
    turn = 0
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            stdout.write("\n" if interactive and not line else "")
            return
        line = line.rstrip("\r\n")
        if line.strip() == "/reset":
            history.clear()
            if interactive:
                sys.stderr.write("[trainer] conversation cleared\n")
            continue
        if not line.strip():
            continue
        while True:
            text = render([Request(line, messages=(*history, ("user", line)))], template, tokenizer, args.system)[0]
            num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS
            if not history or limit is None or num_tokens + args.max_new_tokens <= limit:
                break
            del history[:2]  # the oldest exchange: the model cannot attend further back than its positions reach
            sys.stderr.write(f"[trainer] the conversation outgrew the model's {limit} positions: dropped its oldest "
                             "exchange\n")
        output = greedy_generate(model, tokenizer, [text], args.max_new_tokens, device, contextlib.nullcontext,
                                 **decoding)[0].strip()
        history += [("user", line), ("assistant", output)]
        if args.json:
            record = {"adapter": name or "base", "turn": turn, "prompt": line, "input": text, "output": output}
            stdout.write(json.dumps(record) + "\n")
        else:
            stdout.write(output + "\n")
        stdout.flush()
        turn += 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)  # prompts may come before or after the options
    if args.max_new_tokens < 1:
        raise UserError("generate: --max-new-tokens must be >= 1")
    sampling = read_sampling(args)
    if args.chat and (args.prompts or args.prompts_file):
        raise UserError("generate: --chat reads the conversation from stdin: drop the prompts and --prompts")
    if args.template == "none" and (args.chat or args.system is not None):
        raise UserError(f"generate: {'--chat' if args.chat else '--system'} needs a chat template to hold the "
                        "conversation: drop --template none")
    if not os.path.isdir(args.source):
        raise UserError(f"generate: {args.source!r} is not a model dir or run dir")
    final_dir(args.source)  # an unfinished run or truncated weights: one line now, before any library loads
    adapters = parse_adapters(args.adapter)
    if args.chat:
        check_one_answerer(args.source, adapters, args.base_too)
    requests = [] if args.chat else read_requests(args.prompts, args.prompts_file)
    model, tokenizer, names, run_config = load_models(args.source, adapters, args.trust_remote_code)
    template = choose_template(args.template, tokenizer, run_config)
    if template is None and (args.chat or args.system is not None):
        raise UserError(f"generate: {'--chat' if args.chat else '--system'} needs a chat template and {args.source} "
                        "has none (neither its run nor its tokenizer): give --template chatml, llama-3 or alpaca")
    if args.chat:
        chat(model, tokenizer, template, names[0] if names else None, args, sampling)
        return 0
    texts = render(requests, template, tokenizer, args.system)
    answers = generate_all(model, tokenizer, texts, names, args.max_new_tokens, args.base_too, sampling)
    for name, outputs in answers.items():
        for request, text, output in zip(requests, texts, outputs):
            if args.json:
                print(json.dumps({"adapter": name, "prompt": request.instruction, "input": text, "output": output}))
            else:
                print(f"[{name}] {request.instruction}\n{output}\n")
    sys.stdout.flush()
    return 0
