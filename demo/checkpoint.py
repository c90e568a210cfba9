"""Load a memorizing checkpoint and its tokenizer for the demo.

A checkpoint of this plugin is read with everything it needs to turn text into
the token ids it was trained on: the fairseq dictionary (``dict.txt``) and the
SentencePiece model (``spm.model``), both found next to the checkpoint (the
demo assets) or in its data-bin. Documents are encoded by the encoder
``scripts/prepare_data.py`` uses (``fairseq_memtrm/data/encoding.py``).
"""

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

import fairseq_memtrm  # noqa: F401  (fills fairseq's registries)
from fairseq_memtrm.checkpoint_files import load_checkpoint_to_cpu
from fairseq_memtrm.data.encoding import document_ids
from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger(__name__)

DEMO_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
#: The committed demo models, one per corpus, each built by ``scripts/make_demo_model.py --corpus NAME``
#: into ``demo/assets/NAME/`` with its ``spm.model`` and ``dict.txt``.
DEMO_CHECKPOINTS = {name: os.path.join(DEMO_ASSETS, name, "demo_model.pt") for name in ("code", "books")}
DEMO_CHECKPOINT = DEMO_CHECKPOINTS["code"]
#: The plugin's models with a kNN memory (arch names start with these); both expose the memory
#: bank, its layers and the retrieval records that ``report.build_report`` reads.
MEMORY_MODELS = ("memorizing_transformer_lm", "longmem_sidenet_lm")
SPM_NAMES = ("spm.model", "sentencepiece.bpe.model", "spm.bpe.model")
SPACE = "\u2581"  # SentencePiece's word-boundary mark


@dataclass
class DemoModel:
    model: torch.nn.Module
    dictionary: object  # fairseq Dictionary
    spm: object  # sentencepiece.SentencePieceProcessor
    segment_length: int
    checkpoint: str

    @property
    def checkpoint_label(self) -> str:
        """The checkpoint's path as a person would type it: relative where it is under the working directory."""
        relative = os.path.relpath(self.checkpoint)
        return self.checkpoint if relative.startswith("..") else relative

    def encode(self, text: str) -> List[int]:
        """Document text -> token ids, as ``prepare_data.py`` encodes training data (``data.encoding``)."""
        return document_ids(self.spm, self.dictionary, text)

    def token_texts(self, token_ids) -> List[str]:
        """Display text of every token of a document: SentencePiece's dummy-prefix
        space at the start of each line is dropped, so the text reads as written."""
        eos = self.dictionary.eos()
        texts, previous = [], eos
        for token_id in token_ids:
            text = self.token_text(int(token_id))
            if previous == eos and text.startswith(" "):
                text = text[1:]
            texts.append(text)
            previous = int(token_id)
        return texts

    def token_text(self, token_id: int) -> str:
        """How one token reads in the document: spaces restored, ``</s>`` a line break."""
        if token_id == self.dictionary.eos():
            return "\n"
        piece = self.dictionary[token_id]
        if piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            byte = int(piece[3:-1], 16)
            return chr(byte) if 32 <= byte < 127 or byte == 9 else piece
        return piece.replace(SPACE, " ")


def _find_assets(checkpoint: str, cfg, data: Optional[str], spm_model: Optional[str]):
    """The directory holding dict.txt and the SentencePiece model."""
    candidates = [data] if data else [os.path.dirname(os.path.abspath(checkpoint)), cfg.task.data]
    complete = lambda d: spm_model is not None or any(os.path.isfile(os.path.join(d, n)) for n in SPM_NAMES)
    with_dict = [d for d in candidates if d and os.path.isfile(os.path.join(d, "dict.txt"))]
    data_dir = next((d for d in with_dict if complete(d)), with_dict[0] if with_dict else None)
    if data_dir is None:
        raise MemtrmUserError(
            f"no dict.txt next to {checkpoint} nor in its data-bin {cfg.task.data!r}; "
            "pass --data DATA_BIN (the directory prepare_data.py wrote)"
        )
    if spm_model is None:
        spm_model = next(
            (os.path.join(data_dir, n) for n in SPM_NAMES if os.path.isfile(os.path.join(data_dir, n))), None
        )
    if spm_model is None or not os.path.isfile(spm_model):
        raise MemtrmUserError(f"no SentencePiece model in {data_dir}; pass --spm-model SPM.model")
    return data_dir, spm_model


def load_demo_model(
    checkpoint: str = DEMO_CHECKPOINT,
    data: Optional[str] = None,
    spm_model: Optional[str] = None,
    segment_length: Optional[int] = None,
    cpu: bool = False,
) -> DemoModel:
    """Load ``checkpoint`` (a local file only; fp16 checkpoints are upcast to fp32
    on CPU) with its dictionary and SentencePiece model."""
    import sentencepiece
    from fairseq import checkpoint_utils

    if "://" in checkpoint:
        raise MemtrmUserError(
            f"checkpoint {checkpoint!r} is not a local file; the demo loads only local checkpoints "
            "(download it yourself, or run `make demo-model`)"
        )
    if not os.path.isfile(checkpoint):
        raise MemtrmUserError(f"no checkpoint file {checkpoint}; run `make demo-model` or pass --checkpoint CKPT")
    state = load_checkpoint_to_cpu(checkpoint, flag="--checkpoint")  # a bad file: one sentence
    cfg = state.get("cfg")
    if cfg is None or not str(cfg.model.get("_name", "")).startswith(MEMORY_MODELS):
        raise MemtrmUserError(
            f"{checkpoint} is not a checkpoint of this plugin's memory models ({', '.join(MEMORY_MODELS)}); "
            "fine-tune one with --arch memorizing_transformer_lm_* (scripts/finetune_memory.sh) first"
        )
    data_dir, spm_model = _find_assets(checkpoint, cfg, data, spm_model)
    with_data = {"data": data_dir}
    checkpoint_utils.overwrite_args_by_name(cfg, with_data)
    cfg.common.user_dir = None  # the plugin is imported above; a stored path may not exist here
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], with_data, state=state)
    model = models[0].float()
    if torch.cuda.is_available() and not cpu:
        model = model.cuda()
    model.eval()
    processor = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    tokens_per_sample = int(cfg.task.get("tokens_per_sample", 512) or 512)
    logger.info("loaded %s (memory layers %s) with %s", checkpoint, model.memory_layer_ids, spm_model)
    return DemoModel(model, task.target_dictionary, processor, segment_length or tokens_per_sample, checkpoint)
