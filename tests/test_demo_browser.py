"""The demo in a real browser: headless Debian Chromium driven by playwright.

Two browser sessions read two different documents at the same time; in each,
a click on a token must list memory entries (contexts and distances) taken
from that session's own document only. A click on a retrieval row shows its
source highlighted; search, segment bars and token links open their pages;
Cancel and a re-read clear the old read; the memory of closed sessions is
given back; the console holds what a user needs. Needs ``/usr/bin/chromium``
(``apt-get install chromium``, done by ``.ci/run``) and the committed demo models.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from demo.checkpoint import DEMO_CHECKPOINTS, DemoModel
from demo.report import DocumentReport
from demo.report_cache import ReportCache

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
WORDS = ("apple", "zebra")  # each document's names use only its own word


def code_document(word: str, functions: int = 30) -> str:
    """Functions defined at the top and called far below: the memory's case."""
    lines = []
    for i in range(functions):
        lines += [f"def {word}_helper_{i}(value):", f"    return value * {i} + len('{word}')", ""]
    lines += [f"{word}_result_{i} = {word}_helper_{i}({i})" for i in range(functions)]
    return "\n".join(lines) + "\n"


def book_document(chapters: int = 12) -> str:
    """Prose in which two names come back chapter after chapter."""
    paragraph = ("Mr. Balfour walked down the long road to Essendean with his old friend Alan Breck, and "
                 "they spoke of the house of Shaws, of the sea and of the ship that had carried them north. ")
    return "\n\n".join(f"CHAPTER {i + 1}\n\n" + paragraph * 3 for i in range(chapters)) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SEGMENT = 128
BIG_TOKENS = 250_000  # the cached report of the "big" sample: ~100 MB per session that opens it


def big_document() -> str:
    """Prose of many different words: about BIG_TOKENS tokens for the books model."""
    words = np.random.default_rng(0).integers(0, 26**3, size=BIG_TOKENS // 2)
    letters = "abcdefghijklmnopqrstuvwxyz"
    names = [letters[w // 676] + letters[w // 26 % 26] + letters[w % 26] for w in words]
    return "\n".join(" ".join(names[i : i + 12]) + "." for i in range(0, len(names), 12)) + "\n"


def cache_big_report(cache_dir: Path, text: str) -> int:
    """Put a report of ``text`` in the app's cache as the app would key it (books model, default
    settings), so that opening the sample costs memory but no reading; returns its tokens."""
    import sentencepiece
    from fairseq.data import Dictionary

    checkpoint = DEMO_CHECKPOINTS["books"]
    assets = Path(checkpoint).parent
    tokenizer = DemoModel(None, Dictionary.load(str(assets / "dict.txt")),
                          sentencepiece.SentencePieceProcessor(model_file=str(assets / "spm.model")), SEGMENT, checkpoint)
    token_ids = np.asarray(tokenizer.encode(text)[:300_000])
    n, k, rng = len(token_ids), 32, np.random.default_rng(1)
    positions = (np.arange(n)[:, None] - 1 - rng.integers(1, 5000, size=(n, k))).astype(np.int32)
    positions[positions < 0] = -1
    report = DocumentReport(
        token_ids=token_ids, loss_with_memory=rng.random(n, dtype=np.float32) * 5,
        loss_without_memory=rng.random(n, dtype=np.float32) * 5, entry_positions=positions,
        entry_scores=rng.random((n, k)).astype(np.float16), entry_weights=rng.random((n, k)).astype(np.float16) / k,
        entry_heads=np.ones((n, k), np.int32), memory_share=rng.random(n, dtype=np.float32),
        predictions_with_memory=rng.integers(4, 8000, (n, 5)).astype(np.int32),
        prediction_probs_with_memory=rng.random((n, 5)).astype(np.float16),
        predictions_without_memory=rng.integers(4, 8000, (n, 5)).astype(np.int32),
        prediction_probs_without_memory=rng.random((n, 5)).astype(np.float16),
        head_gates=np.full(4, 0.5, np.float32), segment_starts=np.arange(0, n - 1, SEGMENT), layer=3,
        memory_size=65536, knn_k=k, shift_keys=True)
    cache = ReportCache(str(cache_dir))
    cache.put(cache.key(checkpoint, token_ids, max_tokens=300_000, segment_length=SEGMENT, memory_size=65536,
                        knn_k=k), report)
    return n


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with both models, serving the test's samples; (url, process, log file, big sample's tokens)."""
    samples = tmp_path_factory.mktemp("samples")
    for word in WORDS:
        (samples / f"{word}.py").write_text(code_document(word), encoding="utf-8")
    (samples / "story.txt").write_text(book_document(), encoding="utf-8")
    (samples / "big.txt").write_text(big_document(), encoding="utf-8")
    cache_dir = tmp_path_factory.mktemp("cache")
    big_tokens = cache_big_report(cache_dir, (samples / "big.txt").read_text(encoding="utf-8"))
    models = [f"--checkpoint={name}={path}" for name, path in DEMO_CHECKPOINTS.items()]
    port = free_port()
    log_path = tmp_path_factory.mktemp("log") / "app.log"
    log = open(log_path, "w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "demo" / "app.py"), *models, "--samples", str(samples), "--port", str(port),
         "--segment-length", str(SEGMENT), "--cpu", "--cache-dir", str(cache_dir)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                log.seek(0)
                process.kill()
                pytest.fail(f"the demo did not start:\n{log.read()[-3000:]}")
            time.sleep(1)
    yield url, process, log_path, big_tokens
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def app_url(app):
    return app[0]


def read_sample(page, url: str, name: str) -> None:
    page.goto(url)
    choice = page.locator("#sample-choice input")
    choice.click()
    page.get_by_role("option", name=f"samples: {name}").click()
    page.locator("#memory-size input").first.wait_for()
    page.locator("#run-button").click()


def test_two_sessions_see_their_own_retrievals(app_url):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pages = {word: browser.new_context(viewport={"width": 1280, "height": 1600}).new_page() for word in WORDS}
            for word, page in pages.items():  # both sessions read at the same time
                read_sample(page, app_url, f"{word}.py")
            for word, page in pages.items():
                expect(page.locator("#status")).to_contain_text("with the code model", timeout=180_000)
                document_text = page.locator("#document-view").inner_text()
                assert f"{word}_helper_0" in document_text
                # a token of the calls at the bottom: its query reads memory of the definitions above
                last = int(page.locator("#document-view .tok").last.get_attribute("data-token"))
                page.locator(f'#document-view .tok[data-token="{last - 5}"]').click()
                table = page.locator("#retrieval-table")
                expect(table).to_contain_text("distance", timeout=30_000)
                expect(page.locator("#token-header")).to_contain_text(f"Token {last - 5}", timeout=30_000)
                # Gradio's virtual table: data rows are [role=row] holding [role=gridcell]s
                rows = table.locator("[role=row]:has([role=gridcell])")
                expect(rows.first).to_be_visible(timeout=30_000)
                assert rows.count() >= 1
                for row in range(min(rows.count(), 5)):
                    cells = [c.strip() for c in rows.nth(row).locator("[role=gridcell]").all_inner_texts()]
                    holds, rank, before, token, after, distance = cells[:6]
                    assert int(distance) > 0, cells
                    context = (before + token + after).replace("\u21b5", "\n")  # the table shows line breaks as ↵
                    assert context.strip(), cells
                    other = next(w for w in WORDS if w != word)
                    assert other not in context, f"session {word} retrieved the other session's text: {cells}"
                    # the context is text of this session's own document
                    squeezed = "".join(document_text.split())
                    assert "".join(context.split()) in squeezed, cells
                expect(page.locator("#gates")).to_contain_text("Learned per-head gates")  # once, not per token
                expect(page.locator("#token-header")).to_contain_text("came from memory")
                page.screenshot(path=str(ARTIFACTS / f"demo_{word}.png"), full_page=True)
            # empty input: a message in the page, not a traceback
            page = pages[WORDS[0]]
            page.get_by_role("radio", name="Paste").check()
            page.locator("#pasted-text textarea").fill("   ")
            page.locator("#run-button").click()
            expect(page.locator("#status")).to_contain_text("the document is empty", timeout=30_000)
        finally:
            browser.close()


def test_a_book_sample_is_read_with_the_books_model(app_url):
    """A .txt sample switches the model to `books`; its names, mentioned in every
    chapter, are retrieved from earlier chapters."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1600}).new_page()
            read_sample(page, app_url, "story.txt")
            expect(page.get_by_role("radio", name="books")).to_be_checked()
            expect(page.locator("#status")).to_contain_text("with the books model", timeout=180_000)
            tokens = page.locator("#document-view .tok")
            texts = tokens.all_inner_texts()
            # the last "Breck": its pieces were read in every chapter above
            index = max(i for i, text in enumerate(texts) if text.strip() and "Breck".startswith(text.strip())
                        and texts[i - 1].strip() and "Alan".endswith(texts[i - 1].strip()))
            tokens.nth(index).click()
            rows = page.locator("#retrieval-table [role=row]:has([role=gridcell])")
            expect(rows.first).to_be_visible(timeout=30_000)
            cells = [c.strip() for c in rows.first.locator("[role=gridcell]").all_inner_texts()]
            assert int(cells[5]) > 0 and "Breck".startswith(cells[3].strip()), cells
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_book.png"), full_page=True)
        finally:
            browser.close()


def test_pasted_text_is_read_even_with_a_sample_chosen_and_a_short_one_says_why(app_url):
    """Typing into the paste box makes it the document (the sample chosen before is not
    read) and picks the model that suits it; a text of one segment explains itself."""
    prose = book_document(chapters=2).replace("Balfour", "Quillfeather")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1600}).new_page()
            page.goto(app_url)
            choice = page.locator("#sample-choice input")
            choice.click()
            page.get_by_role("option", name=f"samples: {WORDS[0]}.py").click()
            expect(page.get_by_role("radio", name="code")).to_be_checked()
            page.locator("#pasted-text textarea").fill(prose)
            expect(page.get_by_role("radio", name="Paste")).to_be_checked(timeout=30_000)
            expect(page.get_by_role("radio", name="books")).to_be_checked(timeout=30_000)
            page.locator("#run-button").click()
            expect(page.locator("#status")).to_contain_text("with the books model", timeout=180_000)
            view = page.locator("#document-view").inner_text()
            assert "Quillfeather" in "".join(view.split()) and f"{WORDS[0]}_helper" not in view
            page.locator("#pasted-text textarea").fill("A short note.")
            page.locator("#run-button").click()
            expect(page.locator("#status")).to_contain_text("The memory starts after the first segment",
                                                            timeout=60_000)
            expect(page.locator("#loss-plot")).to_be_hidden()
        finally:
            browser.close()


def new_page(browser):
    return browser.new_context(viewport={"width": 1280, "height": 1600}).new_page()


def test_a_retrieval_row_search_segment_bars_and_token_links_open_their_place(app_url):
    """A click on a retrieval row shows the page with the entry's token highlighted; search walks
    the occurrences; a bar of the gain chart opens its segment; a token link its best occurrence."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = new_page(browser)
            read_sample(page, app_url, "story.txt")
            expect(page.locator("#status")).to_contain_text("with the books model", timeout=180_000)
            expect(page.locator("#gates")).to_contain_text("Learned per-head gates")
            last = int(page.locator("#document-view .tok").last.get_attribute("data-token"))
            page.locator(f'#document-view .tok[data-token="{last - 10}"]').click()
            expect(page.locator("#token-header")).to_contain_text("with memory", timeout=30_000)
            expect(page.locator("#token-header")).to_contain_text("came from memory")
            predictions = page.locator("#prediction-table [role=row]:has([role=gridcell])")
            expect(predictions).to_have_count(5, timeout=30_000)
            rows = page.locator("#retrieval-table [role=row]:has([role=gridcell])")
            expect(rows.first).to_be_visible(timeout=30_000)
            for row in (0, 2):
                cells = [c.strip() for c in rows.nth(row).locator("[role=gridcell]").all_inner_texts()]
                rows.nth(row).locator("[role=gridcell]").nth(3).click()
                expect(page.locator("#location")).to_contain_text(f"Entry {row + 1}:", timeout=30_000)
                source = page.locator("#document-view .tok.source")
                expect(source).to_have_count(1)
                position = int(source.get_attribute("data-token"))
                assert (last - 10) - 1 - position == int(cells[5]), cells  # the row's distance
                assert source.inner_text().strip() == cells[3].replace("\u21b5", "").strip(), cells
                assert source.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"
                page.screenshot(path=str(ARTIFACTS / f"demo_source_{row}.png"), full_page=True)
            page.locator("#find-text textarea, #find-text input").first.fill("Breck")
            page.locator("#find-next").click()
            expect(page.locator("#location")).to_contain_text("'Breck': occurrence 1 of", timeout=30_000)
            total = int(page.locator("#location").inner_text().split(" of ")[1].split(" ")[0])
            assert total == book_document().count("Breck")
            found = page.locator("#document-view .tok.source")
            assert "Breck".startswith(found.inner_text().strip())
            page.locator("#find-previous").click()
            expect(page.locator("#location")).to_contain_text(f"occurrence {total} of {total}", timeout=30_000)
            page.locator("#segment-gains rect.seg").nth(3).click()
            expect(page.locator("#location")).to_contain_text(f"Segment 3: tokens from {3 * SEGMENT}", timeout=30_000)
            expect(page.locator("#document-view .tok.target")).to_have_attribute("data-token", str(3 * SEGMENT))
            link = page.locator("#token-links a").first
            link.click()
            expect(page.locator("#location")).to_contain_text("its best occurrence", timeout=30_000)
            found = int(page.locator("#document-view .tok.source").get_attribute("data-token"))
            expect(page.locator("#token-header")).to_contain_text(f"Token {found} ")
        finally:
            browser.close()


def test_cancel_and_a_reread_clear_the_old_read(app_url):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = new_page(browser)
            read_sample(page, app_url, f"{WORDS[0]}.py")
            expect(page.locator("#status")).to_contain_text("with the code model", timeout=180_000)
            expect(page.locator("#document-view .tok")).not_to_have_count(0)
            # a new read (pasted text: never cached, so it takes a while) clears the old one at once
            page.locator("#pasted-text textarea").fill(code_document("cancelled", functions=60))
            expect(page.get_by_role("radio", name="Paste")).to_be_checked(timeout=30_000)
            page.locator("#run-button").click()
            expect(page.locator("#document-view .tok")).to_have_count(0, timeout=5_000)
            expect(page.locator("#status")).not_to_contain_text("with the code model", timeout=5_000)
            # one progress bar, on the status, counting the document's segments (each read twice)
            progress = page.get_by_text(re.compile(r"\d+/\d+ segments"))
            expect(progress).to_have_count(1, timeout=30_000)
            done, total = map(int, re.search(r"(\d+)/(\d+) segments", progress.inner_text()).groups())
            assert total == 21 and 0 < done < total  # 2,600-odd tokens in segments of 128
            page.locator("#cancel-button").click()
            expect(page.locator("#status")).to_contain_text(re.compile(r"Cancelled|Read \*?\*?[\d,]+ tokens"),
                                                            timeout=30_000)
            page.wait_for_timeout(5_000)
            if "Cancelled" in page.locator("#status").inner_text():  # the stopped read shows nothing
                expect(page.locator("#document-view .tok")).to_have_count(0)
            else:  # on a loaded machine the read can end before the click: then nothing claims a cancel
                expect(page.locator("#status")).to_contain_text("with the code model")
                expect(page.locator("#document-view .tok")).not_to_have_count(0)
        finally:
            browser.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_the_memory_of_closed_sessions_is_given_back(app):
    """Three sessions open a long sample (its report cached: memory, no reading); once their tabs
    close, the app's RSS comes back near where it started (Gradio alone keeps a closed tab's
    state an hour). The first also opens a far page through the gain chart."""
    url, process, _, big_tokens = app
    time.sleep(3)  # sessions of earlier tests: closed
    start = rss_mb(process.pid)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            pages = [new_page(browser) for _ in range(3)]
            for page in pages:
                read_sample(page, url, "big.txt")
                expect(page.locator("#status")).to_contain_text(f"Read {big_tokens:,} tokens", timeout=120_000)
            segment = 1000
            pages[0].locator("#segment-gains rect.seg").nth(segment).click()
            expect(pages[0].locator("#location")).to_contain_text(f"Segment {segment}:", timeout=30_000)
            expect(pages[0].locator("#page input")).to_have_value(str(segment * SEGMENT // 2000 + 1))
            expect(pages[0].locator("#document-view .tok.target")).to_have_attribute("data-token",
                                                                                     str(segment * SEGMENT))
            peak = rss_mb(process.pid)
        finally:
            browser.close()
    assert peak - start > 200, (start, peak)  # the sessions' reports are big enough to measure
    deadline = time.time() + 60
    while rss_mb(process.pid) > start + 0.25 * (peak - start) and time.time() < deadline:
        time.sleep(2)
    assert rss_mb(process.pid) <= start + 0.25 * (peak - start), (start, peak, rss_mb(process.pid))


def test_the_console_shows_the_address_and_no_library_noise(app):
    log = app[2].read_text()
    assert f"Memorizing Transformer demo: {app[0].rstrip('/')}" in log
    for noise in ("swigfaiss", "tensorboardX", "Traceback"):
        assert noise not in log, log[-3000:]
