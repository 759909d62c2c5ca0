"""The built-in chat templates (trainer/data/templates.py) as Jinja chat templates, for inference engines.

A served adapter must see its prompts laid out as in training. Engines (llama.cpp's server, vLLM) render chat
requests with a Jinja template in the Hugging Face convention, so a run trained with the built-in alpaca, chatml or
llama-3 layout is served with the Jinja form written here; tests/unit/test_jinja_templates.py renders both forms
of many conversations and compares them character for character.

The engines do not add BOS to a rendered chat prompt (the template is expected to), while our encoding puts the
tokenizer's BOS first: so the Jinja form starts with {{ bos_token }} when the tokenizer has one.
"""

from __future__ import annotations

import json

from trainer.data.templates import AlpacaTemplate, ChatMLTemplate, Llama3Template, TokenizerTemplate


def _literal(text: str) -> str:
    """A Jinja string literal for `text` (JSON's escaping is a subset Jinja reads)."""
    return json.dumps(text)


_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] "
           "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def _alpaca(eos_token: str) -> str:
    # The separator before a turn that follows an answer, as AlpacaTemplate.render writes it.
    return ("{% set ns = namespace(previous='') %}{% for m in messages %}"
            "{% set sep = '\\n\\n' if ns.previous == 'assistant' else '' %}"
            "{% if m['role'] == 'system' %}{{ sep + m['content'] + '\\n\\n' }}"
            "{% elif m['role'] == 'user' %}{{ sep + '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
            "{% else %}{{ sep + '### Response:\\n' + m['content'] + " + _literal(eos_token) + " }}{% endif %}"
            "{% set ns.previous = m['role'] %}{% endfor %}"
            "{% if add_generation_prompt %}{{ ('\\n\\n' if ns.previous == 'assistant' else '') + '### Response:\\n' }}"
            "{% endif %}")


def as_jinja(template, bos_token: str | None) -> str | None:
    """The Jinja chat template that renders like `template` (None: no template, raw text)."""
    if template is None:
        return None
    if isinstance(template, TokenizerTemplate):
        return template.tokenizer.chat_template
    if isinstance(template, AlpacaTemplate):
        body = _alpaca(template.eos_token)
    elif isinstance(template, ChatMLTemplate):
        body = _CHATML
    elif isinstance(template, Llama3Template):
        body = _LLAMA3
    else:
        raise TypeError(f"no Jinja form for template {template!r}")
    return ("{{ bos_token }}" if bos_token else "") + body
