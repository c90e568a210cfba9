"""The demo in a real browser: headless Debian Chromium driven by playwright.

Two browser sessions read two different documents at the same time; in each,
a click on a token must list memory entries (contexts and distances) taken
from that session's own document only. Needs ``/usr/bin/chromium``
(``apt-get install chromium``, done by ``.ci/run``) and the committed demo model.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from demo.checkpoint import DEMO_CHECKPOINTS

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


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    samples = tmp_path_factory.mktemp("samples")
    for word in WORDS:
        (samples / f"{word}.py").write_text(code_document(word), encoding="utf-8")
    (samples / "story.txt").write_text(book_document(), encoding="utf-8")
    models = [f"--checkpoint={name}={path}" for name, path in DEMO_CHECKPOINTS.items()]
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "demo" / "app.py"), *models, "--samples",
         str(samples), "--port", str(port), "--segment-length", "128", "--cpu"],
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
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


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
                    rank, before, token, after, distance = cells[:5]
                    assert int(distance) > 0, cells
                    context = (before + token + after).replace("\u21b5", "\n")  # the table shows line breaks as ↵
                    assert context.strip(), cells
                    other = next(w for w in WORDS if w != word)
                    assert other not in context, f"session {word} retrieved the other session's text: {cells}"
                    # the context is text of this session's own document
                    squeezed = "".join(document_text.split())
                    assert "".join(context.split()) in squeezed, cells
                expect(page.locator("#gate-table")).to_contain_text("to memory")
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
            assert int(cells[4]) > 0 and "Breck".startswith(cells[2].strip()), cells
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
