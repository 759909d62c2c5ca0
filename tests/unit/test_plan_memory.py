"""Memory model (trainer.plan.memory, activations, table): the relationships users rely on, and cross-checks of the
formulas against what autograd and bitsandbytes really allocate on CPU (those need torch and skip without it)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
import yaml

from trainer.plan import (
    GIB,
    PlanInputs,
    choose_auto_strategy,
    count_parameters,
    count_trainable,
    estimate_memory,
    render_estimate,
    render_table,
    to_json,
    what_fits,
)
from trainer.plan.activations import (
    ActivationSetting,
    korthikanti_layer_bytes,
    layer_activation_bytes,
    logits_bytes,
    model_activation_bytes,
)
from trainer.plan.memory import frozen_weight_bytes
from trainer.plan.table import candidate_gpu_counts

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def arch(name: str) -> dict:
    with (CONF_MODEL / f"{name}.yaml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)["arch"]


def states(estimate) -> int:
    return estimate.weights + estimate.master_weights + estimate.gradients + estimate.optimizer


# ----- model states ---------------------------------------------------------------------------------------------------


def test_full_fine_tune_bytes_per_parameter():
    params = count_parameters(arch("llama-2-7b")).total
    single = estimate_memory(PlanInputs(arch("llama-2-7b")))
    assert states(single) == 18 * params  # fp32 weights + bf16 autocast copy + fp32 grads + Adam m, v
    zero1 = estimate_memory(PlanInputs(arch("llama-2-7b"), strategy="zero1"))
    assert states(zero1) == 16 * params  # DeepSpeed bf16: 2 + 2 + 12 (fp32 master, m, v)
    eight_bit = estimate_memory(PlanInputs(arch("llama-2-7b"), optimizer="adamw_8bit"))
    assert single.optimizer - eight_bit.optimizer == 6 * params


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_states_shrink_with_world_size(strategy):
    one = estimate_memory(PlanInputs(arch("llama-2-13b"), strategy=strategy))
    for gpus in (2, 8):
        many = estimate_memory(PlanInputs(arch("llama-2-13b"), strategy=strategy, gpus_per_node=gpus))
        assert states(many) == pytest.approx(states(one) / gpus, rel=1e-6)
        assert many.activations == one.activations  # data parallel: every GPU runs its own micro batch


def test_precision_names_and_frozen_base_dtype():
    lora = PlanInputs(arch("llama-2-7b"), peft_method="lora", precision="bf16")
    assert lora.precision == "bf16-mixed" and lora.resolved_weight_precision == "bf16"
    # trainer/model.py keeps a frozen base in fp32 under fp16; DeepSpeed builds everything in the compute dtype
    assert lora.replace(precision="fp16").resolved_weight_precision == "fp32"
    assert lora.replace(precision="fp16", strategy="zero2").resolved_weight_precision == "fp16"
    assert lora.replace(peft_method="qlora").resolved_weight_precision == "nf4"


def test_ddp_buckets_are_views_of_the_gradients():
    """trainer/strategy/ddp.py sets gradient_as_bucket_view=True: no second gradient copy (DDP_BUCKET_COPY)."""
    single = estimate_memory(PlanInputs(arch("llama-2-7b")))
    ddp = estimate_memory(PlanInputs(arch("llama-2-7b"), strategy="ddp", gpus_per_node=2))
    assert ddp.gradients == single.gradients


def test_fsdp_working_set_is_root_plus_two_layers():
    params = count_parameters(arch("llama-3.1-70b"))
    estimate = estimate_memory(PlanInputs(arch("llama-3.1-70b"), strategy="fsdp", gpus_per_node=8))
    root = params.embedding + params.final_norm + params.lm_head  # 2.1B: larger than a layer (0.86B)
    assert estimate.gathered == 2 * (root + 2 * params.per_layer) + 2 * root


def test_zero_stages_shard_progressively():
    totals = [states(estimate_memory(PlanInputs(arch("llama-2-7b"), strategy=s, gpus_per_node=8)))
              for s in ("ddp", "zero1", "zero2", "zero3")]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_offload_moves_optimizer_and_master_weights_to_host():
    base = PlanInputs(arch("llama-2-70b"), strategy="zero3", gpus_per_node=8)
    zero3, offload = estimate_memory(base), estimate_memory(base.replace(strategy="zero3_offload"))
    assert offload.optimizer == offload.master_weights == offload.gradients == offload.weights == 0
    assert offload.host_optimizer == zero3.optimizer and offload.host_master_weights == zero3.master_weights
    assert offload.host_total_per_node == 8 * offload.host_total_per_rank
    assert offload.total < zero3.total / 5


def test_qlora_weights_are_about_a_quarter_of_bf16():
    for name, ratio in (("llama-2-7b", 3.45), ("llama-2-70b", 3.75)):
        params = count_parameters(arch(name))
        bf16 = frozen_weight_bytes(params, "bf16", 2)
        # Embedding and lm_head stay bf16, so small models gain less than the 3.88x of the decoder linears.
        assert bf16 / frozen_weight_bytes(params, "nf4", 2) > ratio
        assert frozen_weight_bytes(params, "nf4", 2, double_quant=False) > frozen_weight_bytes(params, "nf4", 2)
    lora = estimate_memory(PlanInputs(arch("llama-2-70b"), peft_method="lora"))
    qlora = estimate_memory(PlanInputs(arch("llama-2-70b"), peft_method="qlora"))
    assert lora.weights / qlora.weights > 3.5


def test_mixtral_qlora_keeps_experts_in_bf16():
    qlora = estimate_memory(PlanInputs(arch("mixtral-8x7b"), peft_method="qlora"))
    assert qlora.weights > 80 * GIB  # 45B expert weights are not nn.Linear in transformers 5
    assert any("unquantised" in note for note in qlora.notes)


def test_70b_on_8x80gb():
    """Full fine-tuning of a 70B model needs offload on one 8x80 GB node; LoRA fits with fsdp."""
    base = PlanInputs(arch("llama-2-70b"), strategy="fsdp", gpus_per_node=8, seq_len=4096)
    assert not estimate_memory(base).fits(79)
    assert not estimate_memory(base.replace(strategy="zero3")).fits(79)
    offload = estimate_memory(base.replace(strategy="zero3_offload"))
    assert offload.fits(79) and offload.host_total_per_node > 1000 * GIB
    assert estimate_memory(base.replace(strategy="fsdp", peft_method="lora")).fits(79)
    assert not estimate_memory(base.replace(strategy="ddp", peft_method="lora")).fits(79)  # 138 GB of bf16 weights


# ----- activations and logits -----------------------------------------------------------------------------------------


def test_korthikanti_reference_formula():
    s, b, h, a = 2048, 1, 4096, 32
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)


def test_sdpa_removes_the_quadratic_attention_term():
    params = count_parameters(arch("llama-2-7b"))
    full = count_trainable(params, "none")
    sdpa, eager = ActivationSetting(2, "sdpa"), ActivationSetting(2, "eager")
    def layer(seq_len, setting):
        return layer_activation_bytes(params, full, seq_len, 1, setting)

    assert layer(4096, sdpa) == 2 * layer(2048, sdpa)
    quadratic = 2 * layer(2048, eager) - layer(4096, eager)
    # fp32 softmax output + its bf16 copy: 6*a*s^2*b at s=2048, doubled minus quadrupled
    assert -quadratic == 6 * 32 * (4096**2 - 2 * 2048**2)


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    params = count_parameters(arch("llama-3.1-8b"))
    full = count_trainable(params, "none")
    setting = ActivationSetting(2, "sdpa")
    layer = layer_activation_bytes(params, full, 4096, 2, setting)
    plain = model_activation_bytes(params, full, 4096, 2, setting, gradient_checkpointing=False)
    ckpt = model_activation_bytes(params, full, 4096, 2, setting, gradient_checkpointing=True)
    assert plain - ckpt == 31 * layer - 32 * 2 * 4096 * 2 * 4096
    # with a 128k vocabulary the logits outweigh every checkpointed layer input together
    assert logits_bytes(params, 4096, 2, setting) > 32 * 2 * 4096 * 2 * 4096


def test_chunked_loss_keeps_one_chunk_of_logits():
    """The trainer's loss (trainer/objectives/) holds chunk_tokens x V logits, not b x s x V; objective.chunk_tokens=0,
    prompt tuning and families the trainer does not chunk are planned unchunked, as they train."""
    params = count_parameters(arch("llama-3.1-8b"))
    chunked = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora", micro_batch_size=2))
    unchunked = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora", micro_batch_size=2,
                                           loss_chunk_tokens=0))
    assert unchunked.logits == 12 * 2 * 2048 * params.vocab_size  # 3 fp32 tensors of the logits' size
    assert chunked.logits == 12 * 256 * params.vocab_size  # the default chunk
    # the chunks recompute from the final hidden states, which are kept instead (bf16, b x s x h)
    assert chunked.activations - unchunked.activations == 2 * 2 * 2048 * params.hidden_size
    prompt = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="prompt_tuning", micro_batch_size=2))
    assert prompt.logits == 12 * 2 * (2048 + 20) * params.vocab_size
    small = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora", micro_batch_size=1, seq_len=128))
    assert small.logits == 12 * 128 * params.vocab_size  # never more than the tokens there are


def test_qlora_keeps_the_unquantised_weights_in_the_compute_dtype():
    """trainer/model.py does not upcast embeddings, norms and lm_head (peft's k-bit preparation would): 2 bytes per
    unquantised weight instead of 4, and 16-bit activations; upcast_unquantized plans the peft recipe."""
    params = count_parameters(arch("llama-3.1-8b"))
    unquantised = params.total - params.quantizable
    ours = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="qlora"))
    peft_recipe = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="qlora", upcast_unquantized=True))
    assert peft_recipe.weights - ours.weights == 2 * unquantised
    lora = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora"))
    assert ours.activations == lora.activations < peft_recipe.activations


def test_margin_is_ten_percent_of_what_a_step_allocates_plus_what_the_allocator_does_not_see():
    def margin_parts(**changes):
        estimate = estimate_memory(PlanInputs(arch("llama-2-7b"), peft_method="lora", **changes))
        within_step = estimate.gradients + estimate.gathered + estimate.activations + estimate.logits
        return estimate, estimate.margin - 0.1 * within_step

    single, fixed = margin_parts()
    assert fixed == pytest.approx(GIB / 2, abs=1)  # the CUDA context
    assert margin_parts(strategy="ddp", gpus_per_node=2)[1] == pytest.approx(GIB, abs=1)  # + NCCL's buffers
    assert margin_parts(strategy="zero2", gpus_per_node=2)[1] == pytest.approx(GIB + 5e8 * 2, abs=1)  # + reduce bucket
    # Weights allocated once take no share: QLoRA's 4-bit base is 8.9 GiB smaller, its margin the same.
    qlora = estimate_memory(PlanInputs(arch("llama-2-7b"), peft_method="qlora"))
    assert single.weights - qlora.weights > 8 * GIB and qlora.margin == single.margin


def test_the_peers_published_settings_are_planned_within_the_issues_targets():
    """Llama-3.1-8B on one GPU at torchtune's setting (2048 x 2, checkpointing, bf16) with the memory knobs, and
    Llama-2-70B QLoRA on 2 x 24 GB with FSDP2 CPU offload (docs/memory-planning.md, "Against the peers")."""
    torchtune = dict(seq_len=2048, micro_batch_size=2, gradient_checkpointing=True, activation_offloading=True)
    qlora = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="qlora", quantize_lm_head=True, **torchtune))
    lora = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora", embedding_on_host=True, **torchtune))
    offload = estimate_memory(PlanInputs(arch("llama-2-70b"), peft_method="qlora", strategy="fsdp_offload",
                                         gpus_per_node=2, seq_len=2048, micro_batch_size=1))
    assert qlora.total <= 8.0 * GIB and lora.total <= 17 * GIB and offload.total <= 20 * GIB


def test_an_embedding_on_the_host_leaves_the_gpu_and_is_refused_where_it_cannot_stay_there():
    on_gpu = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora"))
    on_host = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="lora", embedding_on_host=True))
    embedding = 128_256 * 4096 * 2  # bf16
    assert on_gpu.weights - on_host.weights == embedding == on_host.host_weights
    assert on_gpu.total - on_host.total == embedding and on_gpu.host_weights == 0
    qlora = estimate_memory(PlanInputs(arch("llama-3.1-8b"), peft_method="qlora", embedding_on_host=True))
    assert qlora.host_weights == embedding
    for name, changes in (("gemma-2-9b", {"peft_method": "lora"}),  # tied: lm_head needs it on the GPU
                          ("llama-3.1-8b", {"peft_method": "none"}),  # full fine-tuning trains it
                          ("llama-3.1-8b", {"peft_method": "lora", "strategy": "fsdp", "gpus_per_node": 2})):
        with pytest.raises(ValueError, match="train.embedding_on_host"):
            estimate_memory(PlanInputs(arch(name), embedding_on_host=True, **changes))


# ----- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"peft_method": "qlora", "weight_precision": "bf16"}, "nf4"),
        ({"weight_precision": "nf4"}, "full fine-tuning"),
        ({"strategy": "single", "gpus_per_node": 8}, "strategy=single"),
        ({"precision": "bf15"}, "precision"),
        ({"seq_len": 0}, "seq_len"),
        ({"peft_method": "adalora"}, "peft_method"),
    ],
)
def test_invalid_inputs_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        PlanInputs(arch("llama-2-7b"), **changes)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"strategy": "zero3_offload", "optimizer": "adamw_8bit", "gpus_per_node": 2}, "optimizer"),
        ({"strategy": "fsdp", "peft_method": "lora", "weight_precision": "int8", "gpus_per_node": 2}, "int8"),
        ({"strategy": "auto"}, "choose_auto_strategy"),
    ],
)
def test_impossible_combinations_are_refused(changes, key):
    with pytest.raises(ValueError, match=key):
        estimate_memory(PlanInputs(arch("llama-2-7b"), **changes))


# ----- what fits, auto, rendering -------------------------------------------------------------------------------------


def test_candidate_gpu_counts():
    assert candidate_gpu_counts(8) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert candidate_gpu_counts(1, 16) == [1, 2, 4, 8, 16]


def test_what_fits_table_and_recommendation():
    inputs = PlanInputs(arch("llama-2-70b"), strategy="fsdp", gpus_per_node=8, seq_len=4096)
    started = time.perf_counter()
    table = what_fits(inputs, gpu_memory_gib=79, host_memory_gib=1024)
    assert time.perf_counter() - started < 1.0
    assert len(table.cells) == 8 * 3
    cell = {(c.strategy, c.peft_method): c for c in table.cells}
    # 16 bytes/param over 16 GPUs is 64 GiB, plus activations and the gathered layers: it takes three nodes
    assert not cell["fsdp", "none"].fits and cell["fsdp", "none"].min_gpus == 24
    assert not cell["zero3_offload", "none"].fits  # 1.1 TiB of host state per node does not fit 1 TiB
    assert (table.recommendation.strategy, table.recommendation.peft_method) == ("fsdp", "lora")
    requested = what_fits(inputs.replace(peft_method="lora"), gpu_memory_gib=79)
    assert "requested" in requested.reason
    text = render_table(table, title="llama-2-70b")
    assert text.startswith("llama-2-70b (llama): 68,976,648,192 parameters")
    assert all(strategy in text for strategy in ("single", "ddp", "fsdp", "zero1", "zero2", "zero3_offload"))
    assert "recommendation: fsdp + lora" in text
    data = to_json(table)
    assert data["total_params"] == 68_976_648_192
    assert data["trainable_params"]["none"] == 68_976_648_192 and data["trainable_params"]["lora"] > 0
    entry = next(e for e in data["entries"] if (e["strategy"], e["peft_method"]) == ("fsdp", "lora"))
    assert entry["bytes_per_gpu"] == cell["fsdp", "lora"].estimate.total and entry["fits"]


def test_what_fits_shows_impossible_entries():
    inputs = PlanInputs(arch("llama-2-7b"), optimizer="paged_adamw_8bit")
    table = what_fits(inputs, gpu_memory_gib=24, gpus_per_node=2)
    offload = next(c for c in table.cells if c.strategy == "zero3_offload")
    assert offload.estimate is None and "CPU Adam" in offload.error
    assert "n/a" in render_table(table)


def test_auto_on_one_gpu_falls_back_to_lora_then_qlora():
    inputs = PlanInputs(arch("llama-2-70b"), strategy="auto")
    choice = choose_auto_strategy(inputs, gpu_memory_gib=79)
    assert (choice.strategy, choice.peft_method, choice.fits) == ("single", "qlora", True)
    assert "single + full" in choice.reason and "single + lora" in choice.reason
    small = choose_auto_strategy(PlanInputs(arch("llama-2-7b"), strategy="auto"), gpu_memory_gib=79)
    assert (small.strategy, small.peft_method) == ("single", "lora")


def test_auto_on_several_gpus_prefers_fsdp_then_offload():
    inputs = PlanInputs(arch("llama-2-70b"), strategy="auto", gpus_per_node=8, nodes=4)
    assert choose_auto_strategy(inputs, gpu_memory_gib=79).strategy == "fsdp"
    one_node = inputs.replace(nodes=1)
    assert choose_auto_strategy(one_node, gpu_memory_gib=79).strategy == "zero3_offload"
    no_room = choose_auto_strategy(one_node, gpu_memory_gib=79, host_memory_gib=512)
    assert (no_room.strategy, no_room.peft_method) == ("fsdp", "lora")


def test_render_estimate_shows_host_memory_for_offload():
    estimate = estimate_memory(PlanInputs(arch("llama-2-7b"), strategy="zero3_offload", gpus_per_node=2))
    text = render_estimate(estimate)
    assert "host (offload)" in text and "optimizer" in text


# ----- cross-checks against real tensors (torch, CPU) -----------------------------------------------------------------


def _saved_tensor_bytes(output, exclude) -> int:
    """Bytes of the distinct storages autograd keeps for backward, found by walking the graph."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    seen, stack, visited = {}, [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            # mm's mat2 is the weight (an autocast copy under autocast): weights are not activations
            is_weight = node.name() in ("MmBackward0", "AddmmBackward0") and attr == "_saved_mat2"
            if not attr.startswith("_saved_") or is_weight:
                continue
            with contextlib.suppress(RuntimeError):
                value = getattr(node, attr)
                for tensor in value if isinstance(value, (tuple, list)) else [value]:
                    if hasattr(tensor, "untyped_storage") and tensor.untyped_storage().data_ptr() not in skip:
                        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(seen.values())


ACTIVATION_CASES = [
    # model_type, attention, method, peft options, fp32 weights under autocast
    ("llama", "sdpa", "none", {}, False),
    ("llama", "eager", "none", {}, False),
    ("llama", "sdpa", "none", {}, True),
    ("llama", "sdpa", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}, False),
    ("llama", "sdpa", "lora", {"r": 8, "target_modules": "all-linear"}, True),
    ("llama", "eager", "lora", {"r": 8, "target_modules": "all-linear"}, True),
    ("llama", "sdpa", "ia3", {}, True),
    ("llama", "sdpa", "lora", {"r": 8, "target_modules": "all-linear", "lora_dropout": 0.05}, False),
    ("llama", "sdpa", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05}, True),
    ("qwen2", "sdpa", "none", {}, True),
    ("gemma", "sdpa", "none", {}, False),
    ("gemma2", "eager", "none", {}, False),
    ("phi3", "sdpa", "none", {}, False),
    ("mixtral", "sdpa", "none", {}, False),
    ("mixtral", "sdpa", "lora", {"r": 8, "target_modules": "all-linear"}, False),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("model_type", "attention", "method", "options", "autocast"), ACTIVATION_CASES)
def test_layer_activations_match_saved_tensors(model_type, attention, method, options, autocast):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    sizes = dict(vocab_size=128, hidden_size=128, intermediate_size=320, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attention)
    sizes |= {"head_dim": 48} if model_type.startswith("gemma") else {}
    sizes |= {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    # Full fine-tuning under autocast keeps fp32 weights; PEFT bases and the pure-bf16 strategies hold bf16.
    model = transformers.AutoModelForCausalLM.from_config(config).to(
        torch.float32 if autocast and method == "none" else torch.bfloat16
    )
    wrapped = model
    if method == "lora":
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**options), autocast_adapter_dtype=autocast)
    elif method == "ia3":
        wrapped = peft.get_peft_model(model, peft.IA3Config(), autocast_adapter_dtype=autocast)
    seq_len, batch = 48, 2  # batch*seq != hidden, so flattened activations never look like weights
    layer = model.model.layers[0]
    hidden = torch.randn(batch, seq_len, 128, dtype=next(model.parameters()).dtype, requires_grad=True)
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, -1)
    rotary = model.model.rotary_emb(hidden, positions)  # shared by all layers, so not a per-layer cost
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        output = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
    output = output[0] if isinstance(output, tuple) else output
    measured = _saved_tensor_bytes(output, [*wrapped.parameters(), *rotary])

    params = count_parameters(config.to_dict())
    dropout = options.get("lora_dropout", 0) > 0
    trainable = count_trainable(params, method, **{k: v for k, v in options.items() if k != "lora_dropout"})
    # CPU dropout keeps its mask in the dtype it runs in: fp32 after peft's cast under autocast, else bf16
    setting = ActivationSetting(2, attention, autocast, lora_dropout=dropout, dropout_mask_bytes=4 if autocast else 2)
    estimated = layer_activation_bytes(params, trainable, seq_len, batch, setting)
    assert estimated == pytest.approx(measured, rel=0.02)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("quant", "double_quant", "quantize_lm_head"),
                         [("nf4", True, False), ("nf4", False, False), ("int8", False, False), ("nf4", True, True)])
def test_quantized_bytes_match_bitsandbytes(tmp_path, quant, double_quant, quantize_lm_head):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    config = transformers.LlamaConfig(**sizes)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    if quant == "int8":
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    elif quantize_lm_head:  # the trainer's own QLoRA config, with peft.quantize_lm_head=true
        from trainer.config.peft_schema import QLoraConfig
        from trainer.model import quantization_config

        quantization = quantization_config(QLoraConfig(quantize_lm_head=True), "bf16")
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=double_quant,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu"
        )
    except Exception as error:  # an old bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantise on this machine: {error}")
    total = 0
    for parameter in model.parameters():
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
        if getattr(parameter, "SCB", None) is not None:
            total += parameter.SCB.numel() * parameter.SCB.element_size()
    assert type(model.lm_head).__name__ == ("Linear4bit" if quantize_lm_head else "Linear")
    assert frozen_weight_bytes(count_parameters(config.to_dict()), quant, 2, double_quant, quantize_lm_head) == total
