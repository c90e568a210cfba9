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
import html
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
from demo.report import MAX_DOCUMENT_TOKENS, DocumentReport, build_report, token_details  # noqa: E402
from fairseq_memtrm.errors import MemtrmUserError  # noqa: E402

logger = logging.getLogger("demo.app")

#: Standard library modules offered as samples: long, with names defined far above their use.
STDLIB_SAMPLES = (
    "argparse.py", "dataclasses.py", "typing.py", "inspect.py", "tarfile.py", "subprocess.py",
    "textwrap.py", "bisect.py", "heapq.py", "shlex.py", "csv.py", "json/encoder.py",
)
#: The model a sample is read with by default, by file type, where a model of that name is served.
SAMPLE_MODEL = {".py": "code", ".txt": "books"}
TOKENS_PER_PAGE = 2000
MEMORY_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_MEMORY_SIZE = 65536  # what the committed models were fine-tuned with

PAGE_JS = """
element.addEventListener('click', (event) => {
  const token = event.target.closest('[data-token]');
  if (!token) return;
  element.querySelectorAll('.tok.selected').forEach((t) => t.classList.remove('selected'));
  token.classList.add('selected');
  trigger('click', {token_index: parseInt(token.dataset.token, 10)});
});
"""
PAGE_CSS = """
.doc { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; line-height: 1.6; }
.tok { cursor: pointer; border-radius: 2px; }
.tok:hover { outline: 1px solid #555; }
.tok.selected { outline: 2px solid #000; }
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


def gain_colour(gain: float, scale: float = 2.0) -> str:
    """Green where memory lowered the loss, red where it raised it; ``scale`` nats = full colour."""
    if not np.isfinite(gain):
        return "transparent"
    alpha = min(abs(gain) / scale, 1.0) * 0.85
    return f"rgba(34,160,70,{alpha:.2f})" if gain > 0 else f"rgba(220,50,40,{alpha:.2f})"


def escape(text: str) -> str:
    """HTML-escape, and neutralise the template syntax gr.HTML interprets (${...}, {{...}})."""
    return html.escape(text).replace("$", "&#36;").replace("{", "&#123;").replace("}", "&#125;")


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


class DemoApp:
    def __init__(self, models: Dict[str, DemoModel], samples: Dict[str, str], max_tokens: int = MAX_DOCUMENT_TOKENS):
        if not models:
            raise MemtrmUserError("the demo needs at least one model")
        self.models = models
        self.samples = samples
        self.max_tokens = max_tokens
        # One lock for all models: forward passes take turns (2 CPU cores serve every session).
        self.model_lock = threading.Lock()

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

    # ----------------------------------------------------------- rendering
    def render_page(self, report: DocumentReport, token_texts, page: int) -> str:
        start = page * TOKENS_PER_PAGE
        end = min(start + TOKENS_PER_PAGE, report.num_tokens)
        gain = report.memory_gain
        spans = []
        for index, text in zip(range(start, end), token_texts[start:end]):
            title = f"token {index}: memory gain {gain[index]:+.2f} nats" if np.isfinite(gain[index]) else f"token {index}"
            spans.append(
                f'<span class="tok" data-token="{index}" title="{title}" '
                f'style="background:{gain_colour(gain[index])}">{escape(text)}</span>'
            )
        return f'<div class="doc">{"".join(spans)}</div>'

    def summary_plots(self, report: DocumentReport):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with_memory, without_memory = report.segment_losses()
        loss_figure, axis = plt.subplots(figsize=(6, 3))
        axis.plot(with_memory, label="with memory", marker=".")
        axis.plot(without_memory, label="without memory", marker=".")
        axis.set_xlabel("segment")
        axis.set_ylabel("loss (nats/token)")
        axis.set_title("Loss per segment")
        axis.legend()
        loss_figure.tight_layout()

        distances, weights = report.retrieval_distances()
        distance_figure, axis = plt.subplots(figsize=(6, 3))
        if distances.size:
            bins = np.unique(np.geomspace(1, max(distances.max(), 2), 40).astype(int))
            axis.hist(distances, bins=bins, weights=weights)
            axis.set_xscale("log")
        axis.set_xlabel("distance (tokens back)")
        axis.set_ylabel("attention weight")
        axis.set_title("Retrieval distances")
        distance_figure.tight_layout()
        plt.close("all")
        return loss_figure, distance_figure

    # -------------------------------------------------------------- events
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

    def run(self, model_name, source, sample, pasted, upload, memory_size, knn_k, session, request: gr.Request,
            progress=gr.Progress()):
        """Read the chosen document; returns status, page view, page control, plots, session."""
        session = dict(session or {})
        session.setdefault("stream_id", f"session-{getattr(request, 'session_hash', None) or uuid.uuid4().hex}")
        try:
            if model_name not in self.models:
                raise MemtrmUserError(f"choose a model: {', '.join(self.models)}")
            demo_model = self.models[model_name]
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
            note = ""
            if source == "Sample" and len(token_ids) > self.max_tokens:  # our own sample: read its beginning
                note = f" (the sample's first {self.max_tokens:,} tokens: the demo's limit)"
                token_ids = token_ids[: self.max_tokens]
            progress(0, desc="reading the document")
            report = build_report(
                demo_model.model, token_ids,
                segment_length=demo_model.segment_length,
                memory_size=int(memory_size), knn_k=int(knn_k),
                stream_id=session["stream_id"], lock=self.model_lock, max_tokens=self.max_tokens,
                progress=lambda done, total, what: progress((done, total), desc=what, unit="segments"),
            )
        except MemtrmUserError as error:
            return (f"**Error:** {error.message}", "", gr.update(), None, None, session)
        session["report"] = report
        session["model"] = model_name
        session["token_texts"] = demo_model.token_texts(report.token_ids)
        pages = (report.num_tokens - 1) // TOKENS_PER_PAGE + 1
        gain = report.memory_gain[1:]
        status = (
            f"Read **{report.num_tokens:,} tokens**{note} with the `{model_name}` model in "
            f"{len(report.segment_starts)} segments of {demo_model.segment_length} "
            f"(memory {report.memory_size:,} tokens, k={report.knn_k}, "
            f"layer {report.layer}). Mean loss {np.nanmean(report.loss_with_memory):.3f} nats with memory, "
            f"{np.nanmean(report.loss_without_memory):.3f} without; memory helped "
            f"{np.mean(gain > 0):.0%} of tokens. Click a token to see its retrievals."
        )
        if len(report.segment_starts) < 2:  # nothing was in memory for any token: say why, show no empty plots
            status += (
                f"\n\n**The memory starts after the first segment** ({demo_model.segment_length} tokens): this "
                f"text has {report.num_tokens:,}, so nothing was retrieved. Give it at least "
                f"{demo_model.segment_length + 1 - report.num_tokens:,} more tokens (a few hundred words; "
                "thousands to see distant retrievals)."
            )
            loss_plot = distance_plot = gr.update(value=None, visible=False)
        else:
            loss_plot, distance_plot = (gr.update(value=plot, visible=True) for plot in self.summary_plots(report))
        return (
            status, self.render_page(report, session["token_texts"], 0),
            gr.update(maximum=pages, value=1, label=f"Page (of {pages}, {TOKENS_PER_PAGE:,} tokens each)"),
            loss_plot, distance_plot, session,
        )

    def show_page(self, page, session):
        report = (session or {}).get("report")
        if report is None or page is None:
            return gr.update()
        last_page = (report.num_tokens - 1) // TOKENS_PER_PAGE
        return self.render_page(report, session["token_texts"], min(max(int(page) - 1, 0), last_page))

    def select_token(self, session, event: gr.EventData):
        """A click on token ``event.token_index``: its retrieval table and gates."""
        report = (session or {}).get("report")
        data = event._data if isinstance(event._data, dict) else {}
        index = data.get("token_index")  # sent by PAGE_JS
        if report is None or index is None:
            return "Read a document, then click a token.", None, None
        try:
            details = token_details(report, int(index), session["token_texts"])
        except MemtrmUserError as error:
            return f"**Error:** {error.message}", None, None
        header = (
            f"Token {details.index} `{details.token!r}`: loss {details.loss_with_memory:.3f} nats with memory, "
            f"{details.loss_without_memory:.3f} without. "
            + (f"{len(details.entries)} memory entries (layer {report.layer})." if details.entries
               else "Nothing retrieved (the first segment has an empty memory).")
        )
        if details.entries and self.models[session["model"]].model.memory_bank.shift_keys:
            header += (" This model keys each entry by the token before it (`--memory-shift-keys`): a retrieved "
                       "token is what the memory proposes for this one.")
        visible = lambda text: text.replace("\n", "\u21b5")  # a line break, shown in a table cell
        rows = [
            [rank + 1, visible(entry.left_context), visible(entry.token), visible(entry.right_context), entry.distance,
             round(entry.score, 3), round(entry.weight, 4), ",".join(map(str, entry.heads))]
            for rank, entry in enumerate(details.entries)
        ]
        gates = [[head, round(g, 3), round(1 - g, 3)] for head, g in enumerate(details.gates)]
        return header, rows, gates

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
            session = gr.State({})
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
                    knn_k = gr.Slider(1, 64, value=32, step=1, label="k (entries retrieved per head)",
                                      elem_id="knn-k")
                    run_button = gr.Button("Read the document", variant="primary", elem_id="run-button")
            status = gr.Markdown(elem_id="status")
            page = gr.Number(1, minimum=1, precision=0, label=f"Page ({TOKENS_PER_PAGE:,} tokens each)",
                             elem_id="page")
            document_view = gr.HTML("", js_on_load=PAGE_JS, css_template=PAGE_CSS, elem_id="document-view",
                                    max_height=520)
            token_header = gr.Markdown(elem_id="token-header")
            retrieval_table = gr.Dataframe(
                headers=["rank", "before", "retrieved token", "after", "distance (tokens)", "similarity",
                         "attention weight", "heads"],
                datatype=["number", "str", "str", "str", "number", "number", "number", "str"],
                label="Top-k memory entries (merged over heads)", elem_id="retrieval-table",
                interactive=False, wrap=True,
            )
            gate_table = gr.Dataframe(headers=["head", "to memory (gate)", "to local context"],
                                      label="Per-head gates", elem_id="gate-table", interactive=False)
            with gr.Row():
                loss_plot = gr.Plot(label="Loss per segment", elem_id="loss-plot")
                distance_plot = gr.Plot(label="Retrieval distances", elem_id="distance-plot")

            run_button.click(
                self.run,
                inputs=[model_choice, source, sample, pasted, upload, memory_size, knn_k, session],
                outputs=[status, document_view, page, loss_plot, distance_plot, session],
                concurrency_limit=4,
            )
            # the document is what the user touched last, read with the model that suits it
            sample.input(self.on_sample, inputs=[sample, model_choice], outputs=[source, model_choice])
            pasted.change(self.on_paste, inputs=[pasted, model_choice], outputs=[source, model_choice])
            upload.upload(self.on_upload, inputs=[upload, model_choice], outputs=[source, model_choice])
            page.change(self.show_page, inputs=[page, session], outputs=document_view)
            document_view.click(self.select_token, inputs=[session],
                                outputs=[token_header, retrieval_table, gate_table])
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
    args = parser.parse_args(argv)
    # force: an imported library may already have configured the root logger at DEBUG
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        force=True)
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
    blocks = DemoApp(models, samples, args.max_document_tokens).build()
    print(f"Memorizing Transformer demo: http://{args.host}:{args.port}", flush=True)
    blocks.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                     show_error=False, theme=gr.themes.Soft(),
                                                     max_file_size=max_upload_bytes(args.max_document_tokens))


if __name__ == "__main__":
    main()
