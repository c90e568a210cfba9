"""``--task document_lm``: documents read in order, one stream per batch row.

Follows fairseq's ``examples/truncated_bptt``: ``get_batch_iterator`` returns
an ``EpochBatchIterator`` whose every item is a whole batch, with fairseq's
shuffling turned off; documents are shuffled here, per epoch, from the seed
(train only). See :mod:`fairseq_memtrm.data.document_streams` for the layout
and a worked example of which rank reads which rows.

Batches carry ``net_input`` = {src_tokens (B, T), src_lengths (B,),
doc_start bool (B,), stream_id str} and ``target`` (B, T). ``stream_id`` is
the split's name, so validation in the middle of training and
fairseq-eval-lm keep their own memory and never touch the train streams'.

Models whose ``forward`` does not name ``doc_start`` (e.g. a vanilla
``transformer_lm``) get those two keys dropped before their forward runs, so
they read the same segments as a baseline, without memory.

Resuming from ``checkpoint_last.pt`` mid-epoch continues with the next batch
of the same streams, but the kNN memory is not saved in checkpoints: it
restarts empty and refills from the next segments on.

Under fairseq's distributed training (docs/distributed.md) rank r of W reads
the global streams ``rB .. rB+B-1`` of ``B x W``: fairseq passes the rank and
world size as ``shard_id``/``num_shards`` to ``get_batch_iterator``, and every
rank gets as many batches. Each process keeps its own memory; the task logs,
on every rank, its streams and memory, and checks that the memories of all
ranks on one host fit in its RAM. ``--stream-log PREFIX`` writes, per rank,
``PREFIX.rankR.jsonl``: one line per training batch with its documents,
segments, loss and a digest of the weights it was computed with.
"""

import hashlib
import inspect
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II
import torch

from fairseq_memtrm.config_fields import option
from fairseq_memtrm.data import DistantRepeats, DocumentDataset, DocumentStreamDataset
from fairseq_memtrm.distributed import rank_and_world
from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger(__name__)

STREAM_KEYS = ("doc_start", "stream_id")


@dataclass
class DocumentLMConfig(FairseqDataclass):
    data: str = option("???", "data-bin folder from scripts/prepare_data.py (dict.txt, train/valid/test .bin/.idx)")
    tokens_per_sample: int = option(512, "segment length: tokens each row reads per batch")
    batch_size: Optional[int] = II("dataset.batch_size")
    max_tokens: Optional[int] = II("dataset.max_tokens")
    train_subset: str = II("dataset.train_subset")
    seed: int = II("common.seed")
    max_target_positions: Optional[int] = II("task.tokens_per_sample")
    # transformer_lm's config reads task.add_bos_token; documents start with </s>.
    add_bos_token: bool = option(False, "unsupported by document_lm (documents start with </s>); keep False")
    distant_repeat_prob: float = option(
        0.0,
        "training curriculum: share of train segments in which a span is replaced by a copy of a span from at least "
        "--distant-repeat-min-distance tokens earlier in the same document, so that only the memory holds it (0: off; "
        "valid and test are never changed)")
    distant_repeat_min_len: int = option(8, "shortest distant repeat, in tokens")
    distant_repeat_max_len: int = option(64, "longest distant repeat, in tokens")
    distant_repeat_min_distance: Optional[int] = option(
        None, "least distance, in tokens, from a repeat's origin to its copy (default: --tokens-per-sample)")
    distant_repeat_max_distance: Optional[int] = option(
        None, "greatest distance, in tokens, from a repeat's origin to its copy, e.g. the memory size (default: "
        "anywhere earlier in the document)")
    stream_log: Optional[str] = option(
        None,
        "write PREFIX.rankR.jsonl per rank: every training batch's documents, segments, loss and weight digest (for "
        "checking distributed runs and resumes)")


def free_ram_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 1 << 62


def drop_stream_keys(module, args, kwargs):
    """Forward pre-hook for models that do not know document streams."""
    return args, {key: value for key, value in kwargs.items() if key not in STREAM_KEYS}


@register_task("document_lm", dataclass=DocumentLMConfig)
class DocumentLMTask(FairseqTask):
    def __init__(self, cfg: DocumentLMConfig, dictionary: Dictionary):
        super().__init__(cfg)
        self.dictionary = dictionary
        if cfg.tokens_per_sample <= 0:
            raise MemtrmUserError(f"--tokens-per-sample must be positive, got {cfg.tokens_per_sample}")
        if cfg.add_bos_token:
            raise MemtrmUserError("--add-bos-token is not supported by --task document_lm; drop it")
        self.streams_per_rank = self._streams_per_rank(cfg)
        self.distant_repeats = None
        if cfg.distant_repeat_prob != 0:
            self.distant_repeats = DistantRepeats(
                cfg.distant_repeat_prob, cfg.distant_repeat_min_len, cfg.distant_repeat_max_len,
                cfg.tokens_per_sample if cfg.distant_repeat_min_distance is None else cfg.distant_repeat_min_distance,
                cfg.distant_repeat_max_distance, cfg.seed,
            )
        self.memory_bank = None  # the model's, when it has a kNN memory
        self.ranks_on_host = 1
        self._stream_log = None

    @staticmethod
    def _streams_per_rank(cfg) -> int:
        if cfg.batch_size:
            return cfg.batch_size
        if cfg.max_tokens and cfg.max_tokens >= cfg.tokens_per_sample:
            return cfg.max_tokens // cfg.tokens_per_sample
        raise MemtrmUserError(
            "--task document_lm needs --batch-size B (B streams per rank, each reading its own "
            "documents in order), or --max-tokens of at least --tokens-per-sample"
        )

    @classmethod
    def setup_task(cls, cfg: DocumentLMConfig, **kwargs):
        paths = utils.split_paths(cfg.data)
        if not paths or not os.path.isfile(os.path.join(paths[0], "dict.txt")):
            raise MemtrmUserError(
                f"no dict.txt in {cfg.data!r}: pass the data-bin folder written by "
                "scripts/prepare_data.py (e.g. data-bin/books)"
            )
        dictionary = Dictionary.load(os.path.join(paths[0], "dict.txt"))
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        paths = utils.split_paths(self.cfg.data)
        split_path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary, combine=combine)
        if lines is None:
            raise MemtrmUserError(
                f"no binarized split {split!r} in {os.path.dirname(split_path)} (expected "
                f"{split}.bin/{split}.idx); run scripts/prepare_data.py with that split"
            )
        self.datasets[split] = DocumentDataset(lines, split)
        logger.info(
            "%s %s: %d documents, %d tokens", self.cfg.data, split,
            len(self.datasets[split]), self.datasets[split].total_tokens(),
        )

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
        **kwargs,
    ):
        """One item per batch: fairseq batches nothing and shuffles nothing.
        Ranks are served by the dataset (``num_shards``, ``shard_id``), not by
        the iterator, so every rank gets its own streams and as many batches."""
        if not isinstance(dataset, DocumentDataset):
            raise MemtrmUserError("--task document_lm batches only its own document datasets")
        batch_size = max_sentences or self.streams_per_rank
        if batch_size * num_shards > len(dataset):
            logger.warning(
                "%s: %d streams (--batch-size %d x %d ranks) but only %d documents: %d rows of every batch are "
                "padding; use --batch-size %d or less", dataset.split, batch_size * num_shards, batch_size,
                num_shards, len(dataset), batch_size * num_shards - len(dataset), max(1, len(dataset) // num_shards),
            )
        train = dataset.split == self.cfg.train_subset
        streams = DocumentStreamDataset(
            dataset,
            tokens_per_sample=self.cfg.tokens_per_sample,
            batch_size=batch_size,
            pad=self.dictionary.pad(),
            eos=self.dictionary.eos(),
            shuffle=train,
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            distant_repeats=self.distant_repeats if train else None,
        )
        # The trainer reads ``first_batch`` (its dummy batch) before any epoch starts.
        streams.set_epoch(epoch)
        self._log_rank_streams(streams, num_shards, shard_id)
        return iterators.EpochBatchIterator(
            dataset=streams,
            collate_fn=streams.collater,
            batch_sampler=streams.batch_sampler,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )

    def eval_lm_dataloader(
        self,
        dataset,
        max_tokens: Optional[int] = 36000,
        batch_size: Optional[int] = None,
        max_positions: Optional[int] = None,
        num_shards: int = 1,
        shard_id: int = 0,
        num_workers: int = 1,
        data_buffer_size: int = 0,
        context_window: int = 0,
    ):
        if context_window > 0:
            raise MemtrmUserError(
                "--context-window does not apply to --task document_lm: every token is scored "
                "once, with its document's earlier segments in the kNN memory; drop "
                "--context-window (use --tokens-per-sample for the local window)"
            )
        if isinstance(max_positions, int) and self.cfg.tokens_per_sample > max_positions:
            raise MemtrmUserError(
                f"--tokens-per-sample {self.cfg.tokens_per_sample} exceeds the model's "
                f"{max_positions} positions; use --tokens-per-sample {max_positions} or less"
            )
        return self.get_batch_iterator(
            dataset,
            max_sentences=batch_size,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def _log_rank_streams(self, streams: DocumentStreamDataset, num_shards: int, shard_id: int) -> None:
        """On every rank: which streams and documents it reads, and its memory (checked against this
        host's free RAM for all the ranks here, when the memory lives in RAM)."""
        if num_shards <= 1:
            return
        layout = streams.layout()
        mine = list(streams.my_streams())
        docs = sorted(d for s in mine for d in layout.streams[s])
        logger.info(
            "rank %d of %d: %s streams %d-%d of %d, %d documents (%d segments), %d batches",
            shard_id, num_shards, streams.stream_id, mine[0], mine[-1], streams.batch_size * num_shards, len(docs),
            int(streams.doc_segments[docs].sum()) if docs else 0, len(streams),
        )
        if self.memory_bank is None or streams.stream_id != self.cfg.train_subset:
            return
        per_rank = 2 * streams.batch_size * self.memory_bank.bytes_per_stream()  # train + valid stream sets
        logger.info(
            "rank %d: kNN memory %.1f MiB per stream, %.1f MiB with train and valid (%d streams each), "
            "%d rank(s) on this host", shard_id, self.memory_bank.bytes_per_stream() / 2**20, per_rank / 2**20,
            streams.batch_size, self.ranks_on_host,
        )
        if not torch.cuda.is_available():  # all ranks of this host share its RAM
            need = self.ranks_on_host * per_rank
            free = free_ram_bytes()
            if need > 0.9 * free:
                raise MemtrmUserError(
                    f"the kNN memories of the {self.ranks_on_host} ranks on this host need {need / 2**30:.1f} GiB "
                    f"({self.ranks_on_host} x 2 stream sets x {streams.batch_size} streams x "
                    f"{self.memory_bank.bytes_per_stream() / 2**20:.0f} MiB) but only {free / 2**30:.1f} GiB is "
                    "free; lower --memory-size or --batch-size, use --memory-dtype fp16, or run fewer ranks per host"
                )

    def _count_ranks_on_host(self) -> int:
        """How many ranks share this host (one all-gather of host names; every rank builds its model)."""
        rank, world = rank_and_world()
        if world <= 1:
            return 1
        names = [None] * world
        torch.distributed.all_gather_object(names, socket.gethostname())
        return names.count(socket.gethostname())

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad, **kwargs
        )
        if self.cfg.stream_log and not ignore_grad:  # ignore_grad: fairseq's dummy batch
            self._write_stream_log(sample, model, update_num, loss, sample_size)
        return loss, sample_size, logging_output

    def _write_stream_log(self, sample, model, update_num, loss, sample_size) -> None:
        rank, world = rank_and_world()
        if self._stream_log is None:
            path = f"{self.cfg.stream_log}.rank{rank}.jsonl"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._stream_log = open(path, "a", buffering=1)
        digest = hashlib.sha1()
        for _, param in sorted(model.named_parameters()):
            digest.update(param.detach().cpu().float().numpy().tobytes())
        record = {
            "rank": rank, "world": world, "update": int(update_num),
            "doc_id": sample["doc_id"].tolist(), "segment": sample["segment"].tolist(),
            "ntokens": int(sample["ntokens"]), "loss": float(loss.detach()), "sample_size": float(sample_size),
            "weights_sha1": digest.hexdigest(),
        }
        self._stream_log.write(json.dumps(record) + "\n")

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.memory_bank = getattr(model, "memory_bank", None)
        rank, world = rank_and_world()
        if world > 1:
            # fairseq keeps only rank 0's INFO lines; the plugin's are per rank (streams, memory).
            logging.getLogger("fairseq_memtrm").setLevel(logging.INFO)
            self.ranks_on_host = self._count_ranks_on_host()
        if "doc_start" not in inspect.signature(model.forward).parameters:
            model.register_forward_pre_hook(drop_stream_keys, with_kwargs=True)
            logger.info(
                "%s does not read document streams: doc_start/stream_id are dropped "
                "before its forward (a baseline without memory)", type(model).__name__,
            )
        return model

    def max_positions(self):
        return self.cfg.tokens_per_sample

    @property
    def source_dictionary(self):
        return self.dictionary

    @property
    def target_dictionary(self):
        return self.dictionary
