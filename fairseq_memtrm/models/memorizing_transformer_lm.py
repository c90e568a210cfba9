"""``memorizing_transformer_lm``: fairseq's ``transformer_lm`` whose decoder layers
at ``--memory-layers`` use kNN-augmented attention over a per-document memory.

Everything but those layers' attention is the stock ``TransformerLanguageModel``
(same modules, same parameter names), so ``--finetune-from-model`` loads every
weight of a vanilla ``transformer_lm`` checkpoint; only the memory parameters
(per-head gate and temperature) start fresh.

Extra batch keys (``net_input``), consumed here before the stock decoder runs:

* ``doc_start``: bool (B,), True where row b starts a new document; that row's
  memory is reset before the segment is read. Absent: all rows are reset (no
  document structure, e.g. fairseq's ``language_modeling`` task).
* ``stream_id``: str naming the stream set (``"train"``, ``"valid"``, ...);
  each set has its own memory, so validation never touches training memory.

The memory flags, their checks and the binding of the memory to the layers for
a forward pass are every memory model's: see ``models/memory_model.py``.
"""

import logging
from dataclasses import dataclass
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt2_medium,
    transformer_lm_gpt2_small,
    transformer_lm_gpt,
)
from torch import Tensor

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.memory import MemoryBank
from fairseq_memtrm.models.memory_model import (
    MemoryConfig,
    MemoryModel,
    build_memory_bank,
    build_memory_layer,
    check_compatible,
    fill_defaults,
    parse_memory_layers,
    register_sized_archs,
)
from fairseq_memtrm.modules.knn_attention import MEMORY_QUERIES, KNNAugmentedAttention

logger = logging.getLogger(__name__)


@dataclass
class MemorizingTransformerLMConfig(MemoryConfig, TransformerLanguageModelConfig):
    memory_layers: str = option(
        "",
        "comma-separated 0-based indices of the decoder layers that use the memory; default: the layer at three "
        "quarters of the depth (8 of 12)")
    memory_scale_init: float = option(
        20.0,
        "initial per-head temperature of the memory softmax over cosine similarities (learned, in log space)")
    memory_query: ChoiceEnum(list(MEMORY_QUERIES)) = option(
        "query",
        "what queries the memory: the token's attention query (the paper), or its own key (finds past tokens like "
        "this one without a learned query/key match; with --memory-shift-keys, what followed them)")
    memory_shift_keys: bool = option(
        False,
        "key each memory entry by the previous token's key (its value stays the token's own): a query matching a "
        "past token reads what followed it, the copying step of an induction head built into the memory; off = the "
        "paper's memory")
    memory_keys_with_positions: bool = option(
        False,
        "layer 0 computes its memory keys and queries from its input as it is, positional embedding included (off: "
        "from the token embeddings alone, so that a retrieval does not depend on where a token stood in its "
        "segment); deeper layers always use their input as it is")


@register_model("memorizing_transformer_lm", dataclass=MemorizingTransformerLMConfig)
class MemorizingTransformerLanguageModel(MemoryModel, TransformerLanguageModel):
    def __init__(self, decoder):
        super().__init__(decoder)
        self.memory_layer_ids: List[int] = []
        self.memory_bank: Optional[MemoryBank] = None

    def install_memory(self, args) -> None:
        decoder = self.decoder
        self.memory_layer_ids = parse_memory_layers(args.memory_layers, len(decoder.layers))
        for index in self.memory_layer_ids:
            decoder.layers[index] = build_memory_layer(
                decoder.cfg, args, memory_scale_init=args.memory_scale_init, memory_query=args.memory_query,
                position_free_keys=index == 0 and not args.memory_keys_with_positions,
            )
        self.memory_bank = build_memory_bank(
            args, dict(zip(self.memory_layer_ids, self.memory_attentions())), shift_keys=args.memory_shift_keys
        )
        logger.info(
            "memorizing layers %s: memory %d tokens/stream, k=%d, %s, backend %s (%.1f MiB per stream)",
            self.memory_layer_ids, args.memory_size, args.knn_k, args.memory_dtype,
            args.memory_backend, self.memory_bank.bytes_per_stream() / 2**20,
        )

    def memory_attentions(self) -> List[KNNAugmentedAttention]:
        return [self.decoder.layers[i].self_attn for i in self.memory_layer_ids]

    def memory_input(self, src_tokens: Tensor, layer_id: int) -> Optional[Tensor]:
        layer = self.decoder.layers[layer_id]
        if bool(layer.self_attn.memory_position_free):
            return self.input_without_positions(src_tokens, layer)
        return None

    def input_without_positions(self, src_tokens: Tensor, layer) -> Tensor:
        """(T, B, C) what the first layer's attention reads, computed as the stock decoder
        computes it but without the positional embedding (see ``KNNAugmentedAttention``)."""
        decoder = self.decoder
        x = decoder.embed_scale * decoder.embed_tokens(src_tokens)
        if decoder.project_in_dim is not None:
            x = decoder.project_in_dim(x)
        if decoder.layernorm_embedding is not None:
            x = decoder.layernorm_embedding(x)
        x = decoder.dropout_module(x).transpose(0, 1)
        return layer.self_attn_layer_norm(x) if layer.normalize_before else x

    # ------------------------------------------------------------ checkpoints
    def upgrade_state_dict_named(self, state_dict, name):
        """Loads vanilla ``transformer_lm`` checkpoints (the memory layers' new
        parameters start fresh, see ``KNNAugmentedAttention``) and turns every
        incompatibility into one clear sentence instead of torch's key dump."""
        super().upgrade_state_dict_named(state_dict, name)
        if name == "":
            check_compatible(self, state_dict)


def memorizing_defaults(args):
    """Defaults of the flags of memorizing_transformer_lm (the config's, written there once)."""
    fill_defaults(args, MemorizingTransformerLMConfig)
    fill_defaults(args, MemoryConfig)


# `register_model` with a dataclass already registers the arch named like the
# model (the dataclass defaults); this function is the base the others extend.
def memorizing_transformer_lm(args):
    base_lm_architecture(args)
    memorizing_defaults(args)


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_gpt")
def memorizing_transformer_lm_gpt(args):
    transformer_lm_gpt(args)
    memorizing_defaults(args)


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_gpt2_small")
def memorizing_transformer_lm_gpt2_small(args):
    transformer_lm_gpt2_small(args)
    memorizing_defaults(args)


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_gpt2_medium")
def memorizing_transformer_lm_gpt2_medium(args):
    transformer_lm_gpt2_medium(args)
    memorizing_defaults(args)


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_wiki103")
def memorizing_transformer_lm_wiki103(args):
    transformer_lm_baevski_wiki103(args)
    memorizing_defaults(args)


register_sized_archs("memorizing_transformer_lm", memorizing_transformer_lm, tiny={"memory_size": 8192})
