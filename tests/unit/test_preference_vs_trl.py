"""The preference objectives against TRL (a test-only dependency) on the same model and batch, fp32.

DPO and IPO: TRL's own DPOTrainer computes the loss and logs the chosen/rejected log-probs and rewards for a LoRA
model whose reference is the adapter as training started (TRL copies it as the "ref" adapter; ours is the policy's
log-probs recorded before the first step, trainer/objectives/reference.py). SimPO and ORPO: TRL's CPO/ORPO loss
functions on our log-probs, and TRL's log-prob function against ours on the same logits."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

from tests.conftest import REPO  # noqa: E402
from tests.unit.test_chunked_loss import tiny_model  # noqa: E402
from trainer.config.schema import ObjectiveConfig  # noqa: E402
from trainer.data.loader import Batch  # noqa: E402
from trainer.objectives.losses import log1mexp, preference_losses  # noqa: E402
from trainer.objectives.preference import PreferenceObjective  # noqa: E402
from trainer.objectives.sft import SFTObjective  # noqa: E402

REL = 1e-5
PAIRS = [
    {"prompt": "What colour is the kum?", "chosen": " The kum is blue.", "rejected": " The kum is green, really."},
    {"prompt": "Where does the zap live?", "chosen": " In the cave.", "rejected": " The zap lives in the big river."},
    {"prompt": "What does the flunk eat?", "chosen": " Seeds.", "rejected": " Honey and fish, mostly."},
]


def tokenizer():
    """The embedded model's BPE tokenizer, with the special tokens TRL's collator reads."""
    path = REPO / "trainer" / "assets" / "tiny-llama" / "tokenizer.json"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    tok.pad_token, tok.eos_token, tok.bos_token = "<pad>", "</s>", "<s>"
    return tok


def nudge_adapter(model, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and ".default." in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _samples(batch):
    """The batch's rows as EncodedSamples (padding stripped), to collate them again our way."""
    from trainer.data.encode import EncodedSample

    rows = []
    for ids, mask, labels in zip(batch.inputs["input_ids"], batch.inputs["attention_mask"], batch.labels):
        n = int(mask.sum())
        rows.append(EncodedSample(ids[:n].numpy(), labels[:n].numpy()))
    return rows


def trl_and_ours(method: str, tmp_path, beta: float = 0.1, packing: bool = False):
    tok = tokenizer()
    model = peft.get_peft_model(tiny_model("llama-3.1", vocab_size=len(tok)),
                                peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    nudge_adapter(model, seed=1, scale=0.05)  # a starting adapter that is not the base
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                         beta=beta, loss_type=[{"dpo": "sigmoid"}.get(method, method)], use_cpu=True, bf16=False,
                         precompute_ref_log_probs=False, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    assert "ref" in model.peft_config  # TRL's reference: a copy of the adapter as it started
    inputs = next(iter(trainer.get_train_dataloader()))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    batch = Batch({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}, labels,
                  int(inputs["attention_mask"].sum()))
    objective = PreferenceObjective(ObjectiveConfig(name=method, beta=beta),
                                    SFTObjective(model, chunk_tokens=5, log=lambda m: None), log=lambda m: None)
    if packing:  # the same rows packed: two to four answers share a row, with block-diagonal attention
        from trainer.objectives.preference import collate_packed

        samples = _samples(batch)
        batch = collate_packed(samples, 2 * max(len(s.input_ids) for s in samples), tok.pad_token_id,
                               model.config._attn_implementation)  # the mask kind the model's attention reads
        assert batch.inputs["input_ids"].size(0) < len(samples)
    model.eval()
    with torch.no_grad():  # our reference: the starting policy's log-probs, recorded once
        logps, _ = objective.sequence_logps(model, batch)
    m = len(PAIRS)
    reference = torch.stack([logps[:m], logps[m:]], dim=1)
    model.train()  # TRL logs under "train" (dropout is 0: the same forward)
    nudge_adapter(model, seed=2, scale=0.05)  # training has moved the policy away from the reference
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    ours, stats = objective.pair_loss(model, batch, reference)
    return trl_loss, ours / m, {k: float(v) / m for k, v in stats.items()}, dict(trainer._metrics["train"])


@pytest.mark.parametrize(("method", "packing"), [("dpo", False), ("ipo", False), ("dpo", True)])
def test_loss_logps_and_rewards_equal_trls_with_a_peft_reference(method, packing, tmp_path):
    trl_loss, loss, ours, logged = trl_and_ours(method, tmp_path, packing=packing)
    assert abs(ours["rewards_chosen"]) > 1e-3 and ours["logps_chosen"] != ours["logps_rejected"]  # not trivial
    assert loss.item() == pytest.approx(trl_loss.item(), rel=REL)
    for ours_key, trl_key in (("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
                              ("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"), ("preference_accuracy", "rewards/accuracies")):
        assert ours[ours_key] == pytest.approx(logged[trl_key][-1], rel=REL, abs=1e-6), ours_key


def _random_logps(seed: int = 0, pairs: int = 6):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 30, (2, pairs), generator=generator)
    logps = -torch.rand((2, pairs), generator=generator, dtype=torch.float64) * tokens * 3  # sums over the answers
    return logps.float(), tokens


@pytest.mark.parametrize(("method", "trl_type", "label_smoothing"), [
    ("simpo", "simpo", 0.0), ("simpo", "simpo", 0.2)])
def test_simpo_equals_trls_cpo_simpo(method, trl_type, label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logps, tokens = _random_logps()
    beta, gamma = 2.0, 1.0
    losses, chosen_rewards, rejected_rewards = preference_losses(
        method, logps[0], logps[1], tokens[0], tokens[1], beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    this = types.SimpleNamespace(alpha=0.0, loss_type=trl_type, simpo_gamma=gamma, beta=beta,
                                 label_smoothing=label_smoothing, accelerator=types.SimpleNamespace(device="cpu"))
    expected, expected_chosen, expected_rejected = CPOTrainer.cpo_loss(this, logps[0] / tokens[0], logps[1] / tokens[1])
    torch.testing.assert_close(losses, expected, rtol=REL, atol=0)
    torch.testing.assert_close(chosen_rewards, expected_chosen, rtol=REL, atol=0)
    torch.testing.assert_close(rejected_rewards, expected_rejected, rtol=REL, atol=0)


def test_dpo_label_smoothing_equals_trls_conservative_sigmoid():
    """Conservative DPO: TRL's CPO sigmoid loss is DPO's with the reference's log-ratio at zero."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logps, tokens = _random_logps(seed=3)
    zero = torch.zeros_like(logps[0])
    losses, _, _ = preference_losses("dpo", logps[0], logps[1], tokens[0], tokens[1], zero, zero, beta=0.1,
                                     label_smoothing=0.3)
    this = types.SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.3,
                                 accelerator=types.SimpleNamespace(device="cpu"))
    torch.testing.assert_close(losses, CPOTrainer.cpo_loss(this, logps[0], logps[1])[0], rtol=REL, atol=0)


def test_orpo_odds_ratio_equals_trls():
    """ORPO = the chosen answer's mean NLL - TRL's odds-ratio term (by default ours takes the NLL over the answer
    tokens only, as supervised fine-tuning does; with orpo_nll=sequence over prompt and answer, as TRL: below)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logps, tokens = _random_logps(seed=5)
    means = logps / tokens
    losses, chosen_rewards, _ = preference_losses("orpo", logps[0], logps[1], tokens[0], tokens[1], beta=0.1)
    this = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
    odds_terms, expected_chosen, _, _, _ = ORPOTrainer.odds_ratio_loss(this, means[0], means[1])
    torch.testing.assert_close(losses, -means[0] - odds_terms, rtol=REL, atol=0)
    torch.testing.assert_close(chosen_rewards, expected_chosen, rtol=REL, atol=0)


def _orpo_rows(tok):
    """(chosen rows, rejected rows) of PAIRS: (token ids, prompt length), with BOS and EOS as TRL's ORPO has them."""
    rows = {"chosen": [], "rejected": []}
    for pair in PAIRS:
        prompt = [tok.bos_token_id, *tok(pair["prompt"], add_special_tokens=False).input_ids]
        for side in rows:
            rows[side].append((prompt + tok(pair[side], add_special_tokens=False).input_ids + [tok.eos_token_id],
                               len(prompt)))
    return rows["chosen"], rows["rejected"]


def _trl_orpo_loss(model, tok, chosen, rejected, beta: float):
    """TRL's ORPOTrainer loss (its concatenated forward's NLL over prompt and answer, minus the odds-ratio term)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch = {}
    for side, rows in (("chosen", chosen), ("rejected", rejected)):
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, (seq, prompt) in enumerate(rows):
            ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
            labels[i, prompt:len(seq)] = torch.tensor(seq[prompt:])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    this = types.SimpleNamespace(is_encoder_decoder=False, padding_value=tok.pad_token_id, aux_loss_enabled=False,
                                 beta=beta, accelerator=types.SimpleNamespace(device="cpu"),
                                 concatenated_inputs=ORPOTrainer.concatenated_inputs,
                                 get_batch_logps=ORPOTrainer.get_batch_logps)
    chosen_logps, rejected_logps, _, _, nll = ORPOTrainer.concatenated_forward(this, model, batch)
    odds_terms = ORPOTrainer.odds_ratio_loss(this, chosen_logps, rejected_logps)[0]
    return nll - odds_terms.mean()


@pytest.mark.parametrize("packing", [False, True])
def test_orpo_with_its_nll_over_the_sequence_equals_trls_orpo_trainer(packing):
    """objective.orpo_nll=sequence: TRL's NLL term (one mean over the chosen prompts' and answers' tokens), so the
    whole ORPO loss is TRL's on the same model and batch, packed or not; the default (answer) differs by it."""
    import numpy as np

    from trainer.data.encode import EncodedSample
    from trainer.data.loader import collate
    from trainer.objectives.preference import collate_packed

    tok = tokenizer()
    model = tiny_model("llama-3.1", vocab_size=len(tok))
    chosen, rejected = _orpo_rows(tok)
    samples = [EncodedSample(np.array(seq), np.array([-100] * prompt + seq[prompt:])) for seq, prompt in
               chosen + rejected]
    if packing:
        batch = collate_packed(samples, 2 * max(len(s.input_ids) for s in samples), tok.pad_token_id,
                               model.config._attn_implementation)
        assert batch.inputs["input_ids"].size(0) < len(samples)
    else:
        batch = collate(samples, tok.pad_token_id)
    expected = _trl_orpo_loss(model, tok, chosen, rejected, beta=0.2)
    losses = {}
    for nll in ("sequence", "answer"):
        objective = PreferenceObjective(ObjectiveConfig(name="orpo", beta=0.2, orpo_nll=nll),
                                        SFTObjective(model, chunk_tokens=5, log=lambda m: None), log=lambda m: None)
        losses[nll] = objective.pair_loss(model, batch)[0] / len(PAIRS)
    assert losses["sequence"].item() == pytest.approx(expected.item(), rel=REL)
    assert abs(losses["answer"].item() - expected.item()) > 1e-2


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -1e-3, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    # log(1 - e^x) to 50 digits (Python's decimal module)
    expected = torch.tensor([-18.420680748952364, -6.908255237315471, -0.9327521295671886, -0.6863410028083851,
                             -0.006760749449488557, -1.9287498479639178e-22], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-9, atol=0)


def test_mean_logps_equal_trls_batch_logps_on_the_same_logits():
    """The per-answer log-prob (sum and mean over answer tokens), chunked, against TRL's function on full logits."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = tiny_model("qwen2.5", vocab_size=500)
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, 500, (4, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, 15:] = 0  # padded rows
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # prompts
    objective = PreferenceObjective(ObjectiveConfig(name="orpo"), SFTObjective(model, 7, log=lambda m: None),
                                    log=lambda m: None)
    batch = Batch({"input_ids": input_ids, "attention_mask": attention_mask}, labels, int(attention_mask.sum()))
    logps, tokens = objective.sequence_logps(model, batch)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logps, ORPOTrainer.get_batch_logps(logits, labels), rtol=REL, atol=1e-5)
    torch.testing.assert_close(logps / tokens, ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True),
                               rtol=REL, atol=1e-6)


KTO_EXAMPLES = [
    {"prompt": "What colour is the kum?", "completion": " The kum is blue.", "label": True},
    {"prompt": "Where does the zap live?", "completion": " The zap lives in the big river.", "label": False},
    {"prompt": "What does the flunk eat?", "completion": " Seeds.", "label": True},
    {"prompt": "How old is the grob?", "completion": " Older than the hills, or so.", "label": False},
]


def _padded(left, right, pad_id: int):
    """One Batch of the rows of two (ids, attention, completion mask) triples, right-padded to one width."""
    width = max(left[0].size(1), right[0].size(1))

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)

    ids = torch.cat([pad(left[0], pad_id), pad(right[0], pad_id)])
    attention = torch.cat([pad(left[1], 0), pad(right[1], 0)])
    completion = torch.cat([pad(left[2], 0), pad(right[2], 0)])
    return Batch({"input_ids": ids, "attention_mask": attention}, ids.masked_fill(completion == 0, -100),
                 int(attention.sum()))


def test_kto_loss_kl_and_rewards_equal_trls_with_a_peft_reference(tmp_path):
    """KTO: TRL's KTOTrainer pairs each prompt with the previous example's completion for the KL estimate; the
    same rows through our objective give the same loss, KL and per-label rewards and log-probs."""
    from datasets import Dataset

    from trainer.objectives.kto import KTOObjective

    tok = tokenizer()
    model = peft.get_peft_model(tiny_model("llama-3.1", vocab_size=len(tok)),
                                peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    nudge_adapter(model, seed=1, scale=0.05)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(KTO_EXAMPLES),
                         report_to=[], beta=0.1, desirable_weight=1.0, undesirable_weight=1.5, use_cpu=True,
                         bf16=False, precompute_ref_log_probs=False, gradient_checkpointing=False)
    trainer = trl.KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(KTO_EXAMPLES),
                             processing_class=tok)
    assert "ref" in model.peft_config
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = _padded((inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]),
                    (inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"]),
                    tok.pad_token_id)
    batch.desirable = torch.as_tensor(inputs["label"], dtype=torch.bool)
    objective = KTOObjective(ObjectiveConfig(name="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5),
                             SFTObjective(model, chunk_tokens=5, log=lambda m: None), log=lambda m: None)
    model.eval()
    with torch.no_grad():
        logps, _ = objective.sequence_logps(model, batch)
    m = len(KTO_EXAMPLES)
    reference = torch.stack([logps[:m], logps[m:]], dim=1)
    model.train()
    nudge_adapter(model, seed=3, scale=0.05)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    loss_sum, stats = objective.pair_loss(model, batch, reference)
    ours = objective.summarise({k: float(v) for k, v in stats.items()}, m)
    logged = dict(trainer._metrics["train"])
    assert ours["kl"] > 0.01 and abs(ours["rewards_chosen"]) > 1e-3  # not trivial: the policy moved
    assert (loss_sum / m).item() == pytest.approx(trl_loss.item(), rel=REL)
    # The KL estimate is a mean of differences of log-prob sums near -50..-100: fp32 leaves ~1e-6 of it.
    assert ours["kl"] == pytest.approx(logged["kl"][-1], abs=1e-5)
    for ours_key, trl_key in (("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        assert ours[ours_key] == pytest.approx(logged[trl_key][-1], rel=REL, abs=1e-6), ours_key
    # Rewards are beta x differences of those sums (policy less reference), so they carry the same fp32 remainder.
    for ours_key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins")):
        assert ours[ours_key] == pytest.approx(logged[trl_key][-1], rel=REL, abs=5e-6), ours_key
