#!/usr/bin/env python
"""Benchmark the kNN memory's search backends, side by side in one run.

For each memory size (default 8K / 65K / 262K tokens) and each backend
(``--memory-backend``: exact, faiss-flat, faiss-ivf) it measures

* search time for one segment of ``--segment`` queries, against the compute
  bound of the same search (2 * T * N * H * D flops at this machine's sgemm
  rate, measured at start-up);
* recall@k of each approximate backend against ``exact`` on the same queries;
* the training step time (forward, backward, Adam) of the memorizing model with
  a full memory, relative to the vanilla ``transformer_lm`` of the same shape;
* memory RAM: the estimate the plugin checks before training
  (``memory_bytes``), the process's RSS growth while the memory is filled, the
  process's peak RSS, and whether 4 streams of each size fit in 24 GiB;
* evaluation throughput (forward only, the memory searched and written every
  segment, as ``fairseq-eval-lm`` reads a document) with a full memory, against
  the vanilla model's;
* with ``--step-split``, where a step's memory time goes (backend search, gather, writes)
  and the step with every search answered from a cache;
* a torch profile of the memorizing step (``--profile-size``), labelled
  ``knn_memory.search`` / ``knn_memory.add``, showing where the time goes;
* the exact search's score pass at ``--profile-size`` in fp32, bf16 and fp16, timed
  alternately, beside the CPU's flags (``avx512_bf16``, ``amx_bf16``, ...): whether a
  lower-precision score pass could pay here.

``--streams B`` measures every figure for a batch of B streams (each stream its
own memory, all holding the captured keys), as a fine-tune with ``--batch-size B``
runs; the compute bound is then B times one stream's.

Keys and queries are real: the script first trains the model (8 heads x 32
dims by default, byte-level tokens, ``--train-updates`` Adam steps on
``../shared/data/books/train`` or, without it, the Python standard library's
``.py`` files), then reads one long held-out document through it and captures
the memory layer's normalised keys, values and the next segment's queries.

Prints a table, writes ``--output`` (JSON). The machine (CPU, cores, threads,
load average before and after: other processes share it) is stated in both.

Examples::

    python scripts/bench_memory.py --output docs/bench_memory.json
    python scripts/bench_memory.py --memory-sizes 8192,65536 --train-updates 50 --repeats 2
"""

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.errors import MemtrmUserError, run_script
from fairseq_memtrm.memory import KNNMemory, MemoryStore, memory_bytes
from fairseq_memtrm.memory.search import BACKENDS, parse_backend_spec
from fairseq_memtrm.modules.knn_attention import MEMORY_STATE

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("bench_memory")
BOOKS = REPO.parent / "shared" / "data" / "books"
GIB = 2**30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-sizes", default="8192,65536,262144", help="comma-separated memory sizes (tokens)")
    parser.add_argument("--backends", default=",".join(sorted(BACKENDS)),
                        help="comma-separated backends, each with its options after a colon "
                        "(exact,faiss-ivf:assign=2,nprobe=16)")
    parser.add_argument("--segment", type=int, default=512, help="tokens per segment (queries per search)")
    parser.add_argument("--knn-k", type=int, default=32, help="entries retrieved per query and head")
    parser.add_argument("--streams", type=int, default=1,
                        help="streams (batch rows) per search, step and evaluation; each has its own full memory")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--embed-dim", type=int, default=256, help="model width")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (head_dim = embed_dim / heads)")
    parser.add_argument("--memory-dtype", choices=["fp32", "fp16"], default="fp32", help="memory storage dtype")
    parser.add_argument("--train-updates", type=int, default=200, help="Adam updates before capturing keys")
    parser.add_argument("--train-batch", type=int, default=2, help="segments per training update")
    parser.add_argument("--ivf-nprobe", default="8,16,32", help="faiss-ivf nprobe values whose recall and search "
                        "time are listed (the step uses the backend's default)")
    parser.add_argument("--hnsw-ef", default="32,64,128", help="faiss-hnsw efSearch values, likewise")
    parser.add_argument("--recall-segments", type=int, default=4,
                        help="segments of queries (after the memory's tokens) that recall is measured on")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (builds indexes)")
    parser.add_argument("--skip-steps", action="store_true", help="search measurements only (no model steps)")
    parser.add_argument("--step-split", action="store_true",
                        help="also split each training step's memory time (backend search, the rest of the "
                        "memory's search, writes) and time the step with every search answered from a cache")
    parser.add_argument("--profile-size", type=int, default=65536, help="memory size of the profiled step (0: none)")
    parser.add_argument("--profile-backend", default="faiss-ivf", help="backend of the profiled step")
    parser.add_argument("--corpus", choices=["auto", "books", "stdlib"], default="auto",
                        help="books: ../shared/data/books; stdlib: Python's own .py files; auto: books if present")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and faiss threads (0: their defaults); 1 gives steadier figures on a shared machine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint", help="capture keys and queries from this memorizing checkpoint (with --data) "
                        "instead of training a byte-level model: its first memory layer, on the longest test "
                        "document; the vanilla of the step and eval ratios is the same checkpoint with memory size 0")
    parser.add_argument("--data", help="--checkpoint's data-bin folder (scripts/prepare_data.py)")
    parser.add_argument("--save-captured", help="also save the captured keys/queries here (torch.save)")
    parser.add_argument("--load-captured", help="skip training and capture: reuse --save-captured output")
    parser.add_argument("--output", default="bench_memory.json", help="JSON results file")
    args = parser.parse_args()
    args.memory_sizes = [int(size) for size in args.memory_sizes.split(",")]
    args.backends = backend_specs(args.backends)
    args.ivf_nprobe = [int(n) for n in args.ivf_nprobe.split(",") if n]
    args.hnsw_ef = [int(n) for n in args.hnsw_ef.split(",") if n]
    for spec in args.backends + [args.profile_backend]:
        parse_backend_spec(spec)  # a clear error for an unknown backend or option
    if args.streams < 1:
        parser.error("--streams must be at least 1")
    if args.checkpoint and not args.data:
        parser.error("--checkpoint needs --data, the data-bin folder it was trained on")
    if args.checkpoint and (args.load_captured or args.save_captured):
        parser.error("--checkpoint captures from the checkpoint itself: drop --load-captured/--save-captured")
    if args.embed_dim % args.heads:
        parser.error("--embed-dim must be a multiple of --heads")
    for flag, path in (("--checkpoint", args.checkpoint), ("--data", args.data), ("--load-captured", args.load_captured)):
        if path and not os.path.exists(path):  # before minutes of measuring the machine
            parser.error(f"{flag} {path} does not exist; give an existing path")
    return args


# ------------------------------------------------------------------ machine
def backend_specs(text: str) -> List[str]:
    """``"exact,faiss-ivf:assign=2,nprobe=16"`` -> ["exact", "faiss-ivf:assign=2,nprobe=16"]:
    an item without a backend name (``KEY=NUMBER``) is one more option of the spec before it."""
    specs: List[str] = []
    for item in filter(None, text.split(",")):
        if specs and "=" in item and ":" not in item:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate now (best of ``repeats``), the compute bound's unit."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def machine_info() -> Dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB, 1),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "load_average_start": os.getloadavg(),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


# ------------------------------------------------------------------- corpus
def load_corpus(choice: str) -> Tuple[List[bytes], bytes, str]:
    """(training documents, one long held-out document, description), as bytes."""
    if choice in ("auto", "books") and (BOOKS / "train").is_dir():
        train = [path.read_bytes() for path in sorted((BOOKS / "train").glob("*.txt"))]
        held_out = max((path.read_bytes() for path in sorted((BOOKS / "test").glob("*.txt"))), key=len)
        return train, held_out, f"books ({BOOKS}), held-out: longest test book"
    if choice == "books":
        raise MemtrmUserError(f"--corpus books needs {BOOKS}/train and test; use --corpus stdlib")
    stdlib = Path(os.path.dirname(os.__file__))
    files = sorted(stdlib.rglob("*.py"))
    train = [path.read_bytes() for path in files if path.name[0].lower() < "n"]
    # one long document: the held-out half of the library, file after file
    held_out = b"\n".join(path.read_bytes() for path in files if path.name[0].lower() >= "n")
    return train, held_out, f"Python standard library .py files ({stdlib}), held-out: files n-z concatenated"


# ------------------------------------------------------------------- models
NSPECIAL = 4  # fairseq's <s> <pad> </s> <unk>; byte b is symbol NSPECIAL + b


def byte_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + NSPECIAL


def checkpoint_models(args):
    """(memorizing model, the same checkpoint with memory size 0, the longest test
    document's tokens, a description) from ``--checkpoint`` and ``--data``."""
    from fairseq_memtrm.evaluation import load

    overrides = {"memory_size": max(args.memory_sizes), "knn_k": args.knn_k, "memory_dtype": args.memory_dtype}
    model, task = load(args.checkpoint, args.data, "test", args.segment, args.streams, overrides, True)
    vanilla, _ = load(args.checkpoint, args.data, "test", args.segment, args.streams, {"memory_size": 0}, True)
    attention = model.memory_attentions()[0]
    documents = task.dataset("test")  # a DocumentDataset: one item per document
    longest = max(range(len(documents)), key=documents.num_tokens)
    tokens = documents.tokens(longest, 0, documents.num_tokens(longest)).long()
    args.layers, args.embed_dim = len(model.decoder.layers), model.decoder.embed_dim
    args.heads = attention.num_heads
    description = (f"{args.checkpoint} on {args.data} test, longest document ({tokens.numel()} tokens), "
                   f"vocabulary {len(task.target_dictionary)}")
    return model, vanilla, tokens, description


def build_model(data_dir: str, arch: str, args, extra=()) -> torch.nn.Module:
    parser = options.get_training_parser()
    parsed = options.parse_args_and_arch(parser, [
        data_dir, "--user-dir", str(REPO / "fairseq_memtrm"), "--task", "language_modeling", "--arch", arch,
        "--tokens-per-sample", str(args.segment), "--cpu",
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
        "--decoder-ffn-embed-dim", str(4 * args.embed_dim), "--decoder-attention-heads", str(args.heads),
        "--share-decoder-input-output-embed", *extra,
    ])
    cfg = convert_namespace_to_omegaconf(parsed)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(args.seed)
    return task.build_model(cfg.model)


def build_models(args):
    """(memorizing model, vanilla transformer_lm of the same shape), byte vocabulary."""
    with tempfile.TemporaryDirectory() as data_dir:
        dictionary = Dictionary()
        for byte in range(256):
            dictionary.add_symbol(f"<0x{byte:02X}>")
        dictionary.save(os.path.join(data_dir, "dict.txt"))
        memorizing = build_model(data_dir, "memorizing_transformer_lm", args, [
            "--memory-size", str(max(args.memory_sizes)), "--knn-k", str(args.knn_k),
            "--memory-dtype", args.memory_dtype,
        ])
        vanilla = build_model(data_dir, "transformer_lm", args)
    return memorizing, vanilla


def lm_loss(model, tokens: torch.Tensor, **net_input) -> torch.Tensor:
    """Next-token cross entropy of ``tokens`` (B, T + 1)."""
    logits, _ = model(tokens[:, :-1], **net_input)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


def train(model, documents: List[bytes], args) -> List[float]:
    """Plain Adam on random windows of the training documents (memory empty:
    every row starts a document), so that keys and queries are a trained model's."""
    rng = np.random.default_rng(args.seed)
    documents = [doc for doc in documents if len(doc) > args.segment + 1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for update in range(args.train_updates):
        rows = []
        for _ in range(args.train_batch):
            doc = documents[rng.integers(len(documents))]
            start = rng.integers(len(doc) - args.segment - 1)
            rows.append(byte_tokens(doc[start : start + args.segment + 1]))
        tokens = torch.stack(rows)
        optimizer.zero_grad()
        loss = lm_loss(model, tokens, doc_start=torch.ones(len(rows), dtype=torch.bool), stream_id="bench-train")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if update % 50 == 0 or update == args.train_updates - 1:
            logger.info("train update %d/%d: loss %.3f (bits/byte %.2f)", update + 1, args.train_updates,
                        loss.item(), loss.item() / np.log(2))
    model.memory_bank.clear()
    return losses


def hidden_states_of(model, tokens: torch.Tensor, segment: int):
    """Yield, per segment of ``tokens`` (N,), the memory layer's input (T, 1, C) and
    what its memory keys are computed from where that differs (position-free keys;
    else None), read with memory off (plain attention; segments are independent then)."""
    attention = model.memory_attentions()[0]
    layer_id = model.memory_layer_ids[0]
    seen: List[torch.Tensor] = []
    hook = attention.register_forward_pre_hook(  # the decoder layer passes query=... by keyword
        lambda module, args, kwargs: seen.append(kwargs["query"] if "query" in kwargs else args[0]), with_kwargs=True
    )
    model.eval()
    try:
        for start in range(0, tokens.numel(), segment):
            segment_tokens = tokens[None, start : start + segment]
            model.decoder(segment_tokens)
            yield start, seen.pop(), model.memory_input(segment_tokens, layer_id)
    finally:
        hook.remove()


def document_tokens(tokens: torch.Tensor, needed: int) -> torch.Tensor:
    if tokens.numel() < needed:  # a short corpus is read again, as a longer document
        tokens = tokens.repeat(-(-needed // tokens.numel()))
    return tokens


def unit_queries_and_keys(attention, hidden: torch.Tensor,
                          memory_input: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The memory's unit queries and keys (H, T, D) of one segment's layer input (T, 1, C),
    as the layer computes them (``--memory-shift-keys`` aside)."""
    q, k = attention.memory_projections(hidden, attention.split_heads(attention.q_proj(hidden)),
                                        memory_input=memory_input)
    return q[0], k[0]


@torch.no_grad()
def capture_memory(model, document: torch.Tensor, num_tokens: int, segment: int) -> Dict[str, torch.Tensor]:
    """The first memory layer's unit keys and values (H, N, D) for the first
    ``num_tokens`` of ``document`` (tokens, read again from its start where it is shorter)."""
    attention = model.memory_attentions()[0]
    keys, values = [], []
    for start, hidden, memory_input in hidden_states_of(model, document_tokens(document, num_tokens)[:num_tokens],
                                                        segment):
        keys.append(unit_queries_and_keys(attention, hidden, memory_input)[1])
        values.append(attention.split_heads(attention.v_proj(hidden))[0])
        if (start // segment) % 128 == 0:
            logger.info("capturing keys: %d / %d tokens", start, num_tokens)
    return {"keys": torch.cat(keys, dim=1), "values": torch.cat(values, dim=1)}


@torch.no_grad()
def capture_queries(model, document: torch.Tensor, num_tokens: int, segment: int,
                    count: int) -> Dict[str, torch.Tensor]:
    """Unit queries (S, H, T, D) of the ``count`` segments after the first
    ``num_tokens``, and the tokens (1, T + 1) of the first of them."""
    attention = model.memory_attentions()[0]
    tokens = document_tokens(document, num_tokens + count * segment + 1)
    after = tokens[num_tokens : num_tokens + count * segment]
    queries = [unit_queries_and_keys(attention, hidden, memory_input)[0]
               for _, hidden, memory_input in hidden_states_of(model, after, segment)]
    return {"query_segments": torch.stack(queries), "queries": queries[0],
            "segment_tokens": tokens[None, num_tokens : num_tokens + segment + 1]}


def fill(memory: MemoryStore, keys: torch.Tensor, values: torch.Tensor, chunk: int = 8192) -> None:
    """Write ``keys``/``values`` (H, N, D) into every stream of ``memory``, in chunks."""
    streams = memory.num_streams
    for start in range(0, keys.size(1), chunk):
        memory.add(keys[None, :, start : start + chunk].expand(streams, -1, -1, -1),
                   values[None, :, start : start + chunk].expand(streams, -1, -1, -1))


def compute_bound_s(queries: torch.Tensor, memory_size: int, args) -> float:
    """The search's matmul alone at this machine's sgemm rate: 2 * B * T * N * H * D flops."""
    heads, seq_len, head_dim = queries.shape
    return 2 * args.streams * seq_len * memory_size * heads * head_dim / (args.gflops * 1e9)


# ------------------------------------------------------------- measurements
def bench_naive(captured, memory_size: int, args) -> Dict:
    """The reference point: one ``q @ K.T`` score matrix per head, then ``topk``."""
    keys, queries = captured["keys"][:, :memory_size], captured["queries"]
    heads = keys.size(0)

    def search():
        for _ in range(args.streams):
            torch.bmm(queries, keys.transpose(1, 2)).topk(args.knn_k, dim=-1)

    return {"memory_size": memory_size, "backend": "naive", "options": {}, "streams": args.streams,
            "search_s": median_time(search, args.repeats, args.warmup),
            "compute_bound_s": compute_bound_s(queries, memory_size, args),
            "estimated_bytes_per_stream": 4 * heads * queries.size(1) * memory_size, "rss_growth_bytes": 0,
            "recall": 1.0}


# query-time settings listed per approximate backend: (attribute, values option)
SEARCH_SETTINGS = {"faiss-ivf": ("nprobe", "ivf_nprobe"), "faiss-hnsw": ("ef_search", "hnsw_ef")}


def bench_search(captured, memory_size: int, backend: str, args, exact=None) -> List[Dict]:
    """Search time per segment, recall against exact, RAM of one stream's memory:
    one result per query-time setting of the backend (the memory is filled once)."""
    keys, values, queries = captured["keys"], captured["values"], captured["queries"]
    heads, _, head_dim = keys.shape
    gc.collect()
    rss_before = current_rss()
    memory = KNNMemory(args.streams, heads, head_dim, memory_size, args.memory_dtype, backend)
    fill(memory, keys[:, :memory_size], values[:, :memory_size])
    batch = queries[None].expand(args.streams, -1, -1, -1)
    memory.search(batch, args.knn_k)  # builds an index where the backend keeps one
    rss_growth = current_rss() - rss_before
    cls, spec_options = parse_backend_spec(backend)
    attribute, values_option = SEARCH_SETTINGS.get(cls.name, (None, None))
    if attribute in spec_options:  # the spec fixes it: no sweep
        attribute = None
    settings = [{attribute: value} for value in getattr(args, values_option)] if attribute else [{}]
    results = []
    for backend_options in settings:
        for name, value in backend_options.items():
            setattr(memory.backend, name, value)
        search = lambda: memory.search(batch, args.knn_k)  # noqa: E731
        result = {
            "memory_size": memory_size, "backend": backend, "options": backend_options, "streams": args.streams,
            "search_s": median_time(search, args.repeats, args.warmup),
            "compute_bound_s": compute_bound_s(queries, memory_size, args),
            "estimated_bytes_per_stream": memory_bytes(memory_size, heads, head_dim, args.memory_dtype, backend),
            "rss_growth_bytes": rss_growth,
            "recall": 1.0,  # exact backends: tests/test_search_backends.py checks equality
        }
        if exact is None or cls.approximate:
            # every query segment, scored by what it finds
            result["scores"] = [memory.search(segment[None].expand(args.streams, -1, -1, -1), args.knn_k).scores[0]
                                for segment in captured["query_segments"]]
        if exact is not None and cls.approximate:
            # Real keys repeat (the same context gives the same key), so the k-th
            # best score is often tied: any entry scoring at least the exact k-th
            # best is a correct answer, whichever of the tied slots it is.
            hits = [
                (scores >= kth_best[..., -1:] - 1e-5).float().mean()
                for scores, kth_best in zip(result["scores"], exact["scores"])
            ]
            result["recall"] = torch.stack(hits).mean().item()
        results.append(result)
    del memory
    return results


def cpu_flags() -> List[str]:
    """The CPU features a lower-precision score matmul would need (empty where /proc has none)."""
    wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx2", "f16c")
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in wanted if flag in flags]


def bench_score_dtypes(captured, memory_size: int, args) -> Dict:
    """The exact search's score pass (one (H, T, D) x (H, D, 512) matmul per block of keys) in
    fp32, bf16 and fp16, timed alternately: whether scoring in a lower precision (then re-ranking
    the candidates in fp32) could pay on this machine."""
    keys, queries = captured["keys"][:, :memory_size], captured["queries"]
    block = 512

    def scoring(dtype):
        q, k = queries.to(dtype), keys.to(dtype)
        out = q.new_empty(q.size(0), q.size(1), block)

        def run():
            for start in range(0, k.size(1) - block + 1, block):
                torch.bmm(q, k[:, start : start + block].transpose(1, 2), out=out)
        return run

    runs = {name: scoring(dtype) for name, dtype in
            (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    seconds = dict(zip(runs, interleaved_medians(*runs.values(), repeats=args.repeats, warmup=args.warmup)))
    return {"memory_size": memory_size, "cpu_flags": cpu_flags(), "torch_cpu_capability":
            torch.backends.cpu.get_cpu_capability(), "score_pass_s": seconds,
            "relative_to_fp32": {name: value / seconds["fp32"] for name, value in seconds.items()}}


def interleaved_medians(*runs, repeats: int, warmup: int) -> Tuple[float, ...]:
    """Median times of ``runs`` run in turn, so that all see the same load from
    other processes on a shared machine."""
    for _ in range(warmup):
        for run in runs:
            run()
    times = [[timed(run) for run in runs] for _ in range(repeats)]
    return tuple(statistics.median(row[index] for row in times) for index in range(len(runs)))


def full_bank(model, captured, memory_size: int, backend: str):
    """A bank like the model's, of ``memory_size`` tokens searched by ``backend``, whose
    stream set "bench" (``--streams`` streams) holds the first ``memory_size`` captured keys in every stream."""
    bank = model.memory_bank.resized(memory_size, backend)
    streams = captured["batch_tokens"].size(0)
    memories = bank.select("bench", streams, torch.ones(streams, dtype=torch.bool), captured["batch_tokens"].device)
    for memory in memories.values():
        fill(memory, captured["keys"][:, :memory_size], captured["values"][:, :memory_size])
    return bank


def training_step(model, tokens: torch.Tensor, **net_input):
    """A closure: one forward, backward and Adam update of ``model`` on ``tokens``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad()
        lm_loss(model, tokens, **net_input).backward()
        optimizer.step()

    return step


def bench_step(model, vanilla, captured, memory_size: int, backend: str, args) -> Dict:
    """Training step time with a full memory vs the vanilla model, same segments,
    timed alternately."""
    tokens = captured["batch_tokens"]
    bank = full_bank(model, captured, memory_size, backend)
    model.train()
    vanilla.train()
    memorizing_step = training_step(model, tokens, doc_start=torch.zeros(tokens.size(0), dtype=torch.bool),
                                    stream_id="bench", memory_bank=bank)
    vanilla_step = training_step(vanilla, tokens)
    step_s, vanilla_s = interleaved_medians(memorizing_step, vanilla_step, repeats=args.repeats, warmup=args.warmup)
    result = {"memory_size": memory_size, "backend": backend, "streams": tokens.size(0), "step_s": step_s,
              "vanilla_step_s": vanilla_s, "relative_to_vanilla": step_s / vanilla_s}
    if args.step_split:
        result["split"] = step_split(bank.memories("bench"), memorizing_step, vanilla_step, args)
    return result


def step_split(memories, memorizing_step, vanilla_step, args) -> Dict:
    """Where a step's memory time goes: seconds per step in the backends' searches, in the rest of
    the memories' searches (gathering what was found), and in their writes (mean of ``--repeats``
    steps); then the step with every backend search answered from a cache that its first call
    (in the warm-up) fills: the same entries found, no search time, timed alternately with the
    vanilla step."""
    seconds = {"backend_search": 0.0, "memory_search": 0.0, "memory_add": 0.0}

    def timing(obj, name: str, label: str):
        original = getattr(obj, name)

        def timed_call(*call_args, **kwargs):
            start = time.perf_counter()
            out = original(*call_args, **kwargs)
            seconds[label] += time.perf_counter() - start
            return out

        setattr(obj, name, timed_call)  # an instance attribute: this bench's memories only
        return original

    backends = [memory.backend for memory in memories if hasattr(memory, "backend")]
    for memory in memories:
        timing(memory, "search", "memory_search")
        timing(memory, "add", "memory_add")
    backend_originals = [(backend, timing(backend, "search", "backend_search")) for backend in backends]
    for _ in range(args.repeats):
        memorizing_step()
    split = {label: value / args.repeats for label, value in seconds.items()}
    split["gather_and_rest_of_search"] = split.pop("memory_search") - split["backend_search"]

    for backend, original in backend_originals:
        answers = {}

        def cached(stream, queries, keys, k, original=original, answers=answers):
            if stream not in answers:
                answers[stream] = original(stream, queries, keys, k)
            return answers[stream]

        backend.search = cached
    null_s, vanilla_s = interleaved_medians(memorizing_step, vanilla_step, repeats=args.repeats, warmup=1)
    for obj in list(memories) + backends:  # back to the class's methods
        for name in ("search", "add"):
            obj.__dict__.pop(name, None)
    split.update({"cached_search_step_s": null_s, "cached_search_vanilla_step_s": vanilla_s,
                  "cached_search_relative_to_vanilla": null_s / vanilla_s})
    return split


def bench_eval(model, vanilla, captured, memory_size: int, backend: str, args) -> Dict:
    """Evaluation throughput (forward only, no gradient) with a full memory that is
    searched and written every segment, against the vanilla model, timed alternately."""
    tokens = captured["batch_tokens"][:, :-1]
    bank = full_bank(model, captured, memory_size, backend)
    model.eval()
    vanilla.eval()
    doc_start = torch.zeros(tokens.size(0), dtype=torch.bool)

    @torch.no_grad()
    def memorizing():
        model(tokens, doc_start=doc_start, stream_id="bench", memory_bank=bank)

    @torch.no_grad()
    def plain():
        vanilla(tokens)

    eval_s, vanilla_s = interleaved_medians(memorizing, plain, repeats=args.repeats, warmup=args.warmup)
    return {"memory_size": memory_size, "backend": backend, "streams": tokens.size(0),
            "eval_tokens_per_s": tokens.numel() / eval_s, "vanilla_eval_tokens_per_s": tokens.numel() / vanilla_s,
            "tokens_per_s_relative_to_vanilla": vanilla_s / eval_s}


def vanilla_step_time(vanilla, captured, args) -> float:
    vanilla.train()
    return median_time(training_step(vanilla, captured["batch_tokens"]), args.repeats, args.warmup)


def profile_step(model, captured, args) -> Dict:
    """torch profile of memorizing steps: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    tokens = captured["batch_tokens"]
    bank = full_bank(model, captured, args.profile_size, args.profile_backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()

    def step():
        optimizer.zero_grad()
        with torch.profiler.record_function("forward"):
            loss = lm_loss(model, tokens, doc_start=torch.zeros(tokens.size(0), dtype=torch.bool), stream_id="bench",
                           memory_bank=bank)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()

    step()  # warm-up (builds the index)
    steps = max(1, args.repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    labelled = {
        event.key: event.cpu_time_total / 1e6 / steps
        for event in events
        if event.key in ("forward", "backward", "optimizer", "knn_memory.search", "knn_memory.add")
    }
    table = events.table(sort_by="self_cpu_time_total", row_limit=15)
    return {"memory_size": args.profile_size, "backend": args.profile_backend,
            "seconds_per_step": labelled, "top_ops": table}


# --------------------------------------------------------------------- main
def main():
    configure_logging(fmt="%(asctime)s | %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    machine = machine_info()
    args.gflops = sgemm_gflops()
    machine["sgemm_gflops"] = round(args.gflops, 1)
    logger.info("machine: %s", machine)

    if args.checkpoint:
        model, vanilla, held_out, corpus = checkpoint_models(args)
        losses, vocabulary = [], f"{args.checkpoint}'s dictionary"
        captured = capture_memory(model, held_out, max(args.memory_sizes), args.segment)
    else:
        train_docs, held_bytes, corpus = load_corpus(args.corpus)
        held_out, vocabulary = byte_tokens(held_bytes), "bytes (256 + 4 specials)"
        model, vanilla = build_models(args)
        if args.load_captured:
            saved = torch.load(args.load_captured)
            model.load_state_dict(saved["model"])
            captured, losses, corpus = saved["captured"], saved["losses"], saved["corpus"]
            args.train_updates, args.train_batch = saved["training"]["updates"], saved["training"]["batch"]
            if captured["keys"].size(1) < max(args.memory_sizes):
                raise MemtrmUserError(f"{args.load_captured} holds {captured['keys'].size(1)} keys, "
                                      f"fewer than --memory-sizes needs; capture again")
        else:
            logger.info("training %d updates on %s", args.train_updates, corpus)
            losses = train(model, train_docs, args)
            captured = capture_memory(model, held_out, max(args.memory_sizes), args.segment)
            if args.save_captured:
                torch.save({"model": model.state_dict(), "captured": captured, "losses": losses, "corpus": corpus,
                            "training": {"updates": args.train_updates, "batch": args.train_batch}}, args.save_captured)
    captured.update(capture_queries(model, held_out, max(args.memory_sizes), args.segment, args.recall_segments))
    captured["batch_tokens"] = captured["segment_tokens"].expand(args.streams, -1).contiguous()
    if not args.checkpoint:
        vanilla.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(MEMORY_STATE)})
    heads, _, head_dim = captured["keys"].shape
    logger.info("captured %d keys x %d heads x %d dims", captured["keys"].size(1), heads, head_dim)

    searches, steps, evals = [], [], []
    vanilla_s = float("nan") if args.skip_steps else vanilla_step_time(vanilla, captured, args)
    logger.info("vanilla step: %.3f s", vanilla_s)
    for memory_size in args.memory_sizes:
        score_matrix_bytes = 4 * captured["keys"].size(0) * args.segment * memory_size
        if score_matrix_bytes <= 2 * GIB:
            searches.append(bench_naive(captured, memory_size, args))
        else:
            logger.info("naive search at %d skipped: its score matrix alone is %.0f GiB",
                        memory_size, score_matrix_bytes / GIB)
        exact = bench_search(captured, memory_size, "exact", args)[0]
        for backend in args.backends:
            results = [exact] if backend == "exact" else bench_search(captured, memory_size, backend, args, exact)
            for result in results:
                searches.append(result)
                logger.info("search %7d %-10s %-16s %.3f s (bound %.3f s) recall %.3f", memory_size, backend,
                            result["options"] or "", result["search_s"], result["compute_bound_s"], result["recall"])
            if args.skip_steps:
                continue
            step = bench_step(model, vanilla, captured, memory_size, backend, args)
            steps.append(step)
            logger.info("step   %7d %-10s %.3f s = %.2fx vanilla (%.3f s, timed alternately)", memory_size,
                        backend, step["step_s"], step["relative_to_vanilla"], step["vanilla_step_s"])
            if "split" in step:
                split = step["split"]
                logger.info("step   %7d %-10s per step: backend search %.3f s, rest of search %.3f s, writes %.3f s; "
                            "with cached searches %.2fx vanilla", memory_size, backend, split["backend_search"],
                            split["gather_and_rest_of_search"], split["memory_add"],
                            split["cached_search_relative_to_vanilla"])
            evals.append(bench_eval(model, vanilla, captured, memory_size, backend, args))
            logger.info("eval   %7d %-10s %.0f tokens/s = %.2fx vanilla's %.0f", memory_size, backend,
                        evals[-1]["eval_tokens_per_s"], evals[-1]["tokens_per_s_relative_to_vanilla"],
                        evals[-1]["vanilla_eval_tokens_per_s"])
    profile = profile_step(model, captured, args) if args.profile_size and not args.skip_steps else None
    score_dtypes = bench_score_dtypes(captured, args.profile_size or max(args.memory_sizes), args)
    logger.info("score pass at %d in fp32 / bf16 / fp16: %s s (CPU flags %s)", score_dtypes["memory_size"],
                " / ".join(f"{t:.3f}" for t in score_dtypes["score_pass_s"].values()), score_dtypes["cpu_flags"])

    num_layers = len(model.memory_layer_ids)
    fits = {
        f"{backend} {size}": 4 * num_layers * memory_bytes(size, heads, head_dim, args.memory_dtype, backend) / GIB
        for size in args.memory_sizes for backend in args.backends
    }
    machine["load_average_end"] = os.getloadavg()
    for result in searches:
        result.pop("scores", None)
    report = {
        "machine": machine,
        "config": {key: value for key, value in vars(args).items() if key != "gflops"},
        "corpus": corpus,
        "model": {"layers": args.layers, "embed_dim": args.embed_dim, "heads": heads, "head_dim": head_dim,
                  "memory_layers": model.memory_layer_ids, "vocab": vocabulary,
                  "train_loss_first_last": [losses[0], losses[-1]] if losses else None},
        "vanilla_step_s": vanilla_s,
        "search": searches,
        "steps": steps,
        "eval": evals,
        "gib_for_4_streams": fits,
        "peak_rss_gib": peak_rss() / GIB,
        "profile": profile,
        "score_dtypes": score_dtypes,
    }
    print_table(report)
    with open(args.output, "w") as out:
        json.dump(report, out, indent=2, default=str)
    logger.info("wrote %s", args.output)


def print_table(report: Dict) -> None:
    machine = report["machine"]
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"sgemm {machine['sgemm_gflops']} GFLOP/s, load {machine['load_average_start']} -> "
          f"{machine['load_average_end']}")
    print(f"streams: {report['config']['streams']}; vanilla step: {report['vanilla_step_s']:.3f} s; "
          f"peak RSS {report['peak_rss_gib']:.2f} GiB\n")
    print(f"{'memory':>8} {'backend':<10} {'options':<14} {'search s':>9} {'bound s':>8} {'x bound':>8} "
          f"{'recall@k':>8} {'MiB/stream':>10} {'RSS+ MiB':>9}")
    for r in report["search"]:
        recall = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        option_text = ",".join(f"{k}={v}" for k, v in r["options"].items())
        print(f"{r['memory_size']:>8} {r['backend']:<10} {option_text:<14} {r['search_s']:>9.3f} "
              f"{r['compute_bound_s']:>8.3f} {r['search_s'] / r['compute_bound_s']:>8.1f} {recall:>8} "
              f"{r['estimated_bytes_per_stream'] / 2**20:>10.0f} {r['rss_growth_bytes'] / 2**20:>9.0f}")
    print(f"\n{'memory':>8} {'backend':<10} {'step s':>8} {'vanilla s':>9} {'x vanilla':>9} {'4 streams GiB':>14}")
    for s in report["steps"]:
        gib = report["gib_for_4_streams"][f"{s['backend']} {s['memory_size']}"]
        print(f"{s['memory_size']:>8} {s['backend']:<10} {s['step_s']:>8.3f} {s['vanilla_step_s']:>9.3f} "
              f"{s['relative_to_vanilla']:>9.2f} {gib:>14.2f}")
    if report["eval"]:
        print(f"\n{'memory':>8} {'backend':<10} {'eval tok/s':>10} {'vanilla tok/s':>13} {'x vanilla':>9}")
    for e in report["eval"]:
        print(f"{e['memory_size']:>8} {e['backend']:<10} {e['eval_tokens_per_s']:>10.0f} "
              f"{e['vanilla_eval_tokens_per_s']:>13.0f} {e['tokens_per_s_relative_to_vanilla']:>9.2f}")
    if report["profile"]:
        profile = report["profile"]
        print(f"\nprofile, {profile['memory_size']} tokens, {profile['backend']} (s per step): "
              + ", ".join(f"{k} {v:.3f}" for k, v in profile["seconds_per_step"].items()))
        print(profile["top_ops"])


if __name__ == "__main__":
    run_script(main, "bench_memory.py")
