"""Self-attention that also reads a few memory slots per stream (GPTm's read).

Per head, the layer computes fairseq's own causal self-attention over the
segment (``MultiheadAttention.forward``, unchanged: same parameters, same path)
and, beside it, an attention of the same queries over the ``s`` slots bound for
this pass (``S M`` of the stream's memory matrix, ``models/gptm_lm.py``). The
slots' keys and values come from this layer's own ``k_proj``/``v_proj``: a slot
is read as if it were one more token of the context, without a position, in
the projections the layer already has, so nothing new must be learned before
the memory can be read (an input prefix would instead shift every position and
pass through all layers). The two are added, per head, through a gate::

    out = out_proj(local_h + tanh(b_h) * memory_h),     b_h = 0 at init

so a layer built from a vanilla checkpoint computes exactly the vanilla's output
until ``b_h`` moves (``tanh(0) = 0``, and the memory term is added after
fairseq's own output, never recomputed). Rows whose memory is empty (a
document's first segment) add nothing either. ``b_h`` is stored divided by
``memory_param_gain`` so that Adam moves it that many times faster (see
``gated_memory_attention.py``).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_memtrm.modules.gated_memory_attention import DEFAULT_MEMORY_PARAM_GAIN, GatedMemoryAttention

SLOT_STATE = ("memory_gate", "memory_param_gain")  # what a vanilla layer lacks


@dataclass
class SlotBinding:
    """The memory slots one layer reads during one forward pass."""

    slots: Tensor  # (B, s, C)
    active: Tensor  # (B,) bool: rows whose memory holds something (the others add nothing)


class SlotAttention(GatedMemoryAttention):
    def __init__(self, embed_dim: int, num_heads: int, memory_param_gain: float = DEFAULT_MEMORY_PARAM_GAIN,
                 **kwargs):
        super().__init__(embed_dim, num_heads, memory_gate_init=0.0, memory_param_gain=memory_param_gain, **kwargs)
        self.binding: Optional[SlotBinding] = None  # read ``binding.slots`` inside ``bind``

    def gate_values(self) -> Tensor:
        """(H,) the memory weight tanh(b_h) of each head."""
        return torch.tanh(self.gate_logits())

    def read_slots(self, query: Tensor, binding: SlotBinding) -> Tensor:
        """(B, H, T, D) each head's attention over the slots, gated (zero where inactive)."""
        seq_len, bsz, _ = query.shape
        heads, dim = self.num_heads, self.head_dim
        q = self.q_proj(query).view(seq_len, bsz, heads, dim).permute(1, 2, 0, 3) * self.scaling
        slots = binding.slots.to(query.dtype)
        k = self.k_proj(slots).view(bsz, -1, heads, dim).transpose(1, 2)  # (B, H, s, D)
        v = self.v_proj(slots).view(bsz, -1, heads, dim).transpose(1, 2)
        probs = F.softmax(torch.matmul(q, k.transpose(-1, -2)).float(), dim=-1).type_as(q)  # (B, H, T, s)
        memory = torch.matmul(self.dropout_module(probs), v)
        gate = self.gate_values().view(1, -1, 1, 1) * binding.active.to(query.dtype).view(-1, 1, 1, 1)
        return gate * memory

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor], key_padding_mask=None,
                incremental_state=None, need_weights: bool = True, static_kv: bool = False, attn_mask=None,
                before_softmax: bool = False, need_head_weights: bool = False):
        out, weights = super().forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                                       static_kv, attn_mask, before_softmax, need_head_weights)
        binding = self.binding
        if binding is None or incremental_state is not None or before_softmax:
            return out, weights
        memory = self.read_slots(query, binding)  # (B, H, T, D)
        seq_len, bsz, embed_dim = query.shape
        memory = memory.permute(2, 0, 1, 3).reshape(seq_len, bsz, embed_dim)
        return out + F.linear(memory, self.out_proj.weight), weights  # out_proj's bias is in `out` already

    def upgrade_state_dict_named(self, state_dict, name):
        """A vanilla ``transformer_lm`` layer lacks the gate: it starts at its initial value
        (0: the vanilla's output); a checkpoint of another gain keeps its effective gate."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        saved = state_dict.get(prefix + "memory_param_gain")
        if prefix + "memory_gate" not in state_dict:
            state_dict[prefix + "memory_gate"] = self.memory_gate.detach().clone()
        elif saved is not None and float(saved) != float(self.memory_param_gain):
            state_dict[prefix + "memory_gate"] = state_dict[prefix + "memory_gate"].float() * (
                float(saved) / float(self.memory_param_gain))
        state_dict[prefix + "memory_param_gain"] = self.memory_param_gain.detach().clone()
