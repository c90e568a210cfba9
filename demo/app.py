#!/usr/bin/env python
"""Gradio app: see what the kNN memory retrieves for each token of a document.

    python demo/app.py [--checkpoint [NAME=]CKPT ...] [--samples DIR] [--port 7860]

A document (a sample, pasted text or an uploaded .txt/.py file) is read
through the model segment by segment; every token is coloured by how much the
memory helped it (loss without memory minus loss with memory). Clicking a
token lists what the memory returned for it. Several models can be served at
once (by default the committed ``code`` and ``books`` demo models); a sample
picks the model of its kind, and the user can switch. Every run gets memory
banks of its own (see ``report.build_report``), so sessions never see each
other's text.
"""

import argparse
import ast
import ctypes
import ctypes.util
import gc
import logging
import os
import re
import sys
import threading
import uuid
from typing import Dict, List, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
# Set before the imports that print them: faiss's loader reports each instruction-set module
# it tries (the wheel dispatches at run time: get_compile_options() has AVX2 and AVX512), and
# fairseq's speech tasks ask for tensorboardX. A user needs neither line.
NOISY_IMPORT_LOGGERS = ("faiss.loader", "fairseq.tasks.text_to_speech")
for _name in NOISY_IMPORT_LOGGERS:
    logging.getLogger(_name).setLevel(logging.WARNING)
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from demo.checkpoint import DEMO_CHECKPOINTS, DemoModel, load_demo_model  # noqa: E402
from demo.report import MAX_DOCUMENT_TOKENS, DocumentReport, ReadCancelled, build_report, token_details  # noqa: E402
from demo.report_cache import DEFAULT_CACHE_DIR, ReportCache  # noqa: E402
from demo.views import (TOKENS_PER_PAGE, distance_histogram, page_count, page_of, prediction_rows,  # noqa: E402
                        render_page, segment_gain_chart, token_links)
from fairseq_memtrm.console import configure_logging  # noqa: E402
from fairseq_memtrm.errors import MemtrmUserError  # noqa: E402

logger = logging.getLogger("demo.app")

#: Standard library modules offered as samples: long, with names defined far above their use.
STDLIB_SAMPLES = (
    "argparse.py", "dataclasses.py", "typing.py", "inspect.py", "tarfile.py", "subprocess.py",
    "textwrap.py", "bisect.py", "heapq.py", "shlex.py", "csv.py", "json/encoder.py",
)
#: The model a sample is read with by default, by file type, where a model of that name is served.
SAMPLE_MODEL = {".py": "code", ".txt": "books"}
MEMORY_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_MEMORY_SIZE = 65536  # what the committed models were fine-tuned with
DEFAULT_KNN_K = 32
#: A session's state (its report) is dropped this long after its last update even if its tab stays
#: open; a closed tab's state goes at once (``DemoApp.end_session``).
SESSION_TIME_TO_LIVE_S = 3 * 3600

def _load_libc():
    """glibc, for malloc_trim (None elsewhere: musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


LIBC = _load_libc()

#: Clicks inside a gr.HTML view go to the server as a ``click`` event with what was clicked.
CLICK_JS = """
element.addEventListener('click', (event) => {
  const item = event.target.closest('[data-token], [data-segment], [data-type]');
  if (!item) return;
  event.preventDefault();
  if (item.dataset.token !== undefined) {
    element.querySelectorAll('.tok.selected').forEach((t) => t.classList.remove('selected'));
    item.classList.add('selected');
    trigger('click', {token_index: parseInt(item.dataset.token, 10)});
  } else if (item.dataset.segment !== undefined) {
    trigger('click', {segment: parseInt(item.dataset.segment, 10)});
  } else {
    trigger('click', {token_type: parseInt(item.dataset.type, 10)});
  }
});
// a jump (retrieval source, search hit, segment) marks its token .target: scroll it into view
new MutationObserver(() => {
  const target = element.querySelector('.tok.target');
  if (target) target.scrollIntoView({block: 'center'});
}).observe(element, {childList: true, subtree: true});
"""
PAGE_CSS = """
.doc { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.6; }
.tok { cursor: pointer; border-radius: 2px; }
.tok:hover { outline: 1px solid #555; }
.tok.selected { outline: 2px solid #000; }
.tok.source { outline: 2px solid #1f5fd6; background: rgba(31,95,214,0.35) !important; }
.chart-title, .links { font-size: 13px; }
.seg { cursor: pointer; }
.seg:hover { opacity: 0.6; }
"""


def list_samples(samples_dir: Optional[str]) -> Dict[str, str]:
    """Sample name -> path: stdlib modules, then every .txt/.py file in ``samples_dir``."""
    stdlib = os.path.dirname(os.__file__)
    samples = {
        f"stdlib: {name}": os.path.join(stdlib, name)
        for name in STDLIB_SAMPLES
        if os.path.isfile(os.path.join(stdlib, name))
    }
    if samples_dir:
        if not os.path.isdir(samples_dir):
            raise MemtrmUserError(f"--samples {samples_dir}: not a directory")
        for name in sorted(os.listdir(samples_dir)):
            if name.endswith((".txt", ".py")):
                samples[f"samples: {name}"] = os.path.join(samples_dir, name)
    return samples


def read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MemtrmUserError(
            f"{os.path.basename(path)} is not UTF-8 text (bad byte at offset {error.start}); "
            "save it as UTF-8 and upload it again"
        )


def parse_checkpoint_args(specs: Optional[List[str]]) -> Dict[str, str]:
    """``--checkpoint [NAME=]CKPT`` values -> {name: path}; none given: the committed demo models.
    An unnamed checkpoint is named after its directory (``checkpoints/books/ft/x.pt`` -> ``ft``)."""
    if not specs:
        committed = {name: path for name, path in DEMO_CHECKPOINTS.items() if os.path.isfile(path)}
        if not committed:
            raise MemtrmUserError(
                f"no demo model in {os.path.dirname(os.path.dirname(DEMO_CHECKPOINTS['code']))}; "
                "run `make demo-model` or pass --checkpoint CKPT"
            )
        return committed
    checkpoints: Dict[str, str] = {}
    for spec in specs:
        match = re.fullmatch(r"([\w.-]+)=(.+)", spec)
        name, path = match.groups() if match else (None, spec)
        name = name or os.path.basename(os.path.dirname(os.path.abspath(path))) or "model"
        if name in checkpoints:
            if match:
                raise MemtrmUserError(f"--checkpoint {spec}: the name {name!r} is taken; give each model its own")
            name = f"{name}-{len(checkpoints) + 1}"
        checkpoints[name] = path
    return checkpoints


#: no document of N tokens has more characters (or UTF-8 bytes) than this many times N
MAX_CHARS_PER_TOKEN = 40


def max_upload_bytes(max_tokens: int) -> int:
    """The largest upload worth reading: anything bigger is surely over the token limit."""
    return MAX_CHARS_PER_TOKEN * max_tokens


CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |return\b|@\w|#"
                       r"|(if|for|while|with|elif|else|try|except)\b.*:$|[\w.]+\s*=[^=])")


def looks_like_code(text: str) -> bool:
    """Python source, as opposed to prose: it parses with a statement that is not a bare
    expression, or (a cut-out piece that does not parse) 30%+ of its lines look like code."""
    try:
        if any(not isinstance(node, ast.Expr) for node in ast.parse(text).body):
            return True
    except (SyntaxError, ValueError):
        pass
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and sum(bool(CODE_LINE.match(line)) for line in lines) >= 0.3 * len(lines)


class ViewClick(gr.EventData):
    """A click the page's own script reports from the document view, the segment chart or the
    token list: ``token_index``, ``segment`` or ``token_type`` in ``data``. Gradio builds it
    from the event's target and payload, as it builds ``gr.SelectData``."""

    def __init__(self, target, data):
        super().__init__(target, data)
        self.data = data if isinstance(data, dict) else {}


class DemoApp:
    def __init__(self, models: Dict[str, DemoModel], samples: Dict[str, str], max_tokens: int = MAX_DOCUMENT_TOKENS,
                 cache: Optional[ReportCache] = None):
        if not models:
            raise MemtrmUserError("the demo needs at least one model")
        self.models = models
        self.samples = samples
        self.max_tokens = max_tokens
        self.cache = cache  # reports of the samples on disk; None: always read
        # One lock for all models: forward passes take turns (2 CPU cores serve every session).
        self.model_lock = threading.Lock()
        # stream id -> the stop signal of that session's read in progress (the Cancel button, a re-read)
        self.reads: Dict[str, threading.Event] = {}

    def model_for_text(self, text: str, current=None):
        """The model pasted text is read with: `code` for Python source, `books` for prose
        (where models of those names are served), else the current one."""
        if not (text or "").strip():
            return self.model_named(None, current)
        return self.model_named("code" if looks_like_code(text) else "books", current)

    def on_paste(self, text, current):
        """Typing or pasting makes the pasted text the document, with the model it suits."""
        return "Paste", self.model_for_text(text, current)

    def on_upload(self, upload, current):
        """An upload becomes the document, read with the model named for its file type."""
        path = upload if isinstance(upload, str) or upload is None else upload.name
        return "Upload", self.model_named(SAMPLE_MODEL.get(os.path.splitext(path or "")[1]), current)

    def on_sample(self, sample, current):
        """Choosing a sample makes it the document, with the model named for its file type."""
        return "Sample", self.model_for_sample(sample, current)

    def model_for_sample(self, sample, current=None):
        """The model a sample is read with: the one named for its file type, else the current one."""
        return self.model_named(SAMPLE_MODEL.get(os.path.splitext(self.samples.get(sample, ""))[1]), current)

    def model_named(self, name, current=None):
        """``name`` where that model is served, else the current one, else the first."""
        if name in self.models:
            return name
        return current if current in self.models else next(iter(self.models))

    # -------------------------------------------------------------- reading
    def load_document(self, source, sample, pasted, upload) -> str:
        if source == "Sample":
            if sample not in self.samples:
                raise MemtrmUserError("choose a sample document")
            return read_text_file(self.samples[sample])
        if source == "Upload":
            if not upload:
                raise MemtrmUserError("upload a .txt or .py file first")
            path = upload if isinstance(upload, str) else upload.name
            if not path.endswith((".txt", ".py")):
                raise MemtrmUserError("upload a .txt or .py file")
            size = os.path.getsize(path)
            if size > max_upload_bytes(self.max_tokens):  # rejected before a byte is read
                raise MemtrmUserError(
                    f"the file has {size:,} bytes, far over the limit of {self.max_tokens:,} tokens: "
                    "upload a part of it"
                )
            return read_text_file(path)
        return pasted or ""

    def document_tokens(self, demo_model: DemoModel, source, sample, pasted, upload):
        """(token ids, a note for the status) of the chosen document, or a MemtrmUserError."""
        text = self.load_document(source, sample, pasted, upload)
        if not text.strip():
            raise MemtrmUserError("the document is empty: paste some text, upload a .txt/.py file or pick a sample")
        if source == "Sample" and len(text) > max_upload_bytes(self.max_tokens):
            text = text[: max_upload_bytes(self.max_tokens)]  # a long sample book is read in part (below)
        if len(text) > max_upload_bytes(self.max_tokens):  # surely over the token limit: do not even encode it
            raise MemtrmUserError(
                f"the document has {len(text):,} characters, far over the limit of "
                f"{self.max_tokens:,} tokens: cut it or upload a part of it"
            )
        token_ids = demo_model.encode(text)
        if source == "Sample" and len(token_ids) > self.max_tokens:  # our own sample: read its beginning
            return token_ids[: self.max_tokens], f" (the sample's first {self.max_tokens:,} tokens: the demo's limit)"
        return token_ids, ""

    def cache_key(self, model_name: str, token_ids, memory_size: int, knn_k: int) -> str:
        demo_model = self.models[model_name]
        return self.cache.key(demo_model.checkpoint, token_ids, max_tokens=self.max_tokens,
                              segment_length=demo_model.segment_length, memory_size=memory_size, knn_k=knn_k)

    def read_report(self, model_name: str, token_ids, memory_size: int, knn_k: int, stream_id: str,
                    cacheable: bool, progress=None, should_stop=None) -> DocumentReport:
        """The report of ``token_ids``: from the cache where ``cacheable`` (a sample) and present, else read."""
        demo_model = self.models[model_name]
        settings = dict(segment_length=demo_model.segment_length, memory_size=memory_size, knn_k=knn_k)
        key = None
        if cacheable and self.cache is not None:
            key = self.cache_key(model_name, token_ids, memory_size, knn_k)
            cached = self.cache.get(key, stream_id)
            if cached is not None:
                return cached
        report = build_report(demo_model.model, token_ids, stream_id=stream_id, lock=self.model_lock,
                              max_tokens=self.max_tokens, progress=progress, should_stop=should_stop, **settings)
        if key is not None:
            self.cache.put(key, report)
        return report

    def precompute(self, memory_size: int = DEFAULT_MEMORY_SIZE, knn_k: int = DEFAULT_KNN_K) -> int:
        """Read every sample with its model at the given settings into the cache; returns how many were read."""
        read = 0
        for sample in self.samples:
            model_name = self.model_for_sample(sample)
            token_ids, _ = self.document_tokens(self.models[model_name], "Sample", sample, None, None)
            if len(token_ids) < 2:
                continue
            logger.info("precomputing %s with the %s model (%d tokens)", sample, model_name, len(token_ids))
            self.read_report(model_name, token_ids, memory_size, knn_k, "precompute", cacheable=True)
            read += 1
        return read

    def show_cached_sample(self, model_name, sample, memory_size, knn_k, session, request: gr.Request = None):
        """On page load: the chosen sample's report where the cache has it (``--precompute``), so the
        first view needs no wait; otherwise nothing changes."""
        try:
            if self.cache is None or model_name not in self.models or sample not in self.samples:
                return (gr.skip(),) * 8
            token_ids, _ = self.document_tokens(self.models[model_name], "Sample", sample, None, None)
            if not self.cache.has(self.cache_key(model_name, token_ids, int(memory_size), int(knn_k))):
                return (gr.skip(),) * 8
        except MemtrmUserError:
            return (gr.skip(),) * 8
        return self.run(model_name, "Sample", sample, None, None, memory_size, knn_k, session, request,
                        progress=lambda *args, **kwargs: None)

    @staticmethod
    def stream_id(session: dict, request) -> str:
        session.setdefault("stream_id", f"session-{getattr(request, 'session_hash', None) or uuid.uuid4().hex}")
        return session["stream_id"]

    def start_read(self, session, request: gr.Request = None):
        """First step of a read: stop this session's read in progress, forget its document (clicks on
        the old page find nothing) and clear every output, so no status of the old read stays."""
        session = {"stream_id": self.stream_id(dict(session or {}), request)}
        previous = self.reads.get(session["stream_id"])
        if previous is not None:
            previous.set()
        hidden = gr.update(value=None, visible=False)
        return ("Reading…", "", "", gr.update(value=1), "", hidden, hidden, "", "", [], [], session)

    def cancel(self, session, request: gr.Request = None):
        """The Cancel button: the read in progress stops before its next segment."""
        stream_id = self.stream_id(dict(session or {}), request)
        stop = self.reads.get(stream_id)
        if stop is None:  # the read had already finished (or none ran): its result stays, and so does its status
            return gr.skip()
        stop.set()
        return "**Cancelled.** Read the document again to start over."

    def run(self, model_name, source, sample, pasted, upload, memory_size, knn_k, session, request: gr.Request,
            progress=gr.Progress()):
        """Read the chosen document. Returns status, gates, page view, page control, segment chart,
        distance plot, token links, session."""
        session = dict(session or {})
        stream_id = self.stream_id(session, request)
        stop = self.reads[stream_id] = threading.Event()
        hidden = gr.update(value=None, visible=False)
        try:
            if model_name not in self.models:
                raise MemtrmUserError(f"choose a model: {', '.join(self.models)}")
            demo_model = self.models[model_name]
            token_ids, note = self.document_tokens(demo_model, source, sample, pasted, upload)
            report = self.read_report(
                model_name, token_ids, int(memory_size), int(knn_k), stream_id, cacheable=source == "Sample",
                progress=lambda done, total: progress((done, total), desc="reading the document", unit="segments"),
                should_stop=stop.is_set,
            )
        except MemtrmUserError as error:
            return (f"**Error:** {error.message}", "", "", gr.update(), hidden, hidden, "", session)
        except ReadCancelled:  # by the Cancel button (which says so) or a new read (which has its own outputs)
            return (gr.skip(),) * 8
        finally:
            if self.reads.get(stream_id) is stop:
                del self.reads[stream_id]
        session.update(report=report, model=model_name, token_texts=demo_model.token_texts(report.token_ids),
                       selected=None, sources=[], target=None, find=None)
        pages = page_count(report.num_tokens)
        gain = report.memory_gain[1:]
        status = (
            f"Read **{report.num_tokens:,} tokens**{note} with the `{model_name}` model in "
            f"{len(report.segment_starts)} segments of {demo_model.segment_length} "
            f"(memory {report.memory_size:,} tokens, k={report.knn_k}, "
            f"layer {report.layer}). Mean loss {np.nanmean(report.loss_with_memory):.3f} nats with memory, "
            f"{np.nanmean(report.loss_without_memory):.3f} without; memory helped "
            f"{np.mean(gain > 0):.0%} of tokens. Click a token to see what it retrieved."
        )
        gates = ("**Learned per-head gates** (layer {}): each head takes this fixed share of its output from "
                 "memory whenever it found something, and the rest from local context: {}.".format(
                     report.layer, ", ".join(f"head {h} {g:.2f}" for h, g in enumerate(report.head_gates))))
        if len(report.segment_starts) < 2:  # nothing was in memory for any token: say why, show no empty plots
            status += (
                f"\n\n**The memory starts after the first segment** ({demo_model.segment_length} tokens): this "
                f"text has {report.num_tokens:,}, so nothing was retrieved. Give it at least "
                f"{demo_model.segment_length + 1 - report.num_tokens:,} more tokens (a few hundred words; "
                "thousands to see distant retrievals)."
            )
            chart, histogram, links = hidden, hidden, ""
        else:
            chart = gr.update(value=segment_gain_chart(report), visible=True)
            figure = distance_histogram(report)
            histogram = gr.update(value=figure, visible=figure is not None)
            links = token_links(report, demo_model.token_text)
        return (
            status, gates, render_page(report, session["token_texts"], 0),
            gr.update(maximum=pages, value=1, label=f"Page (of {pages}, {TOKENS_PER_PAGE:,} tokens each)"),
            chart, histogram, links, session,
        )

    # ----------------------------------------------------------- navigation
    def view(self, session, page: int, target: Optional[int] = None) -> str:
        """Page ``page`` (0-based) with the session's selected token and highlighted sources."""
        target = session.get("target") if target is None else target
        return render_page(session["report"], session["token_texts"], page, session.get("selected"),
                           session.get("sources", ()), target)

    def show_page(self, page, session):
        report = (session or {}).get("report")
        if report is None or page is None:
            return gr.update()
        return self.view(session, min(max(int(page) - 1, 0), page_count(report.num_tokens) - 1))

    def jump(self, session, index: int, sources=(), message: str = ""):
        """Open the page of token ``index``, highlight ``sources`` and scroll to ``index``: (page, view, location)."""
        session["sources"], session["target"] = [int(s) for s in sources], int(index)
        page = page_of(index)
        return gr.update(value=page + 1), self.view(session, page, target=index), message

    def token_outputs(self, session, index: int):
        """The clicked token's header, predictions and retrieval rows (and the rows' positions in ``session``)."""
        report = session["report"]
        demo_model = self.models[session["model"]]
        details = token_details(report, index, session["token_texts"], token_text=demo_model.token_text)
        session["selected"], session["entries"] = index, [entry.position for entry in details.entries]
        if index == 0:
            return "Token 0 is the document's start: nothing predicts it.", [], []
        header = (
            f"Token {details.index} `{details.token!r}`: probability {details.probability_with_memory:.3f} "
            f"with memory, {details.probability_without_memory:.3f} without (loss {details.loss_with_memory:.3f} "
            f"vs {details.loss_without_memory:.3f} nats). "
        )
        if details.entries:
            header += (f"{details.memory_share:.0%} of layer {report.layer}'s output for it came from memory, "
                       f"{1 - details.memory_share:.0%} from local context. {len(details.entries)} memory entries; "
                       "✓ marks an entry whose token is this token. Click a row to see it in the document.")
            if report.shift_keys:
                header += (" This model keys each entry by the token before it (`--memory-shift-keys`): a "
                           "retrieved token is what the memory proposes for this one.")
        else:
            header += "Nothing retrieved (the first segment has an empty memory)."
        visible = lambda text: text.replace("\n", "\u21b5")  # a line break, shown in a table cell
        rows = [
            ["✓" if entry.holds_token else "", rank + 1, visible(entry.left_context), visible(entry.token),
             visible(entry.right_context), entry.distance, round(entry.score, 3), round(entry.weight, 4),
             ",".join(map(str, entry.heads))]
            for rank, entry in enumerate(details.entries)
        ]
        return header, prediction_rows(details), rows

    def on_view_click(self, session, event: ViewClick):
        """A click in the document (a token) or the segment chart (a bar) or the token list (a type)."""
        data = event.data
        session = session or {}
        report = session.get("report")
        unchanged = (gr.update(),) * 6
        if report is None:
            return ("Read a document, then click a token.", *unchanged[1:], session)
        if "segment" in data:  # a bar of the gain chart: its page, scrolled to its first token
            segment = min(max(int(data["segment"]), 0), len(report.segment_starts) - 1)
            start = int(report.segment_starts[segment])
            page, view, location = self.jump(session, start, message=f"Segment {segment}: tokens from {start:,}.")
            return (gr.update(), gr.update(), gr.update(), page, view, location, session)
        if "token_type" in data:  # a token the memory helped most: its occurrences, the best first
            token = int(data["token_type"])
            occurrences = np.flatnonzero(report.token_ids == token)
            occurrences = occurrences[occurrences > 0]
            if not occurrences.size:
                return (*unchanged, session)
            best = int(occurrences[np.nanargmax(report.memory_gain[occurrences])])
            session["find"] = {"query": None, "occurrences": occurrences.tolist(),
                               "current": int(np.flatnonzero(occurrences == best)[0])}
            return self.show_occurrence(session, "its best occurrence, ")
        index = data.get("token_index")
        if index is None:
            return (*unchanged, session)
        try:
            header, predictions, rows = self.token_outputs(session, int(index))
        except MemtrmUserError as error:
            return (f"**Error:** {error.message}", *unchanged[1:], session)
        return (header, predictions, rows, gr.update(), gr.update(), gr.update(), session)

    def show_occurrence(self, session, how: str = ""):
        """Jump to the current occurrence of the session's search: select it, show its details."""
        find = session["find"]
        index = find["occurrences"][find["current"]]
        header, predictions, rows = self.token_outputs(session, index)
        label = repr(session["token_texts"][index]) if find["query"] is None else repr(find["query"])
        page, view, location = self.jump(
            session, index, sources=[index],
            message=f"{label}: {how}occurrence {find['current'] + 1} of {len(find['occurrences'])} (token {index:,}).")
        return (header, predictions, rows, page, view, location, session)

    def find(self, query, step: int, session):
        """Token search: the tokens where ``query`` starts in the document text; ``step`` +1 next, -1 previous."""
        session = session or {}
        report = session.get("report")
        unchanged = (gr.update(),) * 6
        if report is None:
            return (*unchanged[:5], "Read a document first.", session)
        query = query or ""
        if not query.strip():
            return (*unchanged[:5], "Type some text to find.", session)
        find = session.get("find")
        if not find or find["query"] != query:
            texts = session["token_texts"]
            starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
            document = "".join(texts)
            at, hits = document.find(query), []
            while at >= 0:
                hits.append(int(np.searchsorted(starts, at, side="right") - 1))
                at = document.find(query, at + 1)
            occurrences = sorted(set(hits))
            if not occurrences:
                return (*unchanged[:5], f"{query!r} does not occur in the document.", session)
            find = session["find"] = {"query": query, "occurrences": occurrences, "current": -1 if step > 0 else 0}
        find["current"] = (find["current"] + step) % len(find["occurrences"])
        return self.show_occurrence(session)

    def jump_to_source(self, session, event: gr.SelectData):
        """A click on a retrieval row: the page of its entry, the entry's token highlighted."""
        session = session or {}
        entries = session.get("entries") or []
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        if session.get("report") is None or row is None or not 0 <= row < len(entries):
            return gr.update(), gr.update(), gr.update(), session
        position = entries[row]
        page, view, location = self.jump(
            session, position, sources=[position],
            message=f"Entry {row + 1}: token {position:,}, {session['selected'] - 1 - position:,} tokens before "
                    f"the query (highlighted in blue; the clicked token is outlined).")
        return page, view, location, session

    # ----------------------------------------------------------------- life
    def end_session(self, request: gr.Request):
        """A tab closed: stop its read and free its state now (Gradio would keep it an hour)."""
        session_hash = getattr(request, "session_hash", None)
        stop = self.reads.get(f"session-{session_hash}")
        if stop is not None:
            stop.set()
        holder = getattr(self.blocks, "state_holder", None)
        if session_hash and holder is not None:
            holder.delete_state(session_hash)

    @staticmethod
    def free_session(session) -> None:
        """Gradio's delete callback for a session's state: drop the report and its texts, and give
        the memory back to the system (glibc keeps freed blocks of a report's size for reuse, so
        without a trim the app's RSS grew ~100 MB with every long document read)."""
        if isinstance(session, dict):
            report = session.get("report")
            session.clear()
            if report is not None:
                logger.info("freed the report of %s (%d tokens)", report.stream_id, report.num_tokens)
                del report
                gc.collect()
                if LIBC is not None:
                    LIBC.malloc_trim(0)

    # ------------------------------------------------------------------ UI
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Memorizing Transformer: what does the memory retrieve?") as blocks:
            gr.Markdown(
                "# What does the kNN memory retrieve?\n"
                f"Models: {', '.join(f'`{name}` ({m.checkpoint_label})' for name, m in self.models.items())}. "
                "Each token is coloured by "
                "**loss without memory − loss with memory**: green where the memory helped, red where it "
                f"hurt. Documents up to {self.max_tokens:,} tokens."
            )
            session = gr.State({}, time_to_live=SESSION_TIME_TO_LIVE_S, delete_callback=self.free_session)
            with gr.Row():
                with gr.Column(scale=2):
                    first_sample = next(iter(self.samples), None)
                    model_choice = gr.Radio(list(self.models), value=self.model_for_sample(first_sample),
                                            label="Model", elem_id="model-choice", visible=len(self.models) > 1)
                    source = gr.Radio(["Sample", "Paste", "Upload"], value="Sample", label="Document")
                    sample = gr.Dropdown(list(self.samples), value=first_sample,
                                         label="Sample document", elem_id="sample-choice")
                    pasted = gr.Textbox(label="Pasted text", lines=4, elem_id="pasted-text")
                    upload = gr.File(label="Upload a .txt or .py file", file_types=[".txt", ".py"], type="filepath")
                with gr.Column(scale=1):
                    memory_size = gr.Dropdown(MEMORY_SIZES, value=DEFAULT_MEMORY_SIZE, label="Memory size (tokens)",
                                              elem_id="memory-size")
                    knn_k = gr.Slider(1, 64, value=DEFAULT_KNN_K, step=1, label="k (entries retrieved per head)",
                                      elem_id="knn-k")
                    run_button = gr.Button("Read the document", variant="primary", elem_id="run-button")
                    cancel_button = gr.Button("Cancel", elem_id="cancel-button")
            status = gr.Markdown(elem_id="status")
            gates = gr.Markdown(elem_id="gates")
            with gr.Row():
                find_text = gr.Textbox(label="Find in the document", elem_id="find-text", scale=3)
                previous_button = gr.Button("◀ previous", elem_id="find-previous", scale=1)
                next_button = gr.Button("next ▶", elem_id="find-next", scale=1)
            location = gr.Markdown(elem_id="location")
            page = gr.Number(1, minimum=1, precision=0, label=f"Page ({TOKENS_PER_PAGE:,} tokens each)",
                             elem_id="page")
            document_view = gr.HTML("", js_on_load=CLICK_JS, css_template=PAGE_CSS, elem_id="document-view",
                                    max_height=520)
            token_header = gr.Markdown(elem_id="token-header")
            with gr.Row():
                prediction_table = gr.Dataframe(
                    headers=["rank", "with memory", "p", "without memory", "p "],
                    datatype=["number", "str", "number", "str", "number"],
                    label="Top predictions for the clicked token", elem_id="prediction-table", interactive=False,
                    scale=2)
                token_list = gr.HTML("", js_on_load=CLICK_JS, css_template=PAGE_CSS, elem_id="token-links")
            retrieval_table = gr.Dataframe(
                headers=["is the token", "rank", "before", "retrieved token", "after", "distance (tokens)",
                         "similarity", "attention weight", "heads"],
                datatype=["str", "number", "str", "str", "str", "number", "number", "number", "str"],
                label="Top-k memory entries (merged over heads); click a row to see it in the document",
                elem_id="retrieval-table", interactive=False, wrap=True,
            )
            with gr.Row():
                gain_chart = gr.HTML("", js_on_load=CLICK_JS, css_template=PAGE_CSS, elem_id="segment-gains")
                distance_plot = gr.Plot(label="Retrieval distances, weighted by attention, per log-bin width",
                                        elem_id="distance-plot")

            clear_outputs = [status, gates, document_view, page, location, gain_chart, distance_plot, token_header,
                             token_list, prediction_table, retrieval_table, session]
            read = run_button.click(self.start_read, inputs=[session], outputs=clear_outputs, queue=False).then(
                self.run,
                inputs=[model_choice, source, sample, pasted, upload, memory_size, knn_k, session],
                outputs=[status, gates, document_view, page, gain_chart, distance_plot, token_list, session],
                concurrency_limit=4, show_progress_on=[status],
            )
            cancel_button.click(self.cancel, inputs=[session], outputs=[status], cancels=[read], queue=False)
            # the document is what the user touched last, read with the model that suits it
            sample.input(self.on_sample, inputs=[sample, model_choice], outputs=[source, model_choice])
            pasted.change(self.on_paste, inputs=[pasted, model_choice], outputs=[source, model_choice])
            upload.upload(self.on_upload, inputs=[upload, model_choice], outputs=[source, model_choice])
            page.change(self.show_page, inputs=[page, session], outputs=document_view)
            navigation = [token_header, prediction_table, retrieval_table, page, document_view, location, session]
            for view in (document_view, gain_chart, token_list):
                view.click(self.on_view_click, inputs=[session], outputs=navigation)
            retrieval_table.select(self.jump_to_source, inputs=[session],
                                   outputs=[page, document_view, location, session])
            for button, step in ((next_button, 1), (previous_button, -1)):
                button.click(lambda query, state, step=step: self.find(query, step, state),
                             inputs=[find_text, session], outputs=navigation)
            find_text.submit(lambda query, state: self.find(query, 1, state), inputs=[find_text, session],
                             outputs=navigation)
            blocks.load(self.show_cached_sample, inputs=[model_choice, sample, memory_size, knn_k, session],
                        outputs=[status, gates, document_view, page, gain_chart, distance_plot, token_list, session])
            blocks.unload(self.end_session)
        self.blocks = blocks
        return blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description="Gradio demo of the kNN memory's retrievals")
    parser.add_argument("--checkpoint", action="append", metavar="[NAME=]CKPT",
                        help="a local checkpoint of memorizing_transformer_lm or longmem_sidenet_lm, optionally "
                        "named; repeat to serve several (default: the committed demo models, code and books)")
    parser.add_argument("--data", default=None, help="directory with dict.txt and spm.model (default: "
                        "next to the checkpoint, then its data-bin); with one --checkpoint only")
    parser.add_argument("--spm-model", default=None, help="SentencePiece model (default: DATA/spm.model); "
                        "with one --checkpoint only")
    parser.add_argument("--samples", default=None, help="folder of .txt/.py documents to offer as samples")
    parser.add_argument("--segment-length", type=int, default=None,
                        help="tokens per segment (default: the checkpoint's --tokens-per-sample)")
    parser.add_argument("--max-document-tokens", type=int, default=MAX_DOCUMENT_TOKENS,
                        help="longest document read (memory and time grow with it)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is present")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="where the reports of the samples are kept, so that a sample opens at once")
    parser.add_argument("--no-cache", action="store_true", help="read every sample anew; write no report to disk")
    parser.add_argument("--precompute", action="store_true",
                        help="read every sample with the default settings into --cache-dir, then exit")
    args = parser.parse_args(argv)
    configure_logging(logging.INFO, stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "httpcore2", "asyncio", *NOISY_IMPORT_LOGGERS):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        samples = list_samples(args.samples)
        checkpoints = parse_checkpoint_args(args.checkpoint)
        if len(checkpoints) > 1 and (args.data or args.spm_model):
            raise MemtrmUserError("--data and --spm-model apply to one checkpoint; with several, keep each "
                                  "checkpoint's dict.txt and spm.model next to it or in its data-bin")
        models = {
            name: load_demo_model(path, args.data, args.spm_model, args.segment_length, args.cpu)
            for name, path in checkpoints.items()
        }
    except MemtrmUserError as error:  # exit status 2 for a bad checkpoint file, else 1
        print(f"demo/app.py: error: {error.message}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_status) from None
    cache = None if args.no_cache else ReportCache(args.cache_dir)
    app = DemoApp(models, samples, args.max_document_tokens, cache)
    if args.precompute:
        if cache is None:
            raise SystemExit("demo/app.py: error: --precompute fills the cache: drop --no-cache")
        print(f"precomputed {app.precompute()} samples into {args.cache_dir}", flush=True)
        return
    blocks = app.build()
    print(f"Memorizing Transformer demo: http://{args.host}:{args.port}", flush=True)
    blocks.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                     show_error=False, theme=gr.themes.Soft(),
                                                     max_file_size=max_upload_bytes(args.max_document_tokens))


if __name__ == "__main__":
    main()
