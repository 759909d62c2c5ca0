"""Evaluation: token-level loss and perplexity on the validation split, and generation metrics.

Every rank evaluates its share and the sums are reduced, so sharded models (where every rank must run
the same forwards) work too: generation runs a fixed number of greedy steps on equally many batches.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

from trainer.data.encode import EncodedSample
from trainer.data.formats import Sample
from trainer.data.loader import collate
from trainer.objectives.chunked_ce import token_loss_sum  # noqa: F401  (the unchunked loss; tests import it here)


def _rank_share(items: list, rank: int, world_size: int, batch_size: int) -> list[list]:
    """This rank's batches; every rank gets the same number of batches (some may be empty)."""
    mine = items[rank::world_size]
    num_batches = math.ceil(math.ceil(len(items) / world_size) / batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


def evaluate_loss(model, rows: list[EncodedSample], strategy, batch_size: int, pad_id: int,
                  max_batches: int = 0, objective=None, check=None) -> dict:
    """Mean token loss and perplexity; `objective` computes the loss as training does (chunked), else unchunked.
    `check()` runs before every batch on every rank (the same number of times on each) and may raise to stop the
    evaluation, e.g. `PreemptionWatcher.check`."""
    import torch

    if not rows:
        return {}
    batches = _rank_share(rows, strategy.rank, strategy.world_size, batch_size)
    if max_batches:
        batches = batches[:max_batches]
    loss_sum, num_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch_rows in batches:
                if check is not None:
                    check()
                padding_batch = not batch_rows  # a rank with nothing left still runs a forward (ranks in lockstep)
                batch_rows = batch_rows or rows[:1]
                batch = collate(batch_rows, pad_id).to(strategy.device)
                if objective is not None:
                    batch_loss = objective.loss_sum(model, batch.inputs, batch.labels, strategy.autocast)
                else:
                    with strategy.autocast():
                        logits = model(**batch.inputs).logits
                    batch_loss = token_loss_sum(logits, batch.labels)
                if not padding_batch:
                    loss_sum += float(batch_loss)
                    num_tokens += sum(row.num_label_tokens for row in batch_rows)
    finally:
        model.train(was_training)
    loss_sum = strategy.all_reduce_sum(loss_sum)
    num_tokens = strategy.all_reduce_sum(num_tokens)
    loss = loss_sum / max(num_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_pairs(model, objective, pairs: list, reference, strategy, batch_size: int, pad_id: int, attention: str,
                   max_batches: int = 0, check=None) -> dict:
    """Preference metrics on validation pairs (trainer/objectives/preference.py, kto.py): the objective's loss,
    preference accuracy, reward margin and the chosen/rejected rewards and log-probs, as the objective summarises
    them. Ranks run the same number of batches, as in `evaluate_loss`."""
    import torch

    indices = list(range(len(pairs)))
    batches = _rank_share(indices, strategy.rank, strategy.world_size, batch_size)
    if max_batches:
        batches = batches[:max_batches]
    sums: dict[str, float] = {}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch_indices in batches:
                if check is not None:
                    check()
                padding_batch = not batch_indices
                batch_indices = batch_indices or [0]
                batch = objective.collate([pairs[i] for i in batch_indices], pad_id, attention).to(strategy.device)
                refs = reference[batch_indices] if reference is not None else None
                loss, stats = objective.pair_loss(model, batch, refs, strategy.autocast, padding=padding_batch)
                if not padding_batch:
                    count += len(batch_indices)
                    for key, value in {"preference_loss": loss, **stats}.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
    finally:
        model.train(was_training)
    count = strategy.all_reduce_sum(count)
    reduced = {key: strategy.all_reduce_sum(sums.get(key, 0.0)) for key in ("preference_loss", *objective.stat_names)}
    return {"preference_loss": reduced["preference_loss"] / max(count, 1), **objective.summarise(reduced, count)}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def top_p_filter(probs, top_p: float):
    """`probs` (rows of a distribution) with every token outside the nucleus zeroed: the smallest set of most likely
    tokens whose probability adds up to top_p (never less than the top token). Not renormalised: sampling does not
    need it."""
    import torch

    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # stable: ties keep the first id
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
    return torch.where(keep, probs, torch.zeros_like(probs))


def _sample_next(logits, temperature: float, top_p: float, generator):
    """One token per row from softmax(logits / temperature), restricted to the top-p nucleus. With a generator the
    draw happens on its device (a CPU one: the same draws whichever device decodes)."""
    import torch

    # log-probabilities are <= 0, so a tiny temperature drives them to -inf (greedy), never to inf - inf = nan
    probs = top_p_filter(torch.softmax(torch.log_softmax(logits.float(), dim=-1) / temperature, dim=-1), top_p)
    if generator is not None:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)
    return torch.multinomial(probs, 1)[:, 0]


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device, autocast, *,
                    temperature: float = 0.0, top_p: float = 1.0, generator=None) -> list[str]:
    """Greedy decoding for exactly max_new_tokens steps (fixed count keeps sharded ranks in lockstep); with
    temperature > 0 each token is sampled instead (top_p: nucleus sampling; generator: a seeded torch.Generator)."""
    import torch

    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        encoded.append(([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids)
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded], device=device)  # left pad
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated, past = [], None
    step_ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            with autocast():
                out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
            next_ids = logits.argmax(-1) if temperature <= 0 else _sample_next(logits, temperature, top_p, generator)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            generated.append(next_ids)
            finished |= next_ids == tokenizer.eos_token_id
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    tokens = torch.stack(generated, dim=1).tolist()
    texts = []
    for row in tokens:
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def generation_metrics(model, tokenizer, samples: list[Sample], strategy, max_new_tokens: int,
                       batch_size: int = 16, check=None,
                       metrics=("exact_match", "token_f1")) -> tuple[dict, list[dict]]:
    """`metrics` (trainer/text_metrics.py) of greedy answers against the references; also returns a few examples.
    Every rank answers its share; the answers are gathered so that corpus statistics (BLEU) see them all."""
    from trainer.text_metrics import score_answers

    if not samples:
        return {}, []
    was_training = model.training
    model.eval()
    pairs, examples = [], []
    try:
        for batch in _rank_share(samples, strategy.rank, strategy.world_size, batch_size):
            if check is not None:
                check()
            prompts = [s.prompt for s in batch] or [samples[0].prompt]
            answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, strategy.device, strategy.autocast)
            for sample, answer in zip(batch, answers):
                pairs.append((answer, sample.reference))
                if len(examples) < 3:
                    examples.append({"prompt": sample.prompt, "reference": sample.reference, "answer": answer})
    finally:
        model.train(was_training)
    if strategy.world_size > 1:
        import torch.distributed as dist

        gathered = [None] * strategy.world_size
        dist.all_gather_object(gathered, pairs)
        pairs = [pair for share in gathered for pair in share]
    return score_answers([a for a, _ in pairs], [r for _, r in pairs], metrics), examples
