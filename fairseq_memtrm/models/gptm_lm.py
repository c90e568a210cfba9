"""``gptm_lm``: fairseq's ``transformer_lm`` with a differentiable memory matrix
carried from segment to segment of a document ("GPTm"; ``docs/gptm.md``).

Per stream (batch row) and segment, in this order:

1. **reset** the rows whose document starts (``doc_start``), per stream set
   (``stream_id``: train, valid and test never share a matrix);
2. **read**: the ``s`` rows of ``S M`` (:func:`matrix_read`, ``S`` a frozen
   CountSketch saved with the model) are extra key/value slots of the
   self-attention at ``--gptm-layers`` (:class:`SlotAttention`), added through
   a per-head gate that starts at 0: a model fine-tuned from a vanilla
   ``transformer_lm`` starts as exactly that vanilla;
3. the decoder runs; its **summary** ``c`` of the segment is the last real
   token's final hidden state, scaled to unit length;
4. **write**: ``M <- M + sigmoid(0.5 (M + A) c) c^T`` (:func:`matrix_write`).

``M`` is differentiable across ``--gptm-bptt-segments`` segments: fairseq frees a
batch's graph after its backward, so in training the model keeps the last
segments' tokens and recomputes them from the matrix before them, with
gradients (truncated BPTT); beyond the window ``M`` is detached. Evaluation
(no gradients) recomputes nothing.

Everything but the attention of the read layers is the stock
``TransformerLanguageModel`` (same parameter names), so ``--finetune-from-model``
loads every weight of a vanilla checkpoint; only the gates, the slot addresses
``A`` and the sketch ``S`` start fresh.
"""

import logging
from contextlib import ExitStack
from dataclasses import dataclass
from typing import List, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)
from torch import Tensor, nn

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory.matrix_memory import (
    MatrixMemory,
    MatrixMemoryBank,
    count_sketch,
    keep_rows,
    matrix_read,
    matrix_write,
)
from fairseq_memtrm.models.memory_model import (
    DEFAULT_STREAM_SET,
    MemoryGateConfig,
    MemoryModel,
    check_compatible,
    check_gate_options,
    decoder_layer_with,
    fill_defaults,
    parse_memory_layers,
    register_sized_archs,
)
from fairseq_memtrm.modules.slot_attention import SlotAttention, SlotBinding

logger = logging.getLogger(__name__)

SKETCH_SEED = 0  # the CountSketch is drawn from its own generator, then saved with the model
ADDRESSES = ("learned", "fixed", "zero")


@dataclass
class GPTmConfig(MemoryGateConfig, TransformerLanguageModelConfig):
    gptm_slots: int = option(4096, "rows m of each stream's memory matrix M (m x model width)")
    gptm_sketch_size: int = option(64, "rows s of the CountSketch S: the memory slots each read layer attends to")
    gptm_learned_sketch: bool = option(False, "train S (initialised as the CountSketch); off: S stays fixed")
    gptm_addresses: ChoiceEnum(list(ADDRESSES)) = option(
        "learned",
        "slot addresses A in the write's match v = (M + A) c: random and learned, random and fixed, or zero (v = M "
        "c; every slot then receives the same writes)")
    gptm_bptt_segments: int = option(
        1,
        "segments back that the gradient follows M through its writes (truncated BPTT; each costs one more forward "
        "pass per training batch); 0: M is always detached")
    gptm_layers: str = option(
        "",
        "comma-separated 0-based indices of the decoder layers that read the memory slots; default: the layer at "
        "three quarters of the depth")
    gptm_decay: float = option(1.0, "M is multiplied by this before each write (1: no decay, the rule as given)")


def check_gptm_options(args) -> None:
    """One sentence per bad value, before anything is built."""
    check_gate_options(args)
    if args.gptm_slots < 1:
        raise MemtrmUserError(f"--gptm-slots must be >= 1, got {args.gptm_slots}")
    if not 1 <= args.gptm_sketch_size <= args.gptm_slots:
        raise MemtrmUserError(
            f"--gptm-sketch-size must be between 1 and --gptm-slots ({args.gptm_slots}), got {args.gptm_sketch_size}"
        )
    if args.gptm_bptt_segments < 0:
        raise MemtrmUserError(f"--gptm-bptt-segments must be >= 0, got {args.gptm_bptt_segments}")
    if not 0 < args.gptm_decay <= 1:
        raise MemtrmUserError(f"--gptm-decay must be in (0, 1], got {args.gptm_decay}")


@register_model("gptm_lm", dataclass=GPTmConfig)
class GPTmLanguageModel(MemoryModel, TransformerLanguageModel):
    """``forward(src_tokens (B, T), doc_start bool (B,), stream_id str)`` -> (logits, extra),
    with ``extra["memory_matrix"]`` (B, m, f) the matrix after this segment and
    ``extra["memory_slots"]`` (B, s, f) the slots this segment read (None: none read)."""

    def __init__(self, decoder):
        super().__init__(decoder)
        self.memory_layer_ids: List[int] = []
        self.memory_bank: Optional[MatrixMemoryBank] = None
        self.bptt_segments = 0
        self.decay = 1.0

    check_options = staticmethod(check_gptm_options)

    def install_memory(self, args) -> None:
        decoder = self.decoder
        dim = decoder.embed_dim
        self.memory_layer_ids = parse_memory_layers(args.gptm_layers, len(decoder.layers))
        for index in self.memory_layer_ids:
            decoder.layers[index] = decoder_layer_with(decoder.cfg, SlotAttention,
                                                       memory_param_gain=args.memory_param_gain)
        sketch = count_sketch(args.gptm_sketch_size, args.gptm_slots, SKETCH_SEED)
        if args.gptm_learned_sketch:
            self.gptm_sketch = nn.Parameter(sketch)
        else:
            self.register_buffer("gptm_sketch", sketch)
        # A ~ N(0, 1): against a unit-length c, each slot's address match is N(0, 1), the size of one write's
        addresses = torch.randn(args.gptm_slots, dim, generator=torch.Generator().manual_seed(SKETCH_SEED + 1))
        if args.gptm_addresses == "learned":
            self.gptm_addresses = nn.Parameter(addresses)
        elif args.gptm_addresses == "fixed":
            self.register_buffer("gptm_addresses", addresses)
        else:
            self.gptm_addresses = None
        self.bptt_segments = args.gptm_bptt_segments
        self.decay = args.gptm_decay
        self.memory_bank = MatrixMemoryBank(args.gptm_slots, dim, args.gptm_bptt_segments)
        logger.info(
            "GPTm: M %d x %d per stream (%.1f MiB), sketch %d rows (%s), addresses %s, read by layers %s, "
            "BPTT over %d segment(s), decay %g", args.gptm_slots, dim, self.memory_bank.bytes_per_stream() / 2**20,
            args.gptm_sketch_size, "learned" if args.gptm_learned_sketch else "fixed", args.gptm_addresses,
            self.memory_layer_ids, args.gptm_bptt_segments, args.gptm_decay,
        )

    def memory_attentions(self) -> List[SlotAttention]:
        return [self.decoder.layers[i].self_attn for i in self.memory_layer_ids]

    # ---------------------------------------------------------------- forward
    def summary(self, features: Tensor, src_tokens: Tensor) -> Tensor:
        """(B, f) the final hidden state of each row's last real token (the causal model's
        own summary of everything in the segment), scaled to unit length."""
        last = src_tokens.ne(self.decoder.padding_idx).sum(dim=1).clamp(min=1) - 1
        rows = torch.arange(src_tokens.size(0), device=src_tokens.device)
        return nn.functional.normalize(features[rows, last].float(), dim=-1, eps=1e-6)

    def read_segment(self, src_tokens: Tensor, matrix: Tensor, written: Tensor, **kwargs):
        """Run the decoder on one segment reading ``matrix`` (rows ``written`` only):
        (features (B, T, C), extra, slots or None)."""
        if not bool(written.any()):  # nothing to read: the stock decoder, exactly
            features, extra = self.decoder(src_tokens, features_only=True, **kwargs)
            return features, extra, None
        slots = matrix_read(matrix, self.gptm_sketch)
        binding = SlotBinding(slots, written)
        with ExitStack() as stack:
            for attention in self.memory_attentions():
                stack.enter_context(attention.bind(binding))
            features, extra = self.decoder(src_tokens, features_only=True, **kwargs)
        return features, extra, slots

    def write_segment(self, matrix: Tensor, features: Tensor, src_tokens: Tensor) -> Tensor:
        return matrix_write(matrix, self.summary(features, src_tokens), self.gptm_addresses, self.decay)

    def replay(self, memory: MatrixMemory):
        """Recompute the BPTT window's segments from ``memory.base``, with gradients:
        (matrix, written, [(matrix, written) after each window segment])."""
        matrix, written, steps = memory.base, memory.base_written, []
        for src_tokens, doc_start in memory.window:
            matrix, written = keep_rows(matrix, written, doc_start)
            features, _, _ = self.read_segment(src_tokens, matrix, written)
            matrix = self.write_segment(matrix, features, src_tokens)
            written = torch.ones_like(written)
            steps.append((matrix, written))
        return matrix, written, steps

    def forward(self, src_tokens: Tensor, doc_start: Optional[Tensor] = None, stream_id: Optional[str] = None,
                memory_bank: Optional[MatrixMemoryBank] = None, knn_k: Optional[int] = None,
                record_retrievals: bool = False, **kwargs):
        """``src_tokens`` (B, T) -> (logits (B, T, V), extra). ``memory_bank`` None: the
        model's own; ``knn_k`` does not apply; ``record_retrievals`` gives an empty
        ``extra["retrievals"]`` (a matrix retrieves no tokens)."""
        bank = self.memory_bank if memory_bank is None else memory_bank
        memory = bank.select(stream_id or DEFAULT_STREAM_SET, src_tokens.size(0), doc_start, src_tokens.device)[0]
        if doc_start is None:
            doc_start = torch.ones(src_tokens.size(0), dtype=torch.bool, device=src_tokens.device)
        recurrent = self.training and torch.is_grad_enabled() and self.bptt_segments > 0
        steps = []
        if recurrent:
            matrix, written, steps = self.replay(memory)
            matrix, written = keep_rows(matrix, written, doc_start)
        else:
            matrix, written = memory.matrix, memory.written  # reset at doc_start by bank.select
        features, extra, slots = self.read_segment(src_tokens, matrix, written, **kwargs)
        matrix = self.write_segment(matrix, features, src_tokens)
        memory.commit(matrix, torch.ones_like(written), src_tokens, doc_start,
                      self.bptt_segments if recurrent else 0, steps)
        extra["memory_matrix"], extra["memory_slots"] = matrix, slots
        if record_retrievals:
            extra["retrievals"] = {}
        return self.decoder.output_layer(features), extra

    # ------------------------------------------------------------ checkpoints
    def upgrade_state_dict_named(self, state_dict, name):
        """Loads vanilla ``transformer_lm`` checkpoints: the sketch and the addresses
        start at this model's own values (the gates: see :class:`SlotAttention`);
        every other incompatibility is one sentence instead of torch's key dump."""
        super().upgrade_state_dict_named(state_dict, name)
        if name == "":
            for key in ("gptm_sketch", "gptm_addresses"):
                own = getattr(self, key)
                if own is not None and key not in state_dict:
                    state_dict[key] = own.detach().clone()
            check_compatible(self, state_dict)


def gptm_defaults(args):
    """Defaults of the flags of gptm_lm (the config's, written there once); the rest of
    the decoder is ``transformer_lm``'s own (post-norm), as the project's vanilla."""
    args.decoder_input_dim = getattr(args, "decoder_input_dim", args.decoder_embed_dim)
    args.decoder_output_dim = getattr(args, "decoder_output_dim", args.decoder_embed_dim)
    fill_defaults(args, GPTmConfig)


register_sized_archs("gptm_lm", gptm_defaults, small={"share_decoder_input_output_embed": True},
                     tiny={"gptm_slots": 256})
