"""``repeat_lm``: fairseq's ``language_modeling`` with repeated spans mixed into training.

Why: a kNN memory extends attention, so it can only help a model whose attention
already copies from its context (induction heads: "the last time this came,
that followed"). A small ``transformer_lm`` trained for a few million tokens,
as on 2 CPU cores, has not learned that yet: repeating a passage inside the
context leaves its loss unchanged (``scripts/copy_score.py`` measures it). At
that scale the memory has nothing to extend.

A standard remedy is a synthetic curriculum: in a fraction ``--repeat-prob`` of
the training blocks, a span of ``--repeat-min-len``..``--repeat-max-len`` tokens
is written again later in the same block, so that predicting it rewards copying.
Everything else is ``language_modeling`` unchanged; validation and test splits
are never touched, and the choice of span is a deterministic function of
(seed, epoch, block), so a resumed run sees the same data.
"""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, data_utils
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.errors import MemtrmUserError, check_repeat_flags

logger = logging.getLogger(__name__)


class RepeatSpanDataset(BaseWrapperDataset):
    """Wraps a ``TokenBlockDataset(include_targets=True)``: items are
    ``(source, target, past_target)`` with ``source[1:] == target[:-1]``.
    With probability ``prob`` an item gets ``target[b:b+L] = target[a:a+L]``
    (``a + L <= b``) and its source is shifted from the new target."""

    def __init__(self, dataset, prob: float, min_len: int, max_len: int, seed: int):
        super().__init__(dataset)
        self.prob, self.min_len, self.max_len, self.seed = prob, min_len, max_len, seed
        self.epoch = 1

    @property
    def can_reuse_epoch_itr_across_epochs(self):
        return False  # the spans change with the epoch

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.epoch = epoch

    def span(self, index: int, length: int):
        """(source start, copy start, span length) for item ``index``, or None."""
        with data_utils.numpy_seed(self.seed, self.epoch, index):
            if np.random.rand() >= self.prob:
                return None
            span = min(np.random.randint(self.min_len, self.max_len + 1), length // 2)
            if span < 2:
                return None
            copy_start = np.random.randint(span, length - span + 1)
            source_start = np.random.randint(0, copy_start - span + 1)
            return int(source_start), int(copy_start), int(span)

    def __getitem__(self, index):
        source, target, past_target = self.dataset[index]
        where = self.span(index, len(target))
        if where is None:
            return source, target, past_target
        start, copy_start, span = where
        target = target.clone()
        target[copy_start : copy_start + span] = target[start : start + span]
        source = torch.cat([source[:1], target[:-1]])
        return source, target, past_target


@dataclass
class RepeatLMConfig(LanguageModelingConfig):
    repeat_prob: float = option(
        0.5,
        "fraction of training blocks that get one repeated span (0: plain language_modeling)")
    repeat_min_len: int = option(8, "shortest repeated span, in tokens")
    repeat_max_len: int = option(128, "longest repeated span, in tokens (at most half a block)")


@register_task("repeat_lm", dataclass=RepeatLMConfig)
class RepeatLMTask(LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        check_repeat_flags("repeat", args.repeat_prob, args.repeat_min_len, args.repeat_max_len)
        if args.sample_break_mode not in (None, "none"):
            raise MemtrmUserError("--task repeat_lm needs --sample-break-mode none (fixed-length blocks)")

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if split == "train" and self.args.repeat_prob > 0:
            dataset = self.datasets[split]
            dataset.dataset = RepeatSpanDataset(
                dataset.dataset, self.args.repeat_prob, self.args.repeat_min_len,
                self.args.repeat_max_len, self.args.seed,
            )
            logger.info(
                "%s: %.0f%% of blocks get a repeated span of %d-%d tokens", split,
                100 * self.args.repeat_prob, self.args.repeat_min_len, self.args.repeat_max_len,
            )
