"""``longmem_sidenet_lm``: LongMem's decoupled memory (Wang et al., NeurIPS 2023)
on stock fairseq, through ``--user-dir``.

A frozen ``transformer_lm`` checkpoint (``--backbone-checkpoint``) encodes every
segment; its self-attention keys and values at ``--memory-source-layer`` go to
the per-stream kNN memory (the same :class:`MemoryBank` as the Memorizing
model, reset at ``doc_start``, one memory per ``stream_id``). A small SideNet of
``--side-layers`` decoder layers, initialised from the backbone's layers, reads
the memory in one layer and is the only part that trains. See
``fairseq_memtrm/modules/side_network.py`` for the computation and
``docs/longmem.md`` for how to train and evaluate it.

Checkpoints hold the SideNet only. They record the backbone's absolute path in
the model config and a fingerprint of its weights, and reload it at build time:
fairseq-eval-lm needs nothing more. If the backbone moved, pass its new path
with ``--model-overrides "{'backbone_checkpoint': 'NEW.pt'}"``; a backbone
whose weights differ from the one the SideNet was trained on is refused.
"""

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import (
    ARCH_MODEL_REGISTRY,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer_lm import TransformerLanguageModel
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.checkpoint_files import load_checkpoint_to_cpu
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import MemoryBank
from fairseq_memtrm.models.memory_model import (
    MemoryConfig,
    MemoryModel,
    build_memory_bank,
    build_memory_layer,
    check_memory_options,
    default_memory_layer,
    fill_defaults,
)
from fairseq_memtrm.modules.knn_attention import MEMORY_STATE, KNNAugmentedAttention
from fairseq_memtrm.modules.side_network import FrozenBackbone, ResidualSideNetDecoder, side_layer_spans

logger = logging.getLogger(__name__)

MOVED_HINT = ("pass its path: --backbone-checkpoint PATH (fairseq-train), or "
              "--model-overrides \"{'backbone_checkpoint': 'PATH'}\" (fairseq-eval-lm), or "
              "--longmem-backbone PATH (eval_memory_sweep.py)")


@dataclass
class LongMemSideNetConfig(MemoryConfig):
    backbone_checkpoint: str = option(
        "",
        "the frozen transformer_lm checkpoint that encodes the memory (required); stored as an absolute path in the "
        "side checkpoint")
    side_layers: int = option(0, "SideNet decoder layers; 0: half the backbone's layers")
    side_init: ChoiceEnum(["backbone", "random"]) = option(
        "backbone",
        "initialise side layer i from the last backbone layer of its span (every other layer when the SideNet has "
        "half the depth), or randomly")
    side_residual_gate_init: Optional[float] = option(
        None,
        "give each side layer a learned gate g = sigmoid(b) on its step, x_{i+1} = h[end] + g (layer(x_i) - "
        "h[start]), starting at this logit b and moving --memory-param-gain times faster than the other weights "
        "(g = 1 is the cross-network residual; a low start keeps the model at its backbone's output); unset: the "
        "residual without a gate")
    side_memory_layer: int = option(
        -1,
        "0-based SideNet layer that reads the memory; -1: the one at three quarters of the depth")
    memory_source_layer: int = option(
        -1,
        "0-based backbone layer whose attention keys/values are written to memory; -1: the backbone layer the memory"
        " side layer is initialised from")
    memory_chunk_size: int = option(
        1,
        "LongMem's chunked retrieval: search chunks of this many consecutive tokens by their mean key and attend to "
        "all tokens of the knn_k/chunk best (1: token search)")
    dropout: float = option(0.1, "dropout in the SideNet layers")
    attention_dropout: float = option(0.0, "attention dropout in the SideNet layers")
    activation_dropout: float = option(0.0, "FFN dropout in the SideNet layers")


# ----------------------------------------------------------------- backbone
def weights_fingerprint(state_dict) -> int:
    """A 63-bit hash of a state dict's tensors: same weights, same number,
    wherever the file lives."""
    digest = hashlib.sha1()
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if not torch.is_tensor(tensor):
            continue
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def load_backbone(path: str, task) -> Tuple[TransformerLanguageModel, int]:
    """The ``transformer_lm`` at ``path`` built for ``task``'s dictionary, and its fingerprint."""
    if not path:
        raise MemtrmUserError("longmem_sidenet_lm needs a frozen backbone: --backbone-checkpoint "
                              "PATH to a transformer_lm checkpoint (e.g. from scripts/train_vanilla.sh)")
    if not os.path.isfile(path):
        raise MemtrmUserError(f"backbone checkpoint {path!r} not found; if it moved, {MOVED_HINT}")
    state = load_checkpoint_to_cpu(path, flag="--backbone-checkpoint")  # a bad file: one sentence, exit 2
    model_cfg = state["cfg"].model if state.get("cfg") is not None else None
    arch = getattr(model_cfg, "_name", None) if model_cfg is not None else None
    if ARCH_MODEL_REGISTRY.get(arch) is not TransformerLanguageModel:
        raise MemtrmUserError(
            f"the backbone must be a plain transformer_lm checkpoint, but {path} holds a {arch!r} model"
        )
    backbone = TransformerLanguageModel.build_model(model_cfg, task)
    for key, tensor in backbone.state_dict().items():
        theirs = state["model"].get(key)
        if theirs is not None and tuple(theirs.shape) != tuple(tensor.shape):
            # the backbone is built from its own config, so only the vocabulary can differ
            raise MemtrmUserError(
                f"dictionary mismatch: the backbone {path} has {tuple(theirs.shape)} for {key} but this "
                f"data's dictionary ({len(task.target_dictionary)} symbols) needs {tuple(tensor.shape)}; "
                "binarize the data with the backbone's dict.txt (prepare_data.py --spm-model/--dict from "
                "the backbone's data-bin)"
            )
    backbone.load_state_dict(state["model"], strict=True, model_cfg=model_cfg)
    return backbone, weights_fingerprint(state["model"])


# -------------------------------------------------------------------- model
@register_model("longmem_sidenet_lm", dataclass=LongMemSideNetConfig)
class LongMemSideNetLanguageModel(MemoryModel, FairseqLanguageModel):
    """Frozen backbone + residual SideNet + per-document kNN memory.

    ``forward(src_tokens (B, T), doc_start bool (B,), stream_id str)`` ->
    (logits (B, T, V), extra), with the same stream semantics as
    ``memorizing_transformer_lm`` (:class:`MemoryModel`).
    """

    # the side layer only reads: the decoder writes the frozen backbone's keys and values
    attention_writes_memory = False

    def __init__(self, decoder: ResidualSideNetDecoder, memory_bank: MemoryBank, backbone_fingerprint: int):
        super().__init__(decoder)
        self.memory_bank = memory_bank
        self.memory_layer_ids: List[int] = [decoder.memory_layer_id]
        self._backbone_fingerprint = backbone_fingerprint
        self.backbone_path = ""
        # saved with the side weights; checked against the backbone found at load time
        self.register_buffer("backbone_fingerprint", torch.tensor(backbone_fingerprint, dtype=torch.long))

    @classmethod
    def build_model(cls, args, task):
        check_memory_options(args)
        path = os.path.abspath(os.path.expanduser(args.backbone_checkpoint)) if args.backbone_checkpoint else ""
        backbone, fingerprint = load_backbone(path, task)
        try:  # saved in the side checkpoint's config: fairseq-eval-lm finds it from any directory
            args.backbone_checkpoint = path
        except Exception:  # a read-only config: the given path is kept as is
            pass
        decoder = build_side_decoder(args, FrozenBackbone(backbone.decoder))
        memory_bank = build_memory_bank(
            args, {decoder.memory_layer_id: decoder.memory_attention}, chunk_size=args.memory_chunk_size
        )
        trained = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in decoder.backbone.parameters())
        logger.info(
            "LongMem SideNet: %d side layers over %d frozen backbone layers (%s), spans %s; memory read "
            "by side layer %d, written from backbone layer %d; memory %d tokens/stream, k=%d, chunk %d, "
            "%s, backend %s; %d trainable / %d frozen parameters",
            len(decoder.layers), decoder.backbone.num_layers, path, decoder.spans, decoder.memory_layer_id,
            decoder.memory_source_layer, args.memory_size, args.knn_k, args.memory_chunk_size,
            args.memory_dtype, args.memory_backend, trained, frozen,
        )
        model = cls(decoder, memory_bank, fingerprint)
        model.backbone_path = path
        return model

    # ---------------------------------------------------------------- forward
    def memory_attentions(self) -> List[KNNAugmentedAttention]:
        return [self.decoder.memory_attention]

    def max_positions(self):
        return self.decoder.max_positions()

    # ------------------------------------------------------------ checkpoints
    def upgrade_state_dict_named(self, state_dict, name):
        """Side checkpoints lack the backbone (see :class:`FrozenBackbone`): put the
        live backbone's tensors in first, so that strict loading and fairseq's own
        upgrades see a whole model; refuse a backbone the SideNet was not trained on."""
        prefix = f"{name}." if name else ""
        if name == "":
            stored = state_dict.get(prefix + "backbone_fingerprint")
            if stored is not None and int(stored) != self._backbone_fingerprint:
                raise MemtrmUserError(
                    f"the backbone {self.backbone_path} has other weights than the one this SideNet was "
                    f"trained on; {MOVED_HINT} (the checkpoint it was trained with)"
                )
            state_dict[prefix + "backbone_fingerprint"] = self.backbone_fingerprint
            backbone_prefix = prefix + "decoder.backbone."
            for key in [k for k in state_dict if k.startswith(backbone_prefix)]:
                del state_dict[key]
            state_dict.update(self.decoder.backbone.live_state_dict(backbone_prefix))
        super().upgrade_state_dict_named(state_dict, name)


def build_side_decoder(args, backbone: FrozenBackbone) -> ResidualSideNetDecoder:
    """Side layers shaped like the backbone's (shared embeddings and residual
    stream need the same width), with the SideNet's own dropout."""
    num_backbone = backbone.num_layers
    num_side = args.side_layers or max(1, num_backbone // 2)
    if not 1 <= num_side <= num_backbone:
        raise MemtrmUserError(
            f"--side-layers must be between 1 and the backbone's {num_backbone} layers, got {num_side}"
        )
    spans = side_layer_spans(num_backbone, num_side)
    memory_layer_id = args.side_memory_layer
    if memory_layer_id < 0:
        memory_layer_id = default_memory_layer(num_side)
    if not 0 <= memory_layer_id < num_side:
        raise MemtrmUserError(
            f"--side-memory-layer must be in [0, {num_side}) for {num_side} side layers, got {memory_layer_id}"
        )
    source_layer = args.memory_source_layer
    if source_layer < 0:
        source_layer = spans[memory_layer_id][1] - 1
    if not 0 <= source_layer < num_backbone:
        raise MemtrmUserError(
            f"--memory-source-layer must be in [0, {num_backbone}) for this backbone, got {source_layer}"
        )

    cfg = copy.deepcopy(backbone.decoder.cfg)
    cfg.dropout = args.dropout
    cfg.attention_dropout = args.attention_dropout
    cfg.activation_dropout = args.activation_dropout
    layers = []
    for index, (_, end) in enumerate(spans):
        if index == memory_layer_id:
            layer = build_memory_layer(cfg, args)
        else:
            layer = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
        if args.side_init == "backbone":
            source = backbone.decoder.layers[end - 1].state_dict()
            missing, unexpected = layer.load_state_dict(source, strict=False)
            assert not unexpected and all(k.split(".")[-1] in MEMORY_STATE for k in missing), (missing, unexpected)
        layers.append(layer)
    layer_norm = copy.deepcopy(backbone.decoder.layer_norm) if backbone.decoder.layer_norm is not None else None
    if layer_norm is not None:
        for parameter in layer_norm.parameters():
            parameter.requires_grad_(True)
    return ResidualSideNetDecoder(backbone, layers, spans, memory_layer_id, source_layer, layer_norm,
                                  residual_gate_init=args.side_residual_gate_init, gain=args.memory_param_gain)


# -------------------------------------------------------------------- archs
def longmem_defaults(args):
    """Defaults of the flags of longmem_sidenet_lm (the config's, written there once)."""
    fill_defaults(args, LongMemSideNetConfig)
    fill_defaults(args, MemoryConfig)


@register_model_architecture("longmem_sidenet_lm", "longmem_sidenet_lm_chunked")
def longmem_sidenet_lm_chunked(args):
    """LongMem's retrieval: chunks of 4 tokens, 16 chunks (64 tokens) per query."""
    args.memory_chunk_size = getattr(args, "memory_chunk_size", 4)
    args.knn_k = getattr(args, "knn_k", 64)
    longmem_defaults(args)


@register_model_architecture("longmem_sidenet_lm", "longmem_sidenet_lm_tiny")
def longmem_sidenet_lm_tiny(args):
    """8K-token memory: for tests and CPU demos (the shape is the backbone's)."""
    args.memory_size = getattr(args, "memory_size", 8192)
    longmem_defaults(args)
