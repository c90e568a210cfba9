"""kNN-LM (Khandelwal et al. 2020, "Generalization through Memorization: Nearest
Neighbor Language Models").

A *datastore* maps the final hidden state ``h_i`` of every token of the training
split (the vector the output layer reads, computed on the same ``document_lm``
segments as at test time) to the token that followed it. At test time the ``k``
nearest keys of ``h_t`` by squared L2 distance ``d`` give::

    p_knn(w) = sum_{j in kNN, v_j = w} exp(-d_j / temperature) / sum_{j in kNN} exp(-d_j / temperature)
    p(w) = (1 - lambda) * p_model(w) + lambda * p_knn(w)

The store is a folder: ``keys.npy`` (N x C, fp16), ``vals.npy`` (N, int32), the
faiss index ``index.faiss`` (``IndexFlatL2`` for small stores, ``IndexIVFPQ`` for
large ones, as in the paper) and ``meta.json`` (written last: a store without it
is incomplete). ``meta.json`` names the weights (sha256 of the model's tensors)
and the dictionary (sha256 of its symbols) it was built from: another checkpoint
or vocabulary is refused in one sentence, since its hidden states or token ids
mean something else. Distances from an IVF-PQ index are those of the compressed
keys (the paper's default; no re-ranking with the stored fp16 keys).
"""

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import faiss
import numpy as np
import torch
from fairseq import progress_bar, utils
from torch import Tensor

from fairseq_memtrm.errors import MemtrmUserError

from .scoring import features_and_nll

logger = logging.getLogger(__name__)

FLAT_LIMIT = 2_000_000  # stores up to this many entries get an exact flat index ("auto")


def weights_fingerprint(model) -> str:
    """sha256 of the model's tensors (names, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dictionary_fingerprint(dictionary) -> str:
    return hashlib.sha256("\n".join(dictionary.symbols).encode()).hexdigest()


def index_plan(entries: int, dim: int, index: str = "auto", nlist: Optional[int] = None, pq_m: Optional[int] = None):
    """(kind, options, index bytes): which faiss index a store of ``entries`` gets, and its size."""
    kind = ("flat" if entries <= FLAT_LIMIT else "ivfpq") if index == "auto" else index
    if kind == "flat":
        return kind, {}, entries * dim * 4
    if kind != "ivfpq":
        raise MemtrmUserError(f"--index must be auto, flat or ivfpq, got {index!r}")
    nlist = nlist or max(1, min(4096, int(4 * math.sqrt(entries))))
    pq_m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 4 or m == 1)
    if dim % pq_m:
        raise MemtrmUserError(f"--pq-m {pq_m} must divide the hidden width {dim}")
    return kind, {"nlist": nlist, "pq_m": pq_m}, entries * (pq_m + 8) + nlist * dim * 4


def human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


@torch.no_grad()
def build_datastore(model, task, split: str, out: Path, tokens_per_sample: int, batch_size: int,
                    index: str = "auto", max_tokens: Optional[int] = None, nlist: Optional[int] = None,
                    pq_m: Optional[int] = None, log_format: Optional[str] = None, seed: int = 1,
                    log_interval: int = 50) -> Dict:
    """Write the datastore of ``split`` to ``out`` (see the module's docstring); returns its meta."""
    out = Path(out)
    dataset = task.dataset(split)
    dim = model.decoder.output_embed_dim
    entries = dataset.total_tokens() if max_tokens is None else min(max_tokens, dataset.total_tokens())
    kind, options, index_bytes = index_plan(entries, dim, index, nlist, pq_m)
    disk = entries * (dim * 2 + 4) + index_bytes
    logger.info("datastore of %s: %d entries x %d dims, %s index %s: %s on disk (keys %s, values %s, index %s); "
                "searching holds the index and values in RAM (%s), building peaks near %s",
                split, entries, dim, kind, options or "", human(disk), human(entries * dim * 2), human(entries * 4),
                human(index_bytes), human(index_bytes + entries * 4),
                human(index_bytes + min(entries, 256 * options.get("nlist", 0) or entries) * dim * 4))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").exists():
        (out / "meta.json").unlink()  # the store is incomplete until meta.json is written again
    free = shutil.disk_usage(out).free
    if disk > 0.95 * free:
        raise MemtrmUserError(f"the datastore needs {human(disk)} but {out} has {human(free)} free; "
                              "use --max-tokens or --index ivfpq, or another --out")
    keys = np.lib.format.open_memmap(out / "keys.npy", mode="w+", dtype=np.float16, shape=(entries, dim))
    vals = np.lib.format.open_memmap(out / "vals.npy", mode="w+", dtype=np.int32, shape=(entries,))
    itr = task.eval_lm_dataloader(dataset, batch_size=batch_size, max_positions=utils.resolve_max_positions(
        task.max_positions(), model.max_positions()))
    progress = progress_bar.progress_bar(itr, log_format=log_format, log_interval=log_interval, prefix=f"datastore {split}",
                                         default_log_format="tqdm")
    device = next(model.parameters()).device
    pad = task.target_dictionary.pad()
    filled = 0
    for step, sample in enumerate(progress, start=1):
        if filled >= entries:
            break
        sample = utils.move_to_cuda(sample, device) if device.type == "cuda" else sample
        features, _ = model(**sample["net_input"], features_only=True)
        real = sample["target"].ne(pad)
        h, y = features[real].float().cpu().numpy(), sample["target"][real].cpu().numpy()
        take = min(len(y), entries - filled)
        keys[filled : filled + take] = h[:take]
        vals[filled : filled + take] = y[:take]
        filled += take
        progress.log({"entries": filled}, step=step)  # simple/json: every log_interval-th batch
    keys.flush()
    vals.flush()
    if filled < entries:
        raise RuntimeError(f"the {split} streams gave {filled} tokens, expected {entries}")

    logger.info("datastore: building the %s index over %d entries", kind, entries)
    chunk = 65536
    if kind == "flat":
        faiss_index = faiss.IndexFlatL2(dim)
    else:
        quantizer = faiss.IndexFlatL2(dim)
        faiss_index = faiss.IndexIVFPQ(quantizer, dim, options["nlist"], options["pq_m"], 8)
        rng = np.random.default_rng(seed)
        sample_size = min(entries, max(256 * options["nlist"], 39 * options["nlist"]))
        chosen = np.sort(rng.choice(entries, size=sample_size, replace=False))
        faiss_index.train(np.ascontiguousarray(keys[chosen], dtype=np.float32))
        logger.info("datastore: index trained on %d sampled entries", sample_size)
    report_every = max(1, entries // chunk // 10)
    for number, start in enumerate(range(0, entries, chunk), start=1):
        faiss_index.add(np.ascontiguousarray(keys[start : start + chunk], dtype=np.float32))
        if number % report_every == 0:
            logger.info("datastore: %d of %d entries indexed", min(start + chunk, entries), entries)
    faiss.write_index(faiss_index, str(out / "index.faiss"))
    meta = {"entries": entries, "dim": dim, "split": split, "tokens_per_sample": tokens_per_sample,
            "index": kind, **options, "weights_sha256": weights_fingerprint(model),
            "dictionary_sha256": dictionary_fingerprint(task.target_dictionary),
            "dictionary_size": len(task.target_dictionary)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("datastore written to %s (%s on disk)", out, human(sum(f.stat().st_size for f in out.iterdir())))
    return meta


def load_meta(path: Path) -> Dict:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise MemtrmUserError(f"{path} holds no complete kNN-LM datastore (no meta.json); build it with "
                              "scripts/build_datastore.py")
    return json.loads(meta_file.read_text())


class KNNLM:
    """Scores batches with the kNN-LM mixture, one run per ``lambdas`` value."""

    def __init__(self, model, dictionary, datastore: Path, lambdas: Sequence[float], k: int = 1024,
                 temperature: float = 1.0, nprobe: int = 32, eval_subset: Optional[str] = None,
                 checkpoint: str = "this checkpoint", name: str = "knnlm"):
        bad = [lam for lam in lambdas if not 0 <= lam < 1]
        if not lambdas or bad:
            raise MemtrmUserError(f"--knnlm-lambda takes values in [0, 1), got {list(lambdas)}")
        if k < 1 or temperature <= 0:
            raise MemtrmUserError(f"--knnlm-k must be >= 1 and --knnlm-temperature > 0, got {k} and {temperature}")
        meta = load_meta(datastore)
        if meta["dictionary_sha256"] != dictionary_fingerprint(dictionary):
            raise MemtrmUserError(
                f"datastore {datastore} was built with another vocabulary ({meta['dictionary_size']} symbols, "
                f"not this data-bin's {len(dictionary)} or not in the same order): rebuild it from this data-bin")
        if meta["weights_sha256"] != weights_fingerprint(model):
            raise MemtrmUserError(
                f"datastore {datastore} was built from another checkpoint's weights than {checkpoint} "
                f"(sha256 {meta['weights_sha256'][:12]}...): its keys are another model's hidden states; "
                "rebuild it with scripts/build_datastore.py --checkpoint " + str(checkpoint))
        if eval_subset is not None and meta["split"] == eval_subset:
            raise MemtrmUserError(f"datastore {datastore} holds the {eval_subset} split itself: the text being "
                                  "scored would be in it; build the datastore from the train split")
        self.model, self.meta = model, meta
        self.lambdas, self.k, self.temperature = list(lambdas), k, temperature
        self.name = name
        self.index = faiss.read_index(str(Path(datastore) / "index.faiss"))
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        self.vals = torch.from_numpy(np.load(Path(datastore) / "vals.npy").astype(np.int64))
        self.index_bytes = os.path.getsize(Path(datastore) / "index.faiss")

    def run_names(self):
        return [f"{self.name} lambda={lam:g}" for lam in self.lambdas]

    def extra_bytes(self) -> int:
        return self.index_bytes + self.vals.numel() * self.vals.element_size()

    @torch.no_grad()
    def knn_scores(self, sample, forward: Optional[Tuple[Tensor, Tensor]] = None):
        """(model nll (B, T), log p_knn(target) (B, T), distances (n, k), neighbour values (n, k)).
        ``forward``: the batch's ``features_and_nll`` where another scorer has run it already."""
        features, model_nll = forward if forward is not None else features_and_nll(self.model, sample)
        target = sample["target"]
        real = target.ne(self.model.decoder.padding_idx)
        queries = np.ascontiguousarray(features[real].float().cpu().numpy())
        k = min(self.k, self.index.ntotal)
        distances, ids = self.index.search(queries, k)
        distances, ids = torch.from_numpy(distances), torch.from_numpy(ids)
        found = ids >= 0
        values = self.vals[ids.clamp(min=0)].masked_fill(~found, -1)
        logits = (-distances / self.temperature).masked_fill(~found, float("-inf"))
        hit = logits.masked_fill(values.ne(target[real].cpu().unsqueeze(-1)), float("-inf"))
        logp = torch.logsumexp(hit, -1) - torch.logsumexp(logits, -1)
        knn_logp = torch.full_like(model_nll, float("-inf"))
        knn_logp[real] = logp.to(knn_logp.device)
        return model_nll, knn_logp, distances, values

    def score(self, sample) -> Dict[str, Tensor]:
        from .neural_cache import mix

        model_nll, knn_logp, _, _ = self.knn_scores(sample)
        real = sample["target"].ne(self.model.decoder.padding_idx)
        return {name: mix(model_nll, knn_logp, real, lam).masked_fill(~real, 0.0)
                for name, lam in zip(self.run_names(), self.lambdas)}
