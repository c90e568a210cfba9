"""What every attention layer that reads a memory shares: fairseq's own
self-attention, a learned per-head gate, and a binding for one forward pass.

* The gate bias ``b_h`` is one scalar per head. Adam moves any parameter by about
  ``lr`` per update, so at a fine-tuning lr of 2e-4 a bias stored as is could
  travel 0.2 in 1,000 updates. It is therefore stored divided by
  ``memory_param_gain`` (a buffer saved with the checkpoint) and moves that many
  times faster; :meth:`gate_logits` gives its effective value. Each subclass
  says how the bias becomes a weight (:meth:`gate_values`).
* :meth:`bind` is the scope of a memory: inside the ``with`` block the layer
  reads (and may write) what the binding names; outside it, or unbound, the
  layer is plain attention. Bindings nest and the previous one comes back.

Subclasses: :class:`~fairseq_memtrm.modules.knn_attention.KNNAugmentedAttention`
(a kNN memory) and :class:`~fairseq_memtrm.modules.slot_attention.SlotAttention`
(GPTm's memory slots).
"""

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

DEFAULT_MEMORY_PARAM_GAIN = 50.0


class GatedMemoryAttention(MultiheadAttention):
    def __init__(self, embed_dim: int, num_heads: int, memory_gate_init: float = 0.0,
                 memory_param_gain: float = DEFAULT_MEMORY_PARAM_GAIN, **kwargs):
        super().__init__(embed_dim, num_heads, self_attention=True, **kwargs)
        if not memory_param_gain > 0:
            raise ValueError(f"memory_param_gain must be positive, got {memory_param_gain}")
        self.register_buffer("memory_param_gain", torch.tensor(float(memory_param_gain)))
        self.memory_gate = nn.Parameter(torch.full((num_heads,), float(memory_gate_init) / memory_param_gain))
        self.binding: Any = None  # set by `bind` for a forward pass; None: plain attention

    @contextmanager
    def bind(self, binding: Any) -> Iterator[Any]:
        """Read what ``binding`` names in the forward passes inside the block."""
        previous, self.binding = self.binding, binding
        try:
            yield binding
        finally:
            self.binding = previous

    def gate_logits(self) -> Tensor:
        """(H,) the effective gate biases b_h."""
        return self.memory_gate * self.memory_param_gain

    def gate_values(self) -> Tensor:
        """(H,) the weight each head gives its memory."""
        raise NotImplementedError
