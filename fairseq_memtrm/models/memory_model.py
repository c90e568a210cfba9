"""What every memory model has, written once: its memory flags, their checks, the
memory layers, and binding the memory to those layers for one forward pass.

A memory model (``memorizing_transformer_lm``, ``longmem_sidenet_lm``, the ones
to come) is a fairseq language model that

* declares its flags in a config class that extends :class:`MemoryConfig`
  (``--memory-size``, ``--knn-k``, ``--memory-backend``, ...) and fills their
  defaults in its archs with :func:`fill_defaults`;
* calls :func:`check_memory_options` in ``build_model`` and builds its memory
  with :func:`build_memory_bank` and its memory layers with :func:`build_memory_layer`;
* mixes in :class:`MemoryModel`, whose ``forward`` consumes the batch keys
  ``doc_start`` and ``stream_id`` and binds this batch's memories to the layers
  with :meth:`MemoryModel.bind_memory` while the decoder runs.

``forward`` also takes three keyword arguments that no fairseq batch carries, for
analysis and the demo: ``memory_bank`` (read and write another bank than the
model's own, e.g. one of another size), ``knn_k`` (another k) and
``record_retrievals`` (return what every memory layer retrieved, in
``extra["retrievals"]``). Nothing of them stays on the model after the call.
See ``docs/architecture.md`` for the flow of one segment.
"""

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import register_model_architecture
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from torch import Tensor

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import MemoryBank
from fairseq_memtrm.memory.search import parse_backend_spec
from fairseq_memtrm.modules.gated_memory_attention import DEFAULT_MEMORY_PARAM_GAIN
from fairseq_memtrm.modules.knn_attention import KNNAugmentedAttention, MemoryBinding

logger = logging.getLogger(__name__)

#: The stream set of a batch without ``stream_id`` (e.g. fairseq's ``language_modeling`` task).
DEFAULT_STREAM_SET = "default"


@dataclass
class MemoryGateConfig(FairseqDataclass):
    """The flag of every memory model with a learned per-head gate (the kNN models and GPTm)."""

    memory_param_gain: float = option(
        DEFAULT_MEMORY_PARAM_GAIN,
        "the per-head gate (and the kNN memory's log-temperature) are stored divided by this gain, so Adam moves "
        "them this many times faster than other weights (a scalar moves about lr per update)")


@dataclass
class MemoryConfig(MemoryGateConfig):
    """The flags every kNN memory model shares. A model's config extends it:
    ``class MyConfig(MemoryConfig, TransformerLanguageModelConfig)``."""

    memory_size: int = option(65536, "tokens of kNN memory per stream (batch row); oldest are evicted first")
    knn_k: int = option(32, "entries retrieved from memory per query and head")
    memory_gate_init: float = option(0.0, "initial per-head gate bias b_h; memory weight is sigmoid(b_h)")
    memory_dtype: ChoiceEnum(["fp32", "fp16"]) = option(
        "fp32",
        "storage dtype of memory keys/values (fp16 halves RAM)")
    memory_backend: str = option(
        "exact",
        "top-k search backend: exact (blocked matmul), faiss-flat, faiss-ivf, faiss-hnsw; options after a colon, "
        "e.g. faiss-ivf:nprobe=32 (see docs/benchmark.md)")


def fill_defaults(args, config_class) -> None:
    """For an arch function: give ``args`` the default of every field that
    ``config_class`` or one of the plugin's configs it extends declares (not
    fairseq's: the arch functions fill those) and ``args`` lacks."""
    own = set()
    for cls in config_class.__mro__:
        if cls.__module__.startswith("fairseq_memtrm"):
            own.update(vars(cls).get("__annotations__", {}))
    for config_field in fields(config_class):
        if config_field.name in own and not hasattr(args, config_field.name):
            setattr(args, config_field.name, config_field.default)


#: The decoder of every memory model's ``_small`` and ``_tiny`` arch. small: 6 x 256,
#: 4 heads, the vanilla's shape (SHAPE in scripts/common.sh), ~2K tokens/s on 2 CPU
#: cores; tiny: 4 x 128, 4 heads of 32 dims, for tests and CPU demos.
DECODER_SHAPES = {
    "small": dict(decoder_layers=6, decoder_embed_dim=256, decoder_ffn_embed_dim=1024, decoder_attention_heads=4),
    "tiny": dict(decoder_layers=4, decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_attention_heads=4),
}


def register_sized_archs(model_name: str, model_defaults, **size_defaults: dict) -> None:
    """Register ``MODEL_small`` and ``MODEL_tiny``: the decoder of
    ``DECODER_SHAPES[size]`` and the flag defaults ``size_defaults[size]``, then
    ``model_defaults(args)``; a flag given on the command line wins.
    E.g. ``register_sized_archs("gptm_lm", gptm_defaults, tiny={"gptm_slots": 256})``."""
    for size, shape in DECODER_SHAPES.items():
        defaults = {**shape, **size_defaults.get(size, {})}

        def arch(args, defaults=defaults):
            for name, value in defaults.items():
                if not hasattr(args, name):
                    setattr(args, name, value)
            model_defaults(args)

        arch.__name__ = arch.__qualname__ = f"{model_name}_{size}"
        register_model_architecture(model_name, arch.__name__)(arch)


# -------------------------------------------------------------- validation
def check_gate_options(args) -> None:
    """The flag of :class:`MemoryGateConfig`, checked before anything is built."""
    if not args.memory_param_gain > 0:
        raise MemtrmUserError(f"--memory-param-gain must be positive, got {args.memory_param_gain}")


def check_memory_options(args) -> None:
    """The shared flags, checked before anything is built; ``--knn-k`` beyond the
    memory size is clamped to it (no memory can return more than it holds)."""
    check_gate_options(args)
    parse_backend_spec(args.memory_backend)  # a clear error for a bad name or option
    if args.memory_size < 0:
        raise MemtrmUserError(f"--memory-size must be >= 0, got {args.memory_size}")
    if args.knn_k < 0 or (args.knn_k == 0 and args.memory_size > 0):  # k = 0: a memory nobody reads
        raise MemtrmUserError(
            f"--knn-k must be >= 1 to read the memory, got {args.knn_k}; to turn the memory off use --memory-size 0"
        )
    if args.memory_size > 0 and args.knn_k > args.memory_size:
        logger.warning("--knn-k %d exceeds --memory-size %d: clamped to %d (a memory cannot return more entries "
                       "than it holds)", args.knn_k, args.memory_size, args.memory_size)
        args.knn_k = args.memory_size


def default_memory_layer(num_layers: int) -> int:
    """The layer at three quarters of the depth (0-based), as in the paper (8 of 12)."""
    return max(0, (3 * num_layers) // 4 - 1)


def parse_memory_layers(spec: str, num_layers: int) -> List[int]:
    """``--memory-layers`` ("1,3", or "" for :func:`default_memory_layer`) -> sorted layer indices."""
    if not spec:
        return [default_memory_layer(num_layers)]
    try:
        layers = sorted({int(part) for part in str(spec).split(",") if part.strip()})
    except ValueError:
        raise MemtrmUserError(f"--memory-layers expects comma-separated integers, got {spec!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise MemtrmUserError(
            f"--memory-layers {spec!r}: indices must be 0-based and below --decoder-layers ({num_layers})"
        )
    return layers


# ---------------------------------------------------------------- building
def decoder_layer_with(cfg, attention_class, **attention_options) -> TransformerDecoderLayerBase:
    """A stock decoder layer (``cfg``: a ``TransformerConfig``) whose self-attention is an
    ``attention_class`` (a ``MultiheadAttention`` with the same parameter names), built
    with the layer's own dropout and quantisation noise and ``attention_options``."""
    layer = TransformerDecoderLayerBase(cfg, no_encoder_attn=True)
    layer.self_attn = attention_class(
        layer.embed_dim,
        cfg.decoder.attention_heads,
        dropout=cfg.attention_dropout,
        q_noise=layer.quant_noise,
        qn_block_size=layer.quant_noise_block_size,
        **attention_options,
    )
    return layer


def build_memory_layer(cfg, args, **attention_options) -> TransformerDecoderLayerBase:
    """A stock decoder layer whose self-attention is kNN-augmented with the shared
    flags of ``args``; ``attention_options`` go to :class:`KNNAugmentedAttention`
    (``memory_scale_init``, ``memory_query``, ...)."""
    return decoder_layer_with(cfg, KNNAugmentedAttention, knn_k=args.knn_k, memory_gate_init=args.memory_gate_init,
                              memory_param_gain=args.memory_param_gain, **attention_options)


def build_memory_bank(args, attentions: Dict[int, KNNAugmentedAttention], **options) -> MemoryBank:
    """The bank of ``args``' memory (size, dtype, backend) for the layers ``attentions``
    ({layer id: attention}); ``options``: ``chunk_size``, ``shift_keys``."""
    layers = {layer: (attention.num_heads, attention.head_dim) for layer, attention in attentions.items()}
    return MemoryBank(layers, memory_size=args.memory_size, dtype=args.memory_dtype, backend=args.memory_backend,
                      **options)


# ------------------------------------------------------------- checkpoints
def check_compatible(model, state_dict) -> None:
    """Every incompatibility between ``model`` and a checkpoint's (upgraded) ``state_dict``
    as one clear sentence instead of torch's key dump: missing layers, another
    architecture, another dictionary, another width."""
    own = model.state_dict()
    vocab_keys = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
    for key, tensor in own.items():
        if key not in state_dict:
            if key.startswith("decoder.layers."):
                layers = {k.split(".")[2] for k in state_dict if k.startswith("decoder.layers.")}
                raise MemtrmUserError(
                    f"checkpoint lacks {key}: it has {len(layers)} decoder layers, this model "
                    f"{len(model.decoder.layers)}; use the checkpoint's --arch and --decoder-layers"
                )
            raise MemtrmUserError(
                f"checkpoint lacks tensor {key}; it was saved by a different architecture "
                "(e.g. adaptive input/softmax vs plain embeddings): use the checkpoint's --arch"
            )
        theirs = state_dict[key]
        if tuple(theirs.shape) != tuple(tensor.shape):
            if key in vocab_keys and theirs.dim() == 2 and theirs.shape[1:] == tensor.shape[1:]:
                raise MemtrmUserError(
                    f"dictionary mismatch: the checkpoint was trained with {theirs.shape[0]} "
                    f"symbols but this data's dictionary has {tensor.shape[0]}; binarize the data "
                    "with the checkpoint's dict.txt (fairseq-preprocess --srcdict DICT) or "
                    "prepare_data.py --spm-model/--dict from the checkpoint's data-bin"
                )
            raise MemtrmUserError(
                f"tensor {key} has shape {tuple(theirs.shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in this model; set --arch / --decoder-embed-dim / "
                "--decoder-ffn-embed-dim / --decoder-attention-heads to the checkpoint's values"
            )
    extra = sorted(k for k in state_dict if k not in own)
    if extra:
        raise MemtrmUserError(
            f"checkpoint has tensors this model lacks (e.g. {extra[0]}); it has more layers or "
            "another architecture: use the checkpoint's --arch and --decoder-layers"
        )


# ----------------------------------------------------------------- binding
class MemoryModel:
    """Mixin of a fairseq language model whose layers ``memory_layer_ids`` read a kNN memory.

    The model sets ``memory_bank`` and ``memory_layer_ids`` and returns those layers'
    attentions from :meth:`memory_attentions` (each with ``gate_values()``, which the
    evaluation scripts report). Put it first among the bases, so that its ``forward``
    is the model's. A memory of another kind (``gptm_lm``: a matrix, not a kNN store)
    overrides ``forward`` with the same arguments, and its bank extends
    :class:`~fairseq_memtrm.memory.bank.StreamSetBank`.
    """

    memory_bank: MemoryBank
    memory_layer_ids: List[int]
    #: False where another network writes the memory (LongMem: the frozen backbone's keys).
    attention_writes_memory = True

    @staticmethod
    def check_options(args) -> None:
        """Stop with one sentence on a bad memory flag (before anything is built)."""
        check_memory_options(args)

    @classmethod
    def build_model(cls, args, task):
        """The base model's, then :meth:`install_memory` (a model built otherwise overrides this)."""
        cls.check_options(args)
        model = super().build_model(args, task)
        model.install_memory(args)
        return model

    def install_memory(self, args) -> None:
        """Put the memory into the layers ``args`` names and set ``memory_layer_ids`` and ``memory_bank``."""
        raise NotImplementedError

    def memory_attentions(self) -> List[KNNAugmentedAttention]:
        """The attention of each memory layer, in the order of ``memory_layer_ids``."""
        raise NotImplementedError

    def memory_input(self, src_tokens: Tensor, layer_id: int) -> Optional[Tensor]:
        """(T, B, C) what layer ``layer_id`` computes its memory keys and queries from,
        where that is not its own input (position-free keys); None: its own input."""
        return None

    @contextmanager
    def bind_memory(self, src_tokens: Tensor, doc_start: Optional[Tensor] = None, stream_id: Optional[str] = None,
                    memory_bank: Optional[MemoryBank] = None, knn_k: Optional[int] = None,
                    record_retrievals: bool = False) -> Iterator[Dict[int, MemoryBinding]]:
        """Bind this batch's memories to the memory layers for the forward passes inside.

        ``src_tokens`` (B, T); ``doc_start`` bool (B,), the rows whose memory is reset
        first (None: all); ``stream_id`` the stream set (None: ``DEFAULT_STREAM_SET``);
        ``memory_bank`` None: the model's own; ``knn_k`` None: each layer's ``--knn-k``.
        Yields {layer id: :class:`MemoryBinding`}; with ``record_retrievals`` each
        binding's ``record`` holds what its layer retrieved, once the pass is over.
        """
        bank = self.memory_bank if memory_bank is None else memory_bank
        memories = bank.select(stream_id or DEFAULT_STREAM_SET, src_tokens.size(0), doc_start, src_tokens.device)
        token_mask = src_tokens.ne(self.decoder.padding_idx)  # padding is never written
        bindings = {
            layer: MemoryBinding(memories[layer], token_mask, self.memory_input(src_tokens, layer),
                                 write=self.attention_writes_memory, knn_k=knn_k,
                                 record_retrievals=record_retrievals)
            for layer in self.memory_layer_ids
        }
        with ExitStack() as stack:
            for layer, attention in zip(self.memory_layer_ids, self.memory_attentions()):
                stack.enter_context(attention.bind(bindings[layer]))
            yield bindings

    def forward(self, src_tokens: Tensor, doc_start: Optional[Tensor] = None, stream_id: Optional[str] = None,
                memory_bank: Optional[MemoryBank] = None, knn_k: Optional[int] = None,
                record_retrievals: bool = False, **kwargs):
        """``src_tokens`` (B, T) -> (logits (B, T, V), extra), reading and writing the
        memory of ``stream_id`` (see :meth:`bind_memory`). With ``record_retrievals``,
        ``extra["retrievals"]`` is {layer id: ``RetrievalRecord``} for the layers that
        retrieved something (a layer whose memory was empty has none)."""
        with self.bind_memory(src_tokens, doc_start, stream_id, memory_bank, knn_k, record_retrievals) as bindings:
            output = self.decoder(src_tokens, **kwargs)
        if record_retrievals:
            output[1]["retrievals"] = {
                layer: binding.record for layer, binding in bindings.items() if binding.record is not None
            }
        return output
