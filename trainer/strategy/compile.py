"""`train.compile=true`: torch.compile each decoder layer, in place.

Per layer rather than the whole model: every layer has the same code, so one compiled graph serves them all (the
compile time is one layer's, not the depth's); the loss (trainer/objectives/), hooks on the decoder, PEFT's wrappers
and FSDP2's per-layer sharding stay outside the compiled code, and `Module.compile` keeps the module and its
parameter names as they were, so checkpoints are the same with and without it. Rows of varying length cost one
more compile, with dynamic shapes, the first time a second length is seen.
"""

from __future__ import annotations


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer of `model` in place (the first forward compiles); how many there are."""
    from trainer.strategy.fsdp import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
