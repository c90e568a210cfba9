"""LongMem's decoupled memory (Wang et al., NeurIPS 2023, sec. 3): a frozen
backbone writes the memory, a trainable residual SideNet reads it.

* :class:`FrozenBackbone` wraps a ``transformer_lm`` decoder that never trains:
  eval mode whatever ``train()`` asks, no gradients, and no tensors in the
  owner's ``state_dict`` (it lives in its own checkpoint; saving it again would
  double every side checkpoint). It gives every layer's hidden state and the
  attention (key, value) pairs of one layer, which go to the memory. Because
  its weights never change, a key written a million tokens ago is exactly the
  key it would write now: the memory cannot go stale.
* :class:`ResidualSideNetDecoder` runs ``S`` side layers. Side layer ``i``
  covers the backbone layers ``[start_i, end_i)`` and adds the backbone's
  progress over them to its own output (the cross-network residual):

      x_{i+1} = layer_i(x_i) + (h[end_i] - h[start_i]),   x_0 = h[0]

  where ``h[j]`` is the backbone's hidden state after ``j`` layers (``h[0]``:
  token + position embeddings). One side layer's self-attention is a
  :class:`KNNAugmentedAttention` that only *reads* the memory (same retrieval,
  same per-head gate as the Memorizing layer); after the side layers ran, the
  backbone's keys and values of this segment are written, so a segment never
  retrieves itself. Embeddings, positions and the output projection (adaptive
  softmax included) are the backbone's, shared and frozen.

  With a residual gate (``residual_gate_init``), each side layer's step is
  blended in from the backbone by a learned scalar ``g_i = sigmoid(b_i)``:

      x_{i+1} = h[end_i] + g_i * (layer_i(x_i) - h[start_i])

  ``g_i = 1`` is the residual above; ``g_i`` near 0 gives the backbone's own
  hidden states, so a SideNet whose gates start low starts as its backbone.
  The residual alone does not: a copied layer's change is added on top of the
  backbone's progress over its span, which already holds it. The gates are
  stored divided by ``gain`` so that Adam moves them that many times faster
  than the other weights, as the memory gates are.

Shapes: ``T`` tokens per segment, ``B`` streams (batch rows), ``C`` model dims,
``H`` heads of ``D`` dims.
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from fairseq.models import FairseqDecoder
from fairseq.models.transformer import TransformerDecoderBase
from torch import Tensor, nn

from fairseq_memtrm.modules.knn_attention import KNNAugmentedAttention


def side_layer_spans(num_backbone_layers: int, num_side_layers: int) -> List[Tuple[int, int]]:
    """Backbone layers ``[start, end)`` each side layer stands for, as even as possible.

    >>> side_layer_spans(6, 3)
    [(0, 2), (2, 4), (4, 6)]
    """
    bounds = [round(i * num_backbone_layers / num_side_layers) for i in range(num_side_layers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class FrozenBackbone(nn.Module):
    """A ``transformer_lm`` decoder kept frozen and out of its owner's checkpoint."""

    def __init__(self, decoder: TransformerDecoderBase):
        super().__init__()
        self.decoder = decoder
        for parameter in self.decoder.parameters():
            parameter.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        """Always eval: no dropout, so memory keys are deterministic."""
        return super().train(False)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Nothing: the backbone is reloaded from its own checkpoint (see the model)."""
        return destination if destination is not None else OrderedDict()

    def live_state_dict(self, prefix: str) -> Dict[str, Tensor]:
        """The tensors ``state_dict`` leaves out, named as the owner would name them."""
        return self.decoder.state_dict(prefix=prefix + "decoder.", keep_vars=True)

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @torch.no_grad()
    def hidden_states(self, src_tokens: Tensor) -> List[Tensor]:
        """``L + 1`` tensors (T, B, C): the input of layer 0, then every layer's output."""
        _, extra = self.decoder.extract_features(src_tokens, encoder_out=None)
        return extra["inner_states"]

    @torch.no_grad()
    def attention_keys_values(self, hidden: Tensor, layer_index: int) -> Tuple[Tensor, Tensor]:
        """Layer ``layer_index``'s self-attention keys and values for its input
        ``hidden`` (T, B, C): (B, H, T, D) each, keys L2-normalised like the
        Memorizing layer's memory keys."""
        layer = self.decoder.layers[layer_index]
        attention_input = layer.self_attn_layer_norm(hidden) if layer.normalize_before else hidden
        attention = layer.self_attn
        seq_len, bsz, _ = hidden.shape

        def split_heads(x: Tensor) -> Tensor:
            return x.view(seq_len, bsz, attention.num_heads, attention.head_dim).permute(1, 2, 0, 3)

        keys = split_heads(attention.k_proj(attention_input))
        values = split_heads(attention.v_proj(attention_input))
        return F.normalize(keys, dim=-1), values


class ResidualSideNetDecoder(FairseqDecoder):
    """Side layers over a frozen backbone; see the module docstring."""

    def __init__(self, backbone: FrozenBackbone, layers: Sequence[nn.Module], spans: Sequence[Tuple[int, int]],
                 memory_layer_id: int, memory_source_layer: int, layer_norm: Optional[nn.Module],
                 residual_gate_init: Optional[float] = None, gain: float = 1.0):
        super().__init__(backbone.decoder.dictionary)
        assert len(layers) == len(spans)
        self.backbone = backbone
        self.layers = nn.ModuleList(layers)
        self.spans = [tuple(span) for span in spans]
        self.memory_layer_id = memory_layer_id
        self.memory_source_layer = memory_source_layer
        self.layer_norm = layer_norm
        self.padding_idx = backbone.decoder.padding_idx
        self.residual_gate = None  # (S,) logits / gain, or None: LongMem's residual as published
        if residual_gate_init is not None:
            self.register_buffer("residual_gate_gain", torch.tensor(float(gain)))
            self.residual_gate = nn.Parameter(torch.full((len(layers),), float(residual_gate_init) / gain))

    def residual_gates(self) -> Optional[Tensor]:
        """(S,) each side layer's ``g_i``, or None when the SideNet has no residual gate."""
        if self.residual_gate is None:
            return None
        return torch.sigmoid(self.residual_gate * self.residual_gate_gain)

    @property
    def memory_attention(self) -> KNNAugmentedAttention:
        return self.layers[self.memory_layer_id].self_attn

    def forward(self, src_tokens: Tensor, features_only: bool = False, src_lengths=None, **unused):
        """``src_tokens`` (B, T) -> (logits (B, T, V) or features (B, T, C), extra)."""
        x, extra = self.extract_features(src_tokens)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, src_tokens: Tensor, **unused):
        backbone_states = self.backbone.hidden_states(src_tokens)  # L + 1 of (T, B, C), no grad
        x = backbone_states[0]
        padding_mask = src_tokens.eq(self.padding_idx)
        if not padding_mask.any():
            padding_mask = None
        future_mask = self.backbone.decoder.buffered_future_mask(x)
        inner_states = [x]
        gates = self.residual_gates()
        for index, (layer, (start, end)) in enumerate(zip(self.layers, self.spans)):
            y, _, _ = layer(x, self_attn_mask=future_mask, self_attn_padding_mask=padding_mask)
            if gates is None:
                x = y + (backbone_states[end] - backbone_states[start])
            else:
                x = backbone_states[end] + gates[index] * (y - backbone_states[start])
            inner_states.append(x)

        binding = self.memory_attention.binding  # bound by the model, which leaves the writing to us
        if binding is not None:  # after the side layers searched it: a segment never retrieves itself
            keys, values = self.backbone.attention_keys_values(
                backbone_states[self.memory_source_layer], self.memory_source_layer
            )
            binding.memory.add(keys, values, binding.token_mask)

        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)  # (B, T, C)
        if self.backbone.decoder.project_out_dim is not None:
            x = self.backbone.decoder.project_out_dim(x)
        return x, {"attn": [None], "inner_states": inner_states}

    def output_layer(self, features: Tensor) -> Tensor:
        return self.backbone.decoder.output_layer(features)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        """The backbone's output distribution (plain or adaptive softmax) on side features."""
        return self.backbone.decoder.get_normalized_probs(net_output, log_probs, sample)

    def max_positions(self):
        return self.backbone.decoder.max_positions()
