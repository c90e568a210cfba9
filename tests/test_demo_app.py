"""The demo app's navigation, views, report cache and session life, on the
committed code model reading a short document (about 10 segments of 64)."""

import re
import types

import numpy as np
import pytest

from demo.app import DemoApp, ViewClick
from demo.checkpoint import DEMO_CHECKPOINT, load_demo_model
from demo.report_cache import ReportCache
from demo.views import TOKENS_PER_PAGE, distance_histogram, render_page, segment_gain_chart

DOCUMENT = "".join(f"def helper_{i}(value):\n    return value * {i} + 1\n" for i in range(16)) + "\n".join(
    f"result_{i} = helper_{i}({i})" for i in range(16)) + "\n"
no_progress = lambda *args, **kwargs: None  # noqa: E731


def click(**data):
    return ViewClick(None, data)


@pytest.fixture(scope="module")
def code_model():
    return load_demo_model(DEMO_CHECKPOINT, cpu=True, segment_length=64)


@pytest.fixture(scope="module")
def read(code_model, tmp_path_factory):
    """An app with a report cache, its sample and one session that has read it."""
    samples = tmp_path_factory.mktemp("samples")
    (samples / "helpers.py").write_text(DOCUMENT, encoding="utf-8")
    cache = ReportCache(str(tmp_path_factory.mktemp("cache")))
    app = DemoApp({"code": code_model}, {"samples: helpers.py": str(samples / "helpers.py")}, max_tokens=4000,
                  cache=cache)
    outputs = app.run("code", "Sample", "samples: helpers.py", None, None, 1024, 8, {}, None, progress=no_progress)
    return app, outputs


def test_a_retrieval_row_opens_its_source_on_its_page_highlighted(read):
    app, outputs = read
    session = outputs[-1]
    report = session["report"]
    index = report.num_tokens - 3
    header, predictions, rows = app.on_view_click(session, click(token_index=index))[:3]
    assert header.startswith(f"Token {index} ") and "with memory" in header and len(predictions) == 5
    assert rows and all(row[0] in ("", "✓") for row in rows)
    for row in (0, len(rows) - 1):
        position = session["entries"][row]
        assert position == report.entry_positions[index][row] and rows[row][5] == index - 1 - position
        page, view, location, session = app.jump_to_source(session, types.SimpleNamespace(index=[row, 3]))
        assert page["value"] == position // TOKENS_PER_PAGE + 1
        assert f'class="tok source target" data-token="{position}"' in view
        assert f"token {position:,}" in location
        # the page control's own re-render keeps the highlight
        assert app.show_page(page["value"], session) == view


def test_find_walks_the_occurrences_both_ways(read):
    app, outputs = read
    session = outputs[-1]
    texts = session["token_texts"]
    first = app.find("helper_1", 1, session)
    location = first[5]
    assert "'helper_1': occurrence 1 of" in location
    count = int(location.split(" of ")[1].split(" ")[0])
    assert count == "".join(texts).count("helper_1")  # helper_1, helper_10..15: definitions and calls
    index = session["find"]["occurrences"][0]
    assert 0 <= "".join(texts[index:]).find("helper_1") < len(texts[index])  # the match starts in that token
    assert f'class="tok selected source target" data-token="{index}"' in first[4]
    assert first[0].startswith(f"Token {index} ")
    assert f"occurrence {count} of {count}" in app.find("helper_1", -1, session)[5]  # wraps backwards
    assert "occurrence 1 of" in app.find("helper_1", 1, session)[5]
    assert "does not occur" in app.find("no such text", 1, session)[5]


def test_segments_and_token_links_open_their_pages(read):
    app, outputs = read
    status, gates, view, page, chart, histogram, links, session = outputs
    report = session["report"]
    assert chart["value"].count('class="seg"') == len(report.segment_starts) > 5
    *_, page, view, location, session = app.on_view_click(session, click(segment=5))
    assert f'class="tok target" data-token="{report.segment_starts[5]}"' in view and "Segment 5" in location
    best_type = report.token_types_helped_most(1)[0].token
    assert f'data-type="{best_type}"' in links
    header, _, _, page, view, location, session = app.on_view_click(session, click(token_type=best_type))
    occurrences = np.flatnonzero(report.token_ids == best_type)
    best = occurrences[np.nanargmax(report.memory_gain[occurrences])]
    assert header.startswith(f"Token {best} ") and "its best occurrence" in location
    assert "Learned per-head gates" in gates and re.findall(r"head \d+ (\d\.\d\d)", gates) == [
        f"{g:.2f}" for g in report.head_gates]


def test_the_distance_histogram_is_normalised_per_log_bin_width(read):
    report = read[1][-1]["report"]
    values, edges, _ = distance_histogram(report).axes[0].patches[0].get_data()
    # the area over log10(distance) is the whole attention weight: bins of any width compare
    assert np.sum(values * np.diff(np.log10(edges))) == pytest.approx(1.0, rel=1e-3)
    distances, _ = report.retrieval_distances()
    assert edges[0] <= distances.min() and distances.max() < edges[-1]


def test_a_sample_read_again_comes_from_the_cache_and_a_reread_clears(read):
    app, outputs = read
    calls = []
    again = app.run("code", "Sample", "samples: helpers.py", None, None, 1024, 8, {}, None,
                    progress=lambda *args, **kwargs: calls.append(args))
    assert calls == []  # nothing was read: the report came from disk
    first, second = outputs[-1]["report"], again[-1]["report"]
    np.testing.assert_array_equal(first.entry_positions, second.entry_positions)
    np.testing.assert_array_equal(first.predictions_with_memory, second.predictions_with_memory)
    assert second.shift_keys == first.shift_keys and second.layer == first.layer
    assert again[0] == outputs[0] and again[2] == outputs[2]
    # other settings are another read; pasted text is never cached
    app.run("code", "Sample", "samples: helpers.py", None, None, 1024, 4, {}, None,
            progress=lambda *args, **kwargs: calls.append(args))
    assert len(calls) == len(first.segment_starts)
    files = sorted(app.cache.folder.iterdir())
    app.run("code", "Paste", None, DOCUMENT, None, 1024, 8, {}, None, progress=no_progress)
    assert sorted(app.cache.folder.iterdir()) == files and len(files) == 2
    # a re-read starts by forgetting the old document: a click on its page finds nothing
    cleared = app.start_read(again[-1])
    session = cleared[-1]
    assert cleared[0] == "Reading…" and "report" not in session and session["stream_id"]
    assert app.on_view_click(session, click(token_index=5))[0] == "Read a document, then click a token."


def test_cancel_stops_the_read_of_its_session(read):
    app, _ = read
    session = {"stream_id": "session-cancel"}

    def cancel_after_two(segments, **kwargs):  # gr.Progress((done, total), ...)
        if segments[0] == 2:
            app.cancel(session)

    outputs = app.run("code", "Paste", None, DOCUMENT, None, 1024, 8, session, None, progress=cancel_after_two)
    assert all(output == {"__type__": "update"} for output in outputs)  # nothing shown: Cancel said so
    assert "session-cancel" not in app.reads


def test_a_closed_sessions_state_is_freed(read):
    app, outputs = read
    session = dict(outputs[-1])
    DemoApp.free_session(session)
    assert session == {}
    deleted = []
    app.blocks = types.SimpleNamespace(state_holder=types.SimpleNamespace(delete_state=deleted.append))
    app.end_session(types.SimpleNamespace(session_hash="abc"))
    assert deleted == ["abc"]


def test_render_page_marks_selected_and_source_tokens(read):
    report = read[1][-1]["report"]
    texts = read[1][-1]["token_texts"]
    view = render_page(report, texts, 0, selected=3, sources=[7], target=7)
    assert 'class="tok selected" data-token="3"' in view and 'class="tok source target" data-token="7"' in view
    assert segment_gain_chart(report).count("<rect") == len(report.segment_starts)
