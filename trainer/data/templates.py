"""Prompt templates for instruction data, selectable by name (`data.template`)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Template:
    name: str
    with_input: str  # format string with {instruction} and {input}
    without_input: str  # format string with {instruction}

    def render_prompt(self, instruction: str, context: str = "") -> str:
        if context.strip():
            return self.with_input.format(instruction=instruction, input=context)
        return self.without_input.format(instruction=instruction)


TEMPLATES = {
    # The Alpaca section layout, without the long preamble (it costs ~40 tokens a sample and teaches nothing).
    "alpaca": Template(
        "alpaca",
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError("data.template", f"{name!r} is not one of {', '.join(TEMPLATES)}") from None
