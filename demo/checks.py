#!/usr/bin/env python
"""Does a demo model retrieve what the demo promises? Two measured checks.

* **code**: a function defined at the top of a standard-library module and
  called ~7,500-8,500 tokens below (far beyond the 512-token local window, so
  only the memory can see the definition). For every piece of the name at the
  call but the first (which the definition cannot predict): is the
  best-weighted retrieval taken from the definition?
* **position**: the same text read again with a few tokens put before it, so
  that every token stands elsewhere in its segment: how often does a token's
  best-weighted retrieval stay the same place of the document? A memory whose
  keys carried their in-segment position would change most of them (layer 0
  has no position in its keys; deeper layers mix position into every hidden
  state, and a segment's context legitimately changes a key);
* **books**: in the first tokens of a novel, the pieces of names (tokens inside
  a capitalised word that does not start a sentence) last seen 1,000+ tokens
  back: are they among the retrieved entries, and how much does the memory
  lower their loss compared with the average token's?

Both read the document exactly as the app does (``report.build_report``, 65K
memory, k = 32, segments of 512). ``tests/test_demo_report.py`` holds the
committed models to these checks; the command prints them for any checkpoint:

    python demo/checks.py --checkpoint CKPT [--data DATA_BIN] [--book novel.txt]
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


from demo.checkpoint import DemoModel, load_demo_model
from demo.report import build_report, token_details
from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.errors import MemtrmUserError

SEGMENT, MEMORY, K = 512, 65536, 32

#: (function name, standard-library module whose lines 20-420 separate definition and call, call line)
FAR_CALLS = [
    ("frobnicate_widget_counter", "textwrap.py", "result = {}(items, limit)"),
    ("merge_sorted_batches", "heapq.py", "    merged = {}(left, right)"),
    ("quote_shell_fragment", "shlex.py", "print({}(text))"),
    ("parse_config_entry", "csv.py", "entry = {}(line, limit)"),
]
DEFINITION = ["def {}(widgets, threshold):", "    total = 0", "    for widget in widgets:",
              "        if widget.size > threshold:", "            total += widget.weight", "    return total"]


def far_call_retrievals(demo: DemoModel, name: str, module: str, call_line: str) -> List[bool]:
    """Per name piece at the call (all but the first): does its best-weighted retrieval come from the definition?"""
    definition = [line.format(name) for line in DEFINITION]
    filler = Path(os.path.dirname(os.__file__), module).read_text(encoding="utf-8").splitlines()[20:420]
    token_ids = demo.encode("\n".join(definition + filler + [call_line.format(name)]))
    texts = demo.token_texts(token_ids)
    definition_end = len(demo.encode("\n".join(definition)))
    if len(token_ids) - definition_end <= 4 * SEGMENT:
        raise MemtrmUserError(f"{module}: the call is not far below the definition for this tokenizer")
    starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
    call = "".join(texts).rfind(name)
    call_tokens = [i for i, s in enumerate(starts) if call <= s < call + len(name)]
    report = build_report(demo.model, token_ids, segment_length=SEGMENT, memory_size=MEMORY, knn_k=K,
                          stream_id=f"check-{name}")
    from_definition = []
    for index in call_tokens[1:]:
        best = max(token_details(report, index, texts).entries, key=lambda e: e.weight)
        from_definition.append(best.position < definition_end)
    return from_definition


def name_pieces_last_seen_far_back(texts: List[str], token_ids, min_distance: int) -> List[int]:
    """Indices of tokens inside a capitalised word (not a sentence's first word)
    whose last earlier occurrence is at least ``min_distance`` tokens back."""
    last_seen: Dict[int, int] = {}
    pieces, in_name = [], False
    for index, (text, token) in enumerate(zip(texts, token_ids)):
        if index == 0 or text.startswith(" ") or text == "\n":
            previous = texts[index - 1].strip() if index else ""
            in_name = text.strip()[:1].isupper() and not previous.endswith((".", "!", "?", '"', "\u201c"))
        if in_name and token in last_seen and index - last_seen[token] >= min_distance:
            pieces.append(index)
        last_seen[token] = index
    return pieces


@dataclass
class NameRecall:
    pieces: int  # far name pieces in the text
    recalled: float  # share whose token is among the retrieved entries
    name_gain: float  # mean loss without memory - with memory on them (nats)
    mean_gain: float  # the same over every token past the first segment
    copied_from: np.ndarray  # distances of the pieces whose best-weighted entry is the piece itself


def name_recall(demo: DemoModel, text: str, num_tokens: int = 12000, min_distance: int = 1000) -> NameRecall:
    token_ids = demo.encode(text)[:num_tokens]
    texts = demo.token_texts(token_ids)
    report = build_report(demo.model, token_ids, segment_length=SEGMENT, memory_size=MEMORY, knn_k=K,
                          stream_id="check-names")
    pieces = name_pieces_last_seen_far_back(texts, token_ids, min_distance)
    if not pieces:
        raise MemtrmUserError(f"no name pieces last seen {min_distance}+ tokens back in the first {num_tokens} tokens")
    ids = np.asarray(token_ids)
    # with shifted keys a retrieved entry is the memory's proposal for the token itself
    recalled = np.mean([ids[i] in ids[[p for p in report.entry_positions[i] if p >= 0]] for i in pieces])
    gain = report.memory_gain
    best = report.entry_positions[pieces, np.argmax(report.entry_weights[pieces].astype(np.float32), axis=1)]
    copied_from = (np.asarray(pieces) - 1 - best)[ids[best] == ids[pieces]]
    return NameRecall(len(pieces), float(recalled), float(np.mean(gain[pieces])),
                      float(np.nanmean(gain[SEGMENT:])), copied_from)


def shift_stability(model, token_ids, shift: int = 5, positions: Optional[List[int]] = None,
                    segment_length: int = SEGMENT, memory_size: int = MEMORY, knn_k: int = K) -> float:
    """Read ``token_ids`` and, again, with its first ``shift`` tokens put before it: the share of
    ``positions`` (default: every token past the first two segments) whose best-weighted
    retrieval is the same place of the document in both reads (tokens without one skipped)."""
    token_ids = list(token_ids)
    if not 0 < shift < segment_length or len(token_ids) <= shift:
        raise MemtrmUserError(f"the shift must lie in 1..{segment_length - 1} and be shorter than the text")
    settings = dict(segment_length=segment_length, memory_size=memory_size, knn_k=knn_k)
    plain = build_report(model, token_ids, stream_id="check-shift-0", **settings)
    moved = build_report(model, token_ids[:shift] + token_ids, stream_id="check-shift-1", **settings)
    if positions is None:
        positions = range(2 * segment_length, len(token_ids))
    same = [plain.entry_positions[i, 0] == moved.entry_positions[i + shift, 0] - shift for i in positions
            if plain.entry_positions[i, 0] >= 0 and moved.entry_positions[i + shift, 0] >= 0]
    if not same:
        raise MemtrmUserError("no token of the text retrieves anything: read a text longer than two segments")
    return float(np.mean(same))


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a local memorizing_transformer_lm or longmem_sidenet_lm checkpoint")
    parser.add_argument("--data", default=None, help="directory with dict.txt and spm.model (default: "
                        "next to the checkpoint, then its data-bin)")
    parser.add_argument("--book", default=None, help="a novel (.txt) for the names check; without it, code only")
    parser.add_argument("--book-tokens", type=int, default=12000, help="tokens of the novel to read")
    parser.add_argument("--shift", type=int, default=5, help="position check: tokens put before the text")
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING, stream=sys.stderr)  # stdout is the checks' report
    try:
        if args.book and not os.path.isfile(args.book):
            raise MemtrmUserError(f"--book {args.book}: no such file")
        demo = load_demo_model(args.checkpoint, args.data, cpu=True, segment_length=SEGMENT)
        every: List[bool] = []
        for name, module, call in FAR_CALLS:
            hits = far_call_retrievals(demo, name, module, call)
            every += hits
            print(f"far call  {name:<28} ({module:<11}): definition is the best retrieval for "
                  f"{sum(hits)} of {len(hits)} name pieces")
        print(f"far call  all: {sum(every)} of {len(every)}")
        sample = Path(os.path.dirname(os.__file__), "argparse.py").read_text(encoding="utf-8")
        stable = shift_stability(demo.model, demo.encode(sample)[:4 * SEGMENT], args.shift)
        print(f"position  argparse.py, first {4 * SEGMENT} tokens read again {args.shift} tokens later in their "
              f"segments: the best retrieval is the same place for {stable:.1%} of the tokens past the second segment")
        if args.book:
            result = name_recall(demo, Path(args.book).read_text(encoding="utf-8"), args.book_tokens)
            print(f"names     {os.path.basename(args.book)}, first {args.book_tokens} tokens: {result.pieces} name "
                  f"pieces last seen 1,000+ tokens back; {result.recalled:.1%} among the retrieved entries; "
                  f"memory gain {result.name_gain:.3f} nats on them vs {result.mean_gain:.3f} on all tokens; "
                  f"best entry is the piece itself for {len(result.copied_from)} "
                  f"({int((result.copied_from >= 2000).sum())} from 2,000+ tokens back)")
    except MemtrmUserError as error:
        raise SystemExit(f"demo/checks.py: error: {error.message}")


if __name__ == "__main__":
    main()
