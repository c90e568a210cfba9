"""Does a model copy from its context? The precondition of a useful kNN memory.

A kNN memory extends attention to the distant past, so it helps only where
attention already retrieves earlier tokens (induction heads). The copy score
shows a passage twice in one context (``P P``) and compares the loss on the two
copies: a model that copies predicts the second far better than the first.
Used by ``scripts/copy_score.py`` and reported by ``scripts/eval_memory_sweep.py``.
"""

import inspect
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fairseq_memtrm.errors import MemtrmUserError


def model_device(model) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without parameters)."""
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def copy_score(model, passages: torch.Tensor) -> dict:
    """passages: (N, S) token ids. Mean loss (nats) on each copy of ``P P``, the
    first token of each copy excluded, and their difference ``copy_gain``."""
    span = passages.size(1)
    tokens = torch.cat([passages, passages], dim=1).to(model_device(model))
    with torch.no_grad():
        logits = model(tokens)[0].float()
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    first_copy = nll[:, : span - 1].mean().item()
    second_copy = nll[:, span:].mean().item()
    return {"first_copy_loss": first_copy, "second_copy_loss": second_copy, "copy_gain": first_copy - second_copy}


def in_context_score(model, segments: torch.Tensor, early: int = 50, late: int = 500) -> dict:
    """segments: (N, S) token ids, S > ``late``. Olsson et al.'s (2022) in-context
    learning score: the mean loss (nats) at token ``late`` minus at token ``early``
    of each segment, averaged over the segments. Negative: the model predicts better
    later in its context, i.e. it uses what it has read."""
    if segments.size(1) <= late:
        raise MemtrmUserError(f"the in-context score needs segments of more than {late} tokens")
    tokens = segments.to(model_device(model))
    with torch.no_grad():
        logits = model(tokens)[0].float()
    # the loss "at token t" predicts token t (0-based) from the t tokens before it
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    early_loss, late_loss = nll[:, early - 1].mean().item(), nll[:, late - 1].mean().item()
    return {"loss_at_early": early_loss, "loss_at_late": late_loss, "in_context_score": late_loss - early_loss}


@contextmanager
def attention_projections(model):
    """Inside: every forward pass of ``model`` appends, for each decoder layer, that
    layer's (unscaled) attention queries and keys, each (B, H, T, D), to the list
    yielded, one entry per layer per pass (layer order). The model: a fairseq decoder
    whose layers have ``self_attn`` with ``q_proj``/``k_proj``; they are recomputed
    from the attention's input, so a fused attention kernel hides nothing."""
    captured, hooks = [], []

    def hook(module, args, kwargs, output):
        x = kwargs.get("query", args[0] if args else None)  # (T, B, C)
        length, bsz, _ = x.shape

        def heads(projected):
            return projected.view(length, bsz, module.num_heads, module.head_dim).permute(1, 2, 0, 3)

        captured.append((heads(module.q_proj(x)), heads(module.k_proj(x))))

    for layer in model.decoder.layers:
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in hooks:
            handle.remove()


def induction_scores(model, passages: torch.Tensor) -> torch.Tensor:
    """(layers, heads) mean attention weight that a token of the second copy of ``P P``
    gives to the position just after its first occurrence (Olsson et al.'s induction
    score): a head near 1 copies by looking up "what followed this token last time".
    A kNN memory can copy only through a layer whose heads do that, since it extends
    the same attention. ``passages``: (N, S); the model: as :func:`attention_projections`."""
    span = passages.size(1)
    tokens = torch.cat([passages, passages], dim=1).to(model_device(model))
    with attention_projections(model) as captured, torch.no_grad():
        model(tokens)
    scores = []
    for q, k in captured:
        length = q.size(2)
        logits = (q * q.size(-1) ** -0.5) @ k.transpose(-1, -2)
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        weights = logits.masked_fill(causal, float("-inf")).softmax(dim=-1)  # (B, H, T, T)
        rows = torch.arange(span + 1, 2 * span, device=q.device)  # second-copy tokens after its first
        scores.append(weights[:, :, rows, rows - span + 1].mean(dim=(0, 2)).float().cpu())
    return torch.stack(scores)


@torch.no_grad()
def planted_key_ranks(model, documents: torch.Tensor, first_at: int, gap: int, length: int,
                      tokens_per_sample: int, memory_query: str = "query", shift_keys: bool = False) -> torch.Tensor:
    """Could a kNN memory find the planted passage through this model's own attention?
    ``documents`` (B, N) from :func:`plant_passage`, read without memory in segments of
    ``tokens_per_sample``. For every layer and head, and every second-copy query that
    predicts a scored token (position ``t``, predicting ``t + 1``), the rank of the first
    copy's key for that token (position ``t + 1 - gap``: the entry a copy needs) among the
    keys of every earlier segment (what a memory of unbounded size holds while ``t``'s
    segment is read), by the memory's score, the cosine of query and key: 0 is the best
    match, and a memory that reads ``k`` entries can find it where the rank is below ``k``.
    ``memory_query="key"`` searches with the token's key instead of its query, and
    ``shift_keys`` keys the entry of position ``p`` by the key of ``p - 1`` (a document's
    first token by its own), as the memory's options of those names do.
    Returns (layers, heads, B, length - 1) int64."""
    if memory_query not in ("query", "key"):
        raise MemtrmUserError(f"memory_query must be 'query' or 'key', got {memory_query!r}")
    documents = documents.to(model_device(model))
    second = first_at + gap
    end = second + length - 1  # one past the last query
    first_query_segment = second - second % tokens_per_sample
    if first_at + length > first_query_segment:
        raise MemtrmUserError(f"a planted passage at {first_at} and {second} is not a memory's to find with "
                              f"segments of {tokens_per_sample} tokens: make the gap larger than "
                              f"{first_query_segment - first_at + tokens_per_sample}")
    layer_keys, layer_queries = None, None
    with attention_projections(model) as captured:
        for start in range(0, end, tokens_per_sample):
            captured.clear()
            model(documents[:, start : min(start + tokens_per_sample, end)])
            if layer_keys is None:
                layer_keys, layer_queries = [[] for _ in captured], [[] for _ in captured]
            for index, (q, k) in enumerate(captured):
                if start < first_query_segment + tokens_per_sample:  # keys a query segment's memory may hold
                    layer_keys[index].append(F.normalize(k.float(), dim=-1))
                layer_queries[index].append(F.normalize((k if memory_query == "key" else q).float(), dim=-1))
    ranks = []
    positions = torch.arange(second, end, device=documents.device)
    for keys, queries in zip(layer_keys, layer_queries):
        keys, queries = torch.cat(keys, dim=2), torch.cat(queries, dim=2)[:, :, second:end]  # (B, H, *, D)
        if shift_keys:
            keys = torch.cat([keys[:, :, :1], keys[:, :, :-1]], dim=2)
        scores = queries @ keys.transpose(-1, -2)  # (B, H, length - 1, N)
        held = torch.arange(keys.size(2), device=keys.device) < (positions - positions % tokens_per_sample)[:, None]
        target = scores.gather(-1, (positions + 1 - gap).view(1, 1, -1, 1).expand(*scores.shape[:3], 1))
        ranks.append(((scores > target) & held).sum(-1).permute(1, 0, 2))  # (H, B, length - 1)
    return torch.stack(ranks).cpu()


def load_passages(data_bin: str, split: str, dictionary, count: int, span: int) -> torch.Tensor:
    """(count, span) passages spread evenly over the first tokens of a data-bin split."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(data_bin, split), dictionary)
    if dataset is None:
        raise MemtrmUserError(f"no {split} split in {data_bin}; build it with scripts/prepare_data.py")
    stream, have, needed = [], 0, count * span * 4
    for i in range(len(dataset)):
        stream.append(dataset[i])
        have += len(stream[-1])
        if have >= needed:
            break
    stream = torch.cat(stream) if stream else torch.zeros(0, dtype=torch.long)
    if len(stream) < count * span:
        raise MemtrmUserError(
            f"{data_bin}/{split} has {len(stream)} tokens; the copy score needs {count} x {span}: "
            "lower the passage count or span"
        )
    stride = len(stream) // count
    return torch.stack([stream[i * stride : i * stride + span] for i in range(count)])


def plant_passage(document: torch.Tensor, passage: torch.Tensor, first_at: int, gap: int) -> torch.Tensor:
    """``document`` (N,) with ``passage`` (P,) written in at ``first_at`` and again at
    ``first_at + gap``, cut after the second copy:
    ``doc[:a] + P + doc[a : a + gap - P] + P``, of length ``a + gap + P``."""
    length = len(passage)
    if gap < length or len(document) < first_at + gap - length:
        raise MemtrmUserError(f"a document of {len(document)} tokens cannot hold a passage at {first_at} and "
                              f"{first_at + gap}")
    return torch.cat([document[:first_at], passage, document[first_at : first_at + gap - length], passage])


#: The kinds of planted passage: ``random``, uniform random tokens (nothing but a copy
#: predicts them, and nothing like them is in the training data); ``text``, a span of
#: another document of the same split (natural text, predictable from this document
#: only by copying).
PROBE_PASSAGES = ("random", "text")
#: Where a report keeps each kind's losses.
PROBE_KEYS = {"random": "planted_passage", "text": "planted_text"}


def planted_documents(dataset, dictionary, first_at: int, gap: int, length: int, seed: int = 1,
                      passage: str = "random"):
    """(B, N) every document of ``dataset`` long enough for the planted-passage probe
    (:func:`plant_passage`), each with its own passage of kind ``passage``
    (:data:`PROBE_PASSAGES`; ``text``: from the next document, in order, that is
    long enough), the same for every caller with the same ``seed``; None where no
    document is long enough (or, for ``text``, no other document holds a passage)."""
    if passage not in PROBE_PASSAGES:
        raise MemtrmUserError(f"the planted passage must be one of {', '.join(PROBE_PASSAGES)}, got {passage!r}")
    need = first_at + gap - length
    generator = torch.Generator().manual_seed(seed)
    count = len(dataset)
    planted = []
    for doc in range(count):
        if passage == "random":  # drawn for every document, so that each keeps its passage
            tokens = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
        if dataset.size(doc) < need:
            continue
        if passage == "text":
            source = next((other % count for other in range(doc + 1, doc + count)
                           if dataset.size(other % count) > length), None)
            if source is None:
                return None
            start = int(torch.randint(0, dataset.size(source) - length, (1,), generator=generator))
            tokens = dataset[source][start : start + length]
        planted.append(plant_passage(dataset[doc], tokens, first_at, gap))
    return torch.stack(planted) if planted else None


@torch.no_grad()
def planted_passage_loss(model, documents: torch.Tensor, first_at: int, gap: int, length: int,
                         tokens_per_sample: int, stream_id: str = "planted") -> dict:
    """``documents`` (B, N) from :func:`plant_passage` (second copy at ``first_at + gap``),
    read as one stream each in segments of ``tokens_per_sample``, the memory (if the
    model has one) reset at the start. Mean loss (nats) on each copy of the passage,
    the first token of each copy excluded: a token ``gap`` tokens back is out of the
    local context, so only a memory can make the second copy cheaper than the first.

    For a model that can record its retrievals, also what the memory found for the
    second copy's queries, over (memory layer, head, query): ``second_copy_next_found``,
    the share whose k entries include the first copy's token that the query is to
    predict (position ``t + 1 - gap``: what a copy needs), ``second_copy_same_found``,
    the same for the first copy's token equal to the query's (``t - gap``), and
    ``second_copy_next_weight``, the mean memory attention weight on the first."""
    documents = documents.to(model_device(model))
    bsz, total = documents.shape
    second = first_at + gap
    records = "record_retrievals" in inspect.signature(model.forward).parameters
    queries = (second, second + length - 1)  # the queries that predict the second copy's scored tokens
    found = {"next": [], "same": [], "weight": []}
    nll = torch.zeros(bsz, total, device=documents.device)  # nll[:, i]: loss of token i
    for start in range(0, total - 1, tokens_per_sample):
        source = documents[:, start : min(start + tokens_per_sample, total - 1)]
        target = documents[:, start + 1 : start + 1 + source.size(1)]
        if hasattr(model, "memory_bank"):
            doc_start = torch.full((bsz,), start == 0, dtype=torch.bool, device=documents.device)
            lo, hi = max(queries[0], start), min(queries[1], start + source.size(1))
            record = records and lo < hi
            logits, extra = model(source, doc_start=doc_start, stream_id=stream_id,
                                  **({"record_retrievals": True} if record else {}))[:2]
            for layer_record in (extra.get("retrievals") or {}).values() if record else ():
                positions = layer_record.retrieval.positions[:, :, lo - start : hi - start]  # (B, H, n, k)
                query = torch.arange(lo, hi, device=positions.device).view(1, 1, -1, 1)
                next_entry = positions == query + 1 - gap
                found["next"].append(next_entry.any(-1).float().flatten())
                found["same"].append((positions == query - gap).any(-1).float().flatten())
                found["weight"].append((layer_record.memory_probs[:, :, lo - start : hi - start].float()
                                        * next_entry).sum(-1).flatten())
        else:
            logits = model(source)[0]
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        nll[:, start + 1 : start + 1 + source.size(1)] = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    result = {"first_copy_loss": nll[:, first_at + 1 : first_at + length].mean().item(),
              "second_copy_loss": nll[:, second + 1 : second + length].mean().item()}
    if found["next"]:
        result.update({f"second_copy_{name}": torch.cat(values).mean().item()
                       for name, values in (("next_found", found["next"]), ("same_found", found["same"]),
                                            ("next_weight", found["weight"]))})
    return result
