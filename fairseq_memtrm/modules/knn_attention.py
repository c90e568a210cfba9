"""kNN-augmented self-attention (Memorizing Transformers, Wu et al. 2022, sec. 3).

Per head, the layer computes two attentions and mixes them with a learned gate:

* local: causal self-attention over the segment, exactly as fairseq's
  ``MultiheadAttention`` computes it (same parameters, same names), so the
  weights of a vanilla checkpoint keep their meaning;
* memory: the L2-normalised query retrieves its top-k (key, value) pairs from
  the :class:`~fairseq_memtrm.memory.MemoryStore` (earlier segments of the same
  document only), and a separate softmax over those k entries, scaled by a
  learned per-head temperature, reads their values. No position encoding.
  With ``memory_query="key"`` the token's own key is the memory query: the
  memory finds the past tokens whose keys resemble this one's (with the
  memory's shifted keys: the tokens that *followed* a match), which needs no
  learned query/key alignment.

``out = local * (1 - g) + memory * g`` with ``g = sigmoid(b_h)``.
Where a query found nothing in memory, ``g`` is 0 for it, so an empty memory
gives plain local attention exactly.

The gate bias ``b_h`` and the log-temperature are one scalar per head, both
stored divided by ``memory_param_gain`` so that Adam moves them that many times
faster (:mod:`~fairseq_memtrm.modules.gated_memory_attention`);
``gate_logits()`` and ``memory_scale()`` give their effective values.

Memory keys carry no position. A ``transformer_lm`` adds its (sinusoidal)
positional embedding to the token embeddings, so the input of the first layer
is ``token + position(t)``, ``t`` the place in the segment: keys computed from it
match tokens that stood at the same place in their segments (segment length
apart) as well as tokens that are the same. A layer built with
``position_free_keys`` therefore computes its memory keys (and memory queries)
from ``memory_input``, the same input without the positional embedding, given by
the model in the binding; local attention and the values are unchanged.
This is exact for layer 0, whose input is the embedding sum; a deeper layer's
input mixes position into content, and there the option does not apply.

The memory is bound for a forward pass (``bind``, called by the model's
``bind_memory``): a :class:`MemoryBinding` names the
store, the tokens to write and what to record. Unbound, the layer is plain
attention. Per segment the order is: (the model resets streams at
``doc_start``) then retrieve with this segment's queries, then add this
segment's keys/values, so a token never retrieves its own segment. Stored
entries are detached: the gradient reaches the queries through the memory
attention, never the memory.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_memtrm.memory import MemoryStore, Retrieval
from fairseq_memtrm.modules.gated_memory_attention import DEFAULT_MEMORY_PARAM_GAIN, GatedMemoryAttention

MEMORY_PARAMETERS = ("memory_gate", "memory_log_scale")
MEMORY_STATE = MEMORY_PARAMETERS + ("memory_param_gain", "memory_position_free")  # what a vanilla layer lacks
MEMORY_QUERIES = ("query", "key")  # which projection of a token queries the memory


@dataclass
class RetrievalRecord:
    """What one layer retrieved for one segment (kept only when recording)."""

    retrieval: Retrieval  # (B, H, T, k) positions, scores, mask
    memory_probs: Tensor  # (B, H, T, k) attention weight of each retrieved entry
    gate: Tensor  # (B, H, T) effective gate: sigmoid(b_h), 0 where nothing was found
    # (B, H, T) how much of each head's output came from memory for this token: the gate is a
    # constant per head, the two outputs it mixes are not, so the share is by size,
    # g |memory_out| / (g |memory_out| + (1 - g) |local_out|); 0 where nothing was found
    memory_share: Tensor


@dataclass
class MemoryBinding:
    """What one memory layer reads and writes during one forward pass."""

    memory: MemoryStore  # B streams
    token_mask: Optional[Tensor] = None  # (B, T) True for the tokens to write (None: all)
    memory_input: Optional[Tensor] = None  # (T, B, C) the input without positions (position-free layers)
    write: bool = True  # False: another network writes the memory (LongMem's frozen backbone)
    knn_k: Optional[int] = None  # entries per query and head; None: the layer's own knn_k
    record_retrievals: bool = False
    record: Optional[RetrievalRecord] = None  # set by the pass when recording and something was retrieved


class KNNAugmentedAttention(GatedMemoryAttention):
    def __init__(self, embed_dim: int, num_heads: int, knn_k: int = 32, memory_gate_init: float = 0.0,
                 memory_scale_init: float = 20.0, memory_param_gain: float = DEFAULT_MEMORY_PARAM_GAIN,
                 memory_query: str = "query", position_free_keys: bool = False, **kwargs):
        if memory_query not in MEMORY_QUERIES:
            raise ValueError(f"memory_query must be one of {MEMORY_QUERIES}, got {memory_query!r}")
        super().__init__(embed_dim, num_heads, memory_gate_init=memory_gate_init,
                         memory_param_gain=memory_param_gain, **kwargs)
        self.knn_k = knn_k
        self.memory_query = memory_query
        # Saved with the checkpoint: a model keeps the keys it was trained with.
        self.register_buffer("memory_position_free", torch.tensor(bool(position_free_keys)))
        # Normalised q.k lies in [-1, 1]: the softmax over the k hits needs a high
        # temperature to single out the best match (at sqrt(head_dim) ~ 6 its weights
        # are near-uniform).
        self.memory_log_scale = nn.Parameter(
            torch.full((num_heads,), math.log(memory_scale_init) / memory_param_gain)
        )
        self.binding: Optional[MemoryBinding] = None

    def gate_values(self) -> Tensor:
        """(H,) the memory weight sigmoid(b_h) of each head (where memory found something)."""
        return torch.sigmoid(self.gate_logits())

    def memory_scale(self) -> Tensor:
        """(H,) the temperature of the memory softmax over cosine similarities."""
        return (self.memory_log_scale * self.memory_param_gain).exp()

    def memory_projections(self, query: Tensor, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                           memory_input: Optional[Tensor] = None):
        """Unit-norm memory (queries, keys), (B, H, T, D) each: from ``memory_input``
        (T, B, C) when this layer's keys are position-free, else the local ``q`` and
        ``k`` of ``query`` (T, B, C) (computed here where not given). ``q`` None: no queries."""
        if bool(self.memory_position_free):
            if memory_input is None or memory_input.shape != query.shape:
                raise RuntimeError("a position-free memory layer needs memory_input (T, B, C) bound by the model")
            k = self.split_heads(self.k_proj(memory_input))
            if q is not None and self.memory_query == "query":
                q = self.split_heads(self.q_proj(memory_input))
        elif k is None:
            k = self.split_heads(self.k_proj(query))
        k_unit = F.normalize(k, dim=-1)
        if q is None:
            return None, k_unit
        return (k_unit if self.memory_query == "key" else F.normalize(q, dim=-1)), k_unit

    def split_heads(self, x: Tensor) -> Tensor:
        """(T, B, C) -> (B, H, T, D)."""
        seq_len, bsz, _ = x.shape
        return x.view(seq_len, bsz, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state=None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ):
        binding = self.binding
        use_memory = (
            binding is not None and incremental_state is None and not before_softmax and not need_head_weights
        )
        knn_k = self.knn_k if binding is None or binding.knn_k is None else binding.knn_k
        if not use_memory or binding.memory.memory_size == 0 or knn_k == 0:
            return super().forward(
                query, key, value, key_padding_mask, incremental_state, need_weights,
                static_kv, attn_mask, before_softmax, need_head_weights,
            )
        memory = binding.memory
        if memory.is_empty():
            # Nothing to retrieve: plain attention, then still write the segment.
            out, weights = super().forward(
                query, key, value, key_padding_mask, None, need_weights, False, attn_mask
            )
            if binding.write:
                memory.add(
                    self.memory_projections(query, memory_input=binding.memory_input)[1],
                    self.split_heads(self.v_proj(query)),
                    binding.token_mask,
                )
            return out, weights

        seq_len, bsz, embed_dim = query.shape
        q = self.split_heads(self.q_proj(query))  # (B, H, T, D), unscaled
        k = self.split_heads(self.k_proj(query))
        v = self.split_heads(self.v_proj(query))

        local_out, local_probs = self._local_attention(q, k, v, attn_mask, key_padding_mask, need_weights)

        # Memory attention over the top-k entries of earlier segments.
        q_unit, k_unit = self.memory_projections(query, q, k, binding.memory_input)
        # Without a gradient to q, the search's scores are the logits (q_unit . key,
        # the same products): the found keys need not be gathered.
        need_keys = torch.is_grad_enabled() and q_unit.requires_grad
        retrieval = memory.search(q_unit.detach(), knn_k, keys=need_keys)
        scale = self.memory_scale().view(1, -1, 1, 1)
        if need_keys:
            memory_logits = torch.einsum("bhtd,bhtkd->bhtk", q_unit, retrieval.keys) * scale
        else:
            memory_logits = retrieval.scores.to(q_unit.dtype) * scale
        memory_logits = memory_logits.masked_fill(~retrieval.mask, float("-inf"))
        found = retrieval.mask.any(dim=-1)  # (B, H, T)
        memory_probs = F.softmax(memory_logits.float(), dim=-1).type_as(q)
        memory_probs = memory_probs.masked_fill(~found.unsqueeze(-1), 0.0)  # all -inf rows give NaN
        memory_out = torch.einsum("bhtk,bhtkd->bhtd", self.dropout_module(memory_probs), retrieval.values)

        gate = self.gate_values().view(1, -1, 1) * found.type_as(q)  # (B, H, T)
        mixed = local_out + gate.unsqueeze(-1) * (memory_out - local_out)

        if binding.write:
            memory.add(k_unit, v, binding.token_mask)  # after retrieval: never retrieve yourself
        if binding.record_retrievals:
            from_memory = gate * memory_out.detach().norm(dim=-1)
            from_local = (1 - gate) * local_out.detach().norm(dim=-1)
            share = from_memory / (from_memory + from_local).clamp(min=1e-12)
            binding.record = RetrievalRecord(retrieval, memory_probs.detach(), gate.detach(), share)

        out = self.out_proj(mixed.permute(2, 0, 1, 3).reshape(seq_len, bsz, embed_dim))
        weights = None
        if need_weights:
            weights = local_probs.mean(dim=1)  # (B, T, T), like the plain path's average
        return out, weights

    def _local_attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                         key_padding_mask: Optional[Tensor], need_weights: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention within the segment, as MultiheadAttention computes it: output (B, H, T, D)
        and, when ``need_weights``, the probabilities (B, H, T, T). Without weights it runs in
        torch's fused kernel, which never writes the (T, T) logits."""
        bsz, _, seq_len, _ = q.shape
        mask = attn_mask
        if key_padding_mask is not None:
            padding = torch.zeros(bsz, 1, 1, seq_len, dtype=q.dtype, device=q.device).masked_fill(
                key_padding_mask.view(bsz, 1, 1, seq_len).to(torch.bool), float("-inf"))
            mask = padding if mask is None else mask + padding
        if not need_weights:
            dropout = self.dropout_module
            p = dropout.p if dropout.training or dropout.apply_during_inference else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                                 dropout_p=p, scale=self.scaling)
            return out, None
        logits = torch.matmul(q * self.scaling, k.transpose(-1, -2))  # (B, H, T, T)
        if mask is not None:
            logits = logits + mask
        probs = self.dropout_module(F.softmax(logits, dim=-1, dtype=torch.float32).type_as(q))
        return torch.matmul(probs, v), probs

    def upgrade_state_dict_named(self, state_dict, name):
        """A vanilla ``transformer_lm`` checkpoint lacks the memory parameters:
        they start fresh (the model's own initial values). A checkpoint saved
        with another ``memory_param_gain`` (none saved: gain 1, the first
        format) is converted to this layer's gain, effective values unchanged."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        gain = float(self.memory_param_gain)
        if prefix + "memory_gate" in state_dict and prefix + "memory_position_free" not in state_dict:
            # a memory layer saved before position-free keys existed was trained with positional keys
            state_dict[prefix + "memory_position_free"] = torch.tensor(False)
        saved = state_dict.get(prefix + "memory_param_gain")
        saved_gain = float(saved) if saved is not None else 1.0
        for param in MEMORY_PARAMETERS + ("memory_position_free",):
            key = prefix + param
            if key not in state_dict:
                state_dict[key] = getattr(self, param).detach().clone()
            elif saved_gain != gain and param in MEMORY_PARAMETERS:
                state_dict[key] = state_dict[key].float() * (saved_gain / gain)
        state_dict[prefix + "memory_param_gain"] = self.memory_param_gain.detach().clone()
