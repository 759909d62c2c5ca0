"""The chunked cross-entropy (trainer/objectives/) against the unchunked loss: the same loss and gradients in fp32
for every family's forward shape (tied embeddings, Gemma 2's soft-capping, MoE), masked and packed labels, PEFT
models (LoRA, lm_head adapted or saved whole, prompt tuning's fallback), evaluation; and the logits it no longer
keeps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trainer.data.encode import IGNORE_INDEX  # noqa: E402
from trainer.objectives.chunked_ce import token_loss_sum  # noqa: E402
from trainer.objectives.sft import SFTObjective  # noqa: E402
from trainer.replicas import shrink  # noqa: E402

REL = 1e-5  # fp32: the chunks' sum differs from one cross-entropy only in the order of additions


def tiny_model(family: str, vocab_size: int = 1000, **changes):
    config = {**shrink(family), "vocab_size": vocab_size, "pad_token_id": 0, **changes}
    config.pop("architectures", None)
    model_type = config.pop("model_type")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **config), dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    return model


def packed_batch(vocab_size: int, batch: int = 2, seq_len: int = 24):
    """Two rows, each two packed documents (position ids restart), with masked prompts: labels -100 on the first
    document's prompt and on every document's first token, as trainer/data/packing.py writes them."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (batch, seq_len))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # prompt
    labels[:, 13] = IGNORE_INDEX  # the second document's first token
    position_ids = torch.cat([torch.arange(13), torch.arange(seq_len - 13)]).repeat(batch, 1)
    return {"input_ids": input_ids, "position_ids": position_ids}, labels


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_as_unchunked(model, chunk_tokens: int = 7):
    vocab = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.vocab_size
    inputs, labels = packed_batch(vocab)
    objective = SFTObjective(model, chunk_tokens, log=lambda message: None)
    assert objective.unchunked_reason is None
    expected, expected_grads = loss_and_grads(model, lambda: token_loss_sum(model(**inputs).logits, labels))
    loss, grads = loss_and_grads(model, lambda: objective.loss_sum(model, inputs, labels))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=REL)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        # Relative to the tensor's largest entry: elements near zero carry the same absolute fp32 rounding.
        expected_grad = expected_grads[name]
        torch.testing.assert_close(grad, expected_grad, rtol=REL, atol=REL * expected_grad.abs().max().item(),
                                   msg=name)
    return grads


@pytest.mark.parametrize("family", ["llama-3.1", "llama-3.2", "gemma-2", "mixtral", "qwen2.5", "phi-3"])
def test_chunked_loss_and_gradients_equal_the_unchunked(family):
    """Full fine-tuning, so every gradient (lm_head, the hidden states' path into every layer) is compared.
    llama-3.2 and gemma-2 tie lm_head to the embedding; gemma-2 soft-caps its final logits."""
    model = tiny_model(family)
    grads = assert_same_as_unchunked(model)
    head = [n for n in grads if "lm_head" in n or "embed_tokens" in n]
    assert head  # the head's (or the tied embedding's) gradient is among those compared
    if family == "gemma-2":
        assert model.config.final_logit_softcapping == 30.0


def test_softcapping_is_applied_per_chunk():
    """Without the cap the chunks would give another loss: the cap is really in the chunked path."""
    model = tiny_model("gemma-2", final_logit_softcapping=1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits of several units, so that a cap of 1 changes the loss a lot
    inputs, labels = packed_batch(model.config.vocab_size)
    objective = SFTObjective(model, 5, log=lambda message: None)
    with torch.no_grad():
        capped = objective.loss_sum(model, inputs, labels)
        objective.softcap = None
        uncapped = objective.loss_sum(model, inputs, labels)
        expected = token_loss_sum(model(**inputs).logits, labels)
    assert capped.item() == pytest.approx(expected.item(), rel=REL)
    assert abs(uncapped.item() / expected.item() - 1) > 0.01


def test_every_label_masked_gives_zero_with_gradients_connected():
    model = tiny_model("llama-3.1")
    inputs, labels = packed_batch(model.config.vocab_size)
    labels[:] = IGNORE_INDEX
    loss = SFTObjective(model, 8, log=lambda message: None).loss_sum(model, inputs, labels)
    assert loss.item() == 0.0
    loss.backward()  # lm_head is in the graph (as in the unchunked loss), so DDP sees every parameter used
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_lm_head_projects_only_the_positions_that_predict_a_label(chunk_tokens):
    """Prompts, the documents' first tokens and the rows' last positions never reach lm_head; with one chunk (4096)
    its logits are not recomputed in backward, and both ways the loss and gradients are the unchunked ones."""
    model = tiny_model("llama-3.1")
    inputs, labels = packed_batch(model.config.vocab_size)
    rows_seen = []
    # (the model's own forward calls lm_head on no position at all: logits_to_keep is empty)
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0])
                                        if args[0].dim() == 2 else None)
    predicting = int((labels[:, 1:] != IGNORE_INDEX).sum())
    objective = SFTObjective(model, chunk_tokens, log=lambda message: None)
    objective.loss_sum(model, inputs, labels).backward()
    chunks = -(-predicting // chunk_tokens)
    # the forward's chunks, and in backward each chunk's recomputation when there is more than one
    expected = [min(chunk_tokens, predicting - i * chunk_tokens) for i in range(chunks)]
    assert sorted(rows_seen) == sorted(expected * 2 if chunks > 1 else expected)
    assert predicting < labels.numel() - 10  # the batch does have positions to skip
    model.zero_grad(set_to_none=True)
    assert_same_as_unchunked(model, chunk_tokens)


@pytest.mark.parametrize("modules_to_save,target_modules", [
    (None, ["q_proj", "v_proj"]),  # lm_head frozen: gradients of the adapters only
    (["lm_head"], ["q_proj", "v_proj"]),  # lm_head trained whole (ModulesToSaveWrapper)
    (None, ["q_proj", "v_proj", "lm_head"]),  # a LoRA adapter on lm_head itself
])
def test_peft_models_chunk_through_the_wrapped_lm_head(modules_to_save, target_modules):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama-3.1"), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, modules_to_save=modules_to_save,
        task_type="CAUSAL_LM"))
    grads = assert_same_as_unchunked(model)
    if modules_to_save or "lm_head" in target_modules:
        assert any("lm_head" in name for name in grads)


def test_prompt_tuning_falls_back_to_the_unchunked_loss():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama-3.1"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=4))
    objective = SFTObjective(model, 8, log=lambda message: None)
    assert "prompt" in objective.unchunked_reason
    assert "unchunked" in objective.describe()


def test_unknown_families_and_chunk_tokens_zero_fall_back():
    model = tiny_model("llama-3.1")
    assert SFTObjective(model, 0, log=lambda m: None).unchunked_reason == "objective.chunk_tokens=0"
    model.config.model_type = "granite"  # scales its logits after lm_head: its own forward must run
    assert "granite" in SFTObjective(model, 8, log=lambda m: None).unchunked_reason


def test_chunked_loss_never_holds_the_full_logits():
    """Tracked allocations of a forward + backward with a 128k vocabulary: the unchunked loss peaks with the
    b x s x V logits and their fp32 copies (12 bytes per logit), the chunked one with one chunk's."""
    from torch.profiler import ProfilerActivity, profile

    from tests.integration.plan_probe import allocation_peak

    model = tiny_model("llama-3.1", vocab_size=128256)
    inputs, labels = packed_batch(128256, batch=2, seq_len=256)
    objective = SFTObjective(model, 64, log=lambda message: None)
    logits_bytes = 2 * 256 * 128256 * 4

    def peak(compute) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            compute().backward()
        model.zero_grad(set_to_none=True)
        return allocation_peak(prof)[0]

    unchunked = peak(lambda: token_loss_sum(model(**inputs).logits, labels))
    chunked = peak(lambda: objective.loss_sum(model, inputs, labels))
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert unchunked > 3 * logits_bytes  # the logits, their log-softmax and its gradients, all b x s x V
    assert chunked < weights + 4 * logits_bytes * 64 / 512  # the lm_head gradient plus a few chunk-sized tensors


def test_evaluation_uses_the_objective():
    from types import SimpleNamespace

    from trainer.data.encode import EncodedSample
    from trainer.evaluate import evaluate_loss

    model = tiny_model("llama-3.1")
    torch.manual_seed(2)
    rows = [EncodedSample(input_ids=ids, labels=[IGNORE_INDEX] * 3 + ids[3:])
            for ids in torch.randint(3, 1000, (5, 17)).tolist()]
    strategy = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), autocast=torch.no_grad,
                               all_reduce_sum=lambda value: value)
    objective = SFTObjective(model, 6, log=lambda message: None)
    calls = []
    original = objective.final_hidden_states
    objective.final_hidden_states = lambda *args: calls.append(1) or original(*args)
    chunked = evaluate_loss(model, rows, strategy, 2, 0, objective=objective)
    unchunked = evaluate_loss(model, rows, strategy, 2, 0)
    assert calls  # the chunked path ran
    assert chunked["loss"] == pytest.approx(unchunked["loss"], rel=REL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_fused_loss_equals_the_chunked_one_on_cuda():
    """On CUDA with liger_kernel installed, objective.fused_kernel=auto takes Liger's fused linear cross-entropy for
    a plain lm_head; its loss and lm_head gradient equal the chunked path's (fp32)."""
    pytest.importorskip("liger_kernel")
    model = tiny_model("gemma-2").cuda()  # soft-capping and tied embeddings: the hardest case for the fused kernel
    inputs, labels = packed_batch(model.config.vocab_size)
    inputs, labels = {k: v.cuda() for k, v in inputs.items()}, labels.cuda()
    fused = SFTObjective(model, 7, "auto", log=lambda message: None)
    chunked = SFTObjective(model, 7, "none", log=lambda message: None)
    assert fused.fused is not None and chunked.fused is None
    expected, expected_grads = loss_and_grads(model, lambda: chunked.loss_sum(model, inputs, labels))
    loss, grads = loss_and_grads(model, lambda: fused.loss_sum(model, inputs, labels))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    head = "model.embed_tokens.weight"
    scale = expected_grads[head].abs().max().item()
    torch.testing.assert_close(grads[head], expected_grads[head], rtol=1e-3, atol=1e-3 * scale)
