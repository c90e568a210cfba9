#!/usr/bin/env python
"""Memory staleness, measured directly: how far the keys a model stored in its
kNN memory during training are from the keys its final weights compute for the
same tokens.

It trains in-process with fairseq's own Trainer, from the same fairseq-train
arguments as the fine-tuning scripts (everything after ``--``), and remembers
for every memory entry the update that wrote it. When ``--max-update`` is
reached (the end of fine-tuning) it reads each training stream's current
document again, segment by segment as training did, with the final weights in
eval mode, and reports the cosine between stored and recomputed keys, overall
and by age (updates since the entry was written).

* ``memorizing_transformer_lm`` writes keys with the weights being trained: the
  cosine falls with age. Training runs with dropout and the recomputation
  without, so even the youngest entries are not at 1: that bin is the floor.
* ``longmem_sidenet_lm`` writes with its frozen backbone, which never drops
  out: the cosine is 1 at every age, up to float rounding.

No checkpoint is written (the save dir is a temporary folder). Example::

    python scripts/measure_staleness.py --out results/books/staleness_memory.json -- \\
        data-bin/books --user-dir fairseq_memtrm --task document_lm --arch memorizing_transformer_lm \\
        --finetune-from-model checkpoints/books/vanilla/checkpoint_last.pt ... --max-update 400
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger("measure_staleness")
TRAIN_STREAMS = "train"
AGE_BINS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1 << 62]


def token_memory(model):
    """The first memory layer's store for the training streams (a MemoryStore)."""
    memories = model.memory_bank.memories(TRAIN_STREAMS)
    if not memories:
        raise MemtrmUserError("the model has no memory for the training streams: use a memory model "
                              "(memorizing_transformer_lm or longmem_sidenet_lm) with --memory-size > 0")
    return memories[0]


class WriteLog:
    """Per training stream: the source segments of its current document and, per
    document position, the update that wrote it to memory."""

    def __init__(self, num_streams: int):
        self.segments = [[] for _ in range(num_streams)]
        self.written_at = [[] for _ in range(num_streams)]

    def record(self, sample, update: int, pad: int) -> None:
        source = sample["net_input"]["src_tokens"].cpu()
        doc_start = sample["net_input"]["doc_start"].cpu()
        for stream in range(source.size(0)):
            if doc_start[stream]:
                self.segments[stream], self.written_at[stream] = [], []
            tokens = source[stream][source[stream].ne(pad)]
            if tokens.numel():
                self.segments[stream].append(tokens)
                self.written_at[stream] += [update] * tokens.numel()


@torch.no_grad()
def recomputed_keys(model, segments, device):
    """The entries a fresh one-stream pass over ``segments`` leaves (eval mode)."""
    stream_set = "staleness"
    model.memory_bank.clear(stream_set)
    for index, segment in enumerate(segments):
        model(segment.unsqueeze(0).to(device), doc_start=torch.tensor([index == 0], device=device),
              stream_id=stream_set)
    entries = model.memory_bank.memories(stream_set)[0].entries(0)
    model.memory_bank.clear(stream_set)
    return entries.keys.float(), entries.positions  # (H, N, D), (N,)


def staleness(model, log: WriteLog, final_update: int, device):
    """Cosines (H * entries,) between stored and recomputed keys, and their ages."""
    stored = token_memory(model)
    model.eval()
    cosines, ages = [], []
    for stream, segments in enumerate(log.segments):
        if not segments or stored.num_valid(stream) == 0:
            continue
        keys, positions = recomputed_keys(model, segments, device)
        entries = stored.entries(stream)
        valid = entries.positions.numel()
        stored_positions = entries.positions
        if not torch.equal(stored_positions, positions[:valid]):
            raise RuntimeError(f"stream {stream}: recomputation wrote other positions than training")
        cosine = F.cosine_similarity(entries.keys.float(), keys[:, :valid], dim=-1)  # (H, N)
        written_at = torch.tensor(log.written_at[stream])[stored_positions.cpu()]
        cosines.append(cosine.flatten().cpu())
        ages.append((final_update - written_at + 1).repeat(cosine.size(0)))
    if not cosines:
        raise MemtrmUserError("no training stream holds memory at the end: train more updates or longer documents")
    return torch.cat(cosines), torch.cat(ages)


def report(cosines, ages, arch, final_update):
    rows, low = [], 0
    for high in AGE_BINS:
        chosen = (ages > low) & (ages <= high)
        if chosen.any():
            rows.append({"age_updates": f"{low + 1}-{high}" if high < (1 << 62) else f">{low}",
                         "entries": int(chosen.sum()), "mean_cosine": float(cosines[chosen].mean()),
                         "min_cosine": float(cosines[chosen].min())})
        low = high
    return {"arch": arch, "updates": final_update, "entries": int(cosines.numel()),
            "mean_cosine": float(cosines.mean()), "by_age": rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise MemtrmUserError("usage: measure_staleness.py --out FILE.json -- DATA_BIN [fairseq-train args]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report; a markdown table is printed too")
    own = parser.parse_args(argv[:split])
    configure_logging()

    args = options.parse_args_and_arch(options.get_training_parser(), argv[split + 1:])
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    if cfg.dataset.batch_size is None:
        raise MemtrmUserError("--batch-size is required (one batch row per document stream)")
    cfg.checkpoint.save_dir = tempfile.mkdtemp(prefix="staleness-")  # start fresh; nothing is saved
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    _, epoch_itr = checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
    max_update = cfg.optimization.max_update
    if not max_update:
        raise MemtrmUserError("--max-update is required: staleness is measured at the end of fine-tuning")
    device = next(model.parameters()).device
    pad = task.target_dictionary.pad()
    log = None
    while trainer.get_num_updates() < max_update:
        itr = epoch_itr.next_epoch_itr(fix_batches_to_gpus=False, shuffle=False)
        for sample in itr:
            if log is None:
                log = WriteLog(sample["net_input"]["src_tokens"].size(0))
            trainer.train_step([sample])
            log.record(sample, trainer.get_num_updates(), pad)
            if trainer.get_num_updates() % 50 == 0:
                logger.info("update %d / %d", trainer.get_num_updates(), max_update)
            if trainer.get_num_updates() >= max_update:
                break
        epoch_itr = trainer.get_train_iterator(epoch_itr.next_epoch_idx, load_dataset=True)

    cosines, ages = staleness(model, log, trainer.get_num_updates(), device)
    result = report(cosines, ages, cfg.model._name, trainer.get_num_updates())
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [f"{result['arch']}, {result['updates']} updates: mean cosine {result['mean_cosine']:.4f} over "
             f"{result['entries']} (entry, head) keys", "", "| age (updates) | keys | mean cosine | min cosine |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['age_updates']} | {r['entries']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} |"
              for r in result["by_age"]]
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
