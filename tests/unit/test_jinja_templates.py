"""The Jinja forms of the built-in chat templates render every conversation exactly as training laid it out.

Rendered with the sandboxed Jinja environment and options inference engines use (llama-cpp-python's server and
Hugging Face's apply_chat_template: trim_blocks, lstrip_blocks), so a served adapter sees its training layout.
"""

from __future__ import annotations

import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trainer.data.formats import Message
from trainer.data.jinja_templates import as_jinja
from trainer.data.templates import AlpacaTemplate, ChatMLTemplate, Llama3Template

CONVERSATIONS = [
    [("user", "Where does the flunk live?")],
    [("system", "Answer briefly."), ("user", "a\nb"), ("assistant", "c"), ("user", "d 'quoted' {{ braces }}")],
    [("user", "q"), ("assistant", "a")],
    [("system", "s"), ("user", "q"), ("assistant", "a\n\nb"), ("user", "q2"), ("assistant", "a2")],
]


@pytest.mark.parametrize("template", [AlpacaTemplate(eos_token="</s>"), AlpacaTemplate(eos_token=""),
                                      ChatMLTemplate(), Llama3Template()], ids=lambda t: f"{t.name}")
@pytest.mark.parametrize("bos", ["<s>", None])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_jinja_form_renders_like_the_template(template, bos, generation_prompt):
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    jinja = environment.from_string(as_jinja(template, bos))
    for conversation in CONVERSATIONS:
        ours = (bos or "") + template.render([Message(role, text) for role, text in conversation], generation_prompt)
        theirs = jinja.render(messages=[{"role": role, "content": text} for role, text in conversation],
                              bos_token=bos or "", eos_token="</s>", add_generation_prompt=generation_prompt)
        assert theirs == ours, conversation


def test_no_template_has_no_jinja_form():
    assert as_jinja(None, "<s>") is None
