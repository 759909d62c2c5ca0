"""Chat templates, and rendering a conversation into text segments that are trained on or not.

One masking rule serves every template, built-in or the tokenizer's own: for each assistant turn, render
the conversation before it with the generation prompt, then with the turn; the text the turn added is the
trained part, everything between turns is not. This holds for any template that renders a conversation by
appending turns, and it is checked on every record rather than assumed.

Each template writes the marker that ends an assistant turn (ChatML's <|im_end|>, Llama 3's <|eot_id|>,
the tokenizer's EOS for alpaca) inside the trained text, so the model learns where to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from trainer.data.formats import Example, Message, Sample
from trainer.errors import ConfigError, DataError

CONVERSATION_FORMATS = ("alpaca", "chat", "sharegpt", "preference")


class ChatTemplate(Protocol):
    name: str
    description: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str: ...


def _user_text(message: Message) -> str:
    """Chat templates have no slot for alpaca's `input`: it follows the instruction after a blank line."""
    return f"{message.content}\n\n{message.context}" if message.context.strip() else message.content


@dataclass(frozen=True)
class ChatMLTemplate:
    name: str = "chatml"
    description: str = "chatml (built-in)"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = "".join(f"<|im_start|>{m.role}\n{_user_text(m)}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class Llama3Template:
    name: str = "llama-3"
    description: str = "llama-3 (built-in)"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        # <|begin_of_text|> is the Llama 3 tokenizer's BOS, which encoding adds like any tokenizer's BOS.
        text = "".join(f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{_user_text(m)}<|eot_id|>" for m in messages)
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class AlpacaTemplate:
    """The Alpaca section layout, without the long preamble (it costs ~40 tokens a sample and teaches nothing)."""

    eos_token: str = ""  # written after each answer: alpaca has no end-of-turn marker of its own
    name: str = "alpaca"
    description: str = "alpaca (built-in)"

    def render_prompt(self, instruction: str, context: str = "") -> str:
        """A single-turn prompt, ready for the answer."""
        return self.render([Message("user", instruction, context=context)], add_generation_prompt=True)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        parts: list[str] = []
        previous = None
        for message in messages:
            separator = "\n\n" if previous == "assistant" else ""
            if message.role == "system":
                parts.append(f"{separator}{message.content}\n\n")
            elif message.role == "user":
                section = f"### Input:\n{message.context}\n\n" if message.context.strip() else ""
                parts.append(f"{separator}### Instruction:\n{message.content}\n\n{section}")
            else:
                parts.append(f"{separator}### Response:\n{message.content}{self.eos_token}")
            previous = message.role
        if add_generation_prompt:
            parts.append(("\n\n" if previous == "assistant" else "") + "### Response:\n")
        return "".join(parts)


class TokenizerTemplate:
    """The tokenizer's own chat template (its Jinja `chat_template`)."""

    name = "tokenizer"
    description = "the tokenizer's own chat template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        turns = [{"role": m.role, "content": _user_text(m)} for m in messages]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


BUILT_IN = {"chatml": ChatMLTemplate, "llama-3": Llama3Template, "alpaca": AlpacaTemplate}


def get_template(name: str) -> ChatTemplate:
    """A built-in template by name (without an EOS token: use `build_template` for training)."""
    try:
        return BUILT_IN[name]()
    except KeyError:
        from trainer.config.suggest import suggest_option

        close = suggest_option(name, list(BUILT_IN))
        raise ConfigError("data.template", f"{name!r} is not one of {', '.join(BUILT_IN)}"
                          + (f"; did you mean {close}?" if close else "")) from None


def build_template(name: str, tokenizer, formats: Sequence[str]) -> ChatTemplate | None:
    """The template for this run; None when no source holds conversations (text and completion use none).

    `auto` takes the tokenizer's own chat template when it has one, else alpaca for alpaca data and chatml for
    any other conversations."""
    if not any(fmt in CONVERSATION_FORMATS for fmt in formats):
        return None
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        name = "tokenizer" if has_own else ("alpaca" if set(formats) <= {"alpaca", "text", "completion"} else "chatml")
    if name == "tokenizer":
        if not has_own:
            raise ConfigError("data.template", "the tokenizer has no chat template of its own: choose chatml, llama-3 "
                              "or alpaca")
        return TokenizerTemplate(tokenizer)
    if name == "alpaca":
        return AlpacaTemplate(eos_token=tokenizer.eos_token or "")
    return get_template(name)


def _render(template: ChatTemplate, messages: Sequence[Message], add_generation_prompt: bool, example: Example) -> str:
    try:
        return template.render(messages, add_generation_prompt)
    except Exception as err:  # a Jinja template's raise_exception(), or any error inside the template
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(example.path, example.line, f"the chat template rejected this conversation: {message} "
                        "(expected a conversation the template accepts, or another data.template)") from None


def render_example(example: Example, template: ChatTemplate | None, bos_token: str | None = None) -> Sample:
    """Segments with their trained flags, plus the generation prompt and reference answer."""
    if not example.messages:
        trained = [text for text, trainable in example.raw if trainable]
        prompt = "".join(text for text, trainable in example.raw[:-1]) if len(example.raw) > 1 else ""
        return Sample(example.raw, example.path, example.line, prompt, trained[-1] if trained else "")
    segments: list[tuple[str, bool]] = []
    done = ""
    last_prompt = ""
    for index, message in enumerate(example.messages):
        if message.role != "assistant" or index == 0:  # an opening assistant turn is part of the next prompt
            continue
        prompt = _render(template, example.messages[:index], True, example)
        full = _render(template, example.messages[:index + 1], False, example)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(example.path, example.line, f"template {template.name!r} does not render this "
                            "conversation turn by turn, so trained tokens cannot be told apart (expected each turn to "
                            "extend the text before it; choose data.template=chatml, llama-3 or alpaca)")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], message.trainable))
        done, last_prompt = full, prompt
    if bos_token and last_prompt.startswith(bos_token):
        last_prompt = last_prompt[len(bos_token):]  # generation adds BOS itself
    reference = [m.content for m in example.messages if m.role == "assistant"][-1]
    return Sample(tuple((text, trained) for text, trained in segments if text), example.path, example.line,
                  last_prompt, reference)
