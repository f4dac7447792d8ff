"""Progress reports: the ``progress=`` callback, the bar, and ``watch --bar``."""

from __future__ import annotations

import importlib.util
import io
import logging
from typing import Any

import pytest

from celery_ordered import Progress, ProgressBar, progress_bar
from tests.apps.tasks import echo, fail_value_error
from tests.support.cli import run_ordered
from tests.support.tools import require_tool


def test_the_callback_sees_every_outcome_in_order_with_the_total(
    worker: Any, make_stream: Any
) -> None:
    seen: list[Progress] = []
    stream = make_stream(progress=seen.append)
    stream.put(echo, "a")
    stream.put("marker")
    stream.put(fail_value_error, "boom")
    stream.put(echo, "b")
    stream.close()

    assert stream.get(timeout=30) == "a"
    assert stream.get(timeout=30) == "marker"
    with pytest.raises(ValueError, match="boom"):
        stream.get(timeout=30)
    assert stream.get(timeout=30) == "b"

    assert [p.delivered for p in seen] == [1, 2, 3, 4]  # the failure counts too
    assert seen[-1].total == 4
    assert seen[-1].fraction == 1.0
    assert all(p.rate >= 0 and p.elapsed >= 0 for p in seen)


def test_nothing_is_reported_when_nothing_is_handed_out(worker: Any, make_stream: Any) -> None:
    seen: list[Progress] = []
    stream = make_stream(progress=seen.append)
    stream.close()
    assert list(stream) == []
    assert seen == []


def test_a_failing_callback_is_logged_and_loses_nothing(
    worker: Any, make_stream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(progress: Progress) -> None:
        raise RuntimeError("bar exploded")

    stream = make_stream(progress=broken)
    for i in range(3):
        stream.put(echo, i)
    stream.close()
    with caplog.at_level(logging.ERROR, logger="celery_ordered.stream"):
        assert list(stream) == [0, 1, 2]
    failures = [r for r in caplog.records if "progress callback" in r.getMessage()]
    assert len(failures) == 3
    assert "bar exploded" in (failures[0].exc_text or "")


def test_a_callback_that_is_not_callable_is_refused_at_once(make_stream: Any) -> None:
    with pytest.raises(TypeError, match=r"progress must be a callable.*progress_bar\(\)"):
        make_stream(progress=10)


def test_the_text_bar_prints_each_tenth_and_the_end_off_a_terminal() -> None:
    out = io.StringIO()
    with progress_bar(total=20, desc="pages", file=out) as bar:
        for done in range(1, 21):
            bar.update(done)
    lines = out.getvalue().splitlines()
    # The first update, then one line per tenth: 2/20, 4/20, ... 20/20.
    assert [line.split("] ")[1].split()[0] for line in lines] == [
        "1/20",
        *(f"{n}/20" for n in range(2, 21, 2)),
    ]
    assert lines[-1].startswith("[##############################] 20/20 pages ")


def test_the_text_bar_without_a_total_prints_at_1_2_5_10_and_the_end_off_a_terminal() -> None:
    # A job whose total is not known yet (its stream is open) still shows in a
    # log as it goes, in fewer lines the longer it runs.
    out = io.StringIO()
    with progress_bar(desc="rows", file=out) as bar:
        for done in range(1, 124):
            bar.update(done)
    shown = [line.split("] ")[1].split()[0] for line in out.getvalue().splitlines()]
    assert shown == ["1/?", "2/?", "5/?", "10/?", "20/?", "50/?", "100/?", "123/?"]


def test_the_bar_learns_the_total_from_the_stream(worker: Any, make_stream: Any) -> None:
    out = io.StringIO()
    with progress_bar(desc="items", file=out, backend="text") as bar:
        stream = make_stream(progress=bar)
        for i in range(5):
            stream.put(echo, i)
        stream.close()
        assert list(stream) == list(range(5))
    assert bar.total == 5
    assert out.getvalue().splitlines()[-1].startswith("[##############################] 5/5 items")


def test_the_tqdm_bar_draws_with_tqdm() -> None:
    require_tool(
        "tqdm",
        "the progress extra (pip install 'celery-ordered[progress]')",
        find=lambda name: name if importlib.util.find_spec(name) else None,
    )
    out = io.StringIO()
    with progress_bar(total=3, desc="docs", file=out, backend="tqdm") as bar:
        bar.update(1)
        bar.say("halfway")
        bar(Progress(delivered=3, total=3, elapsed=1.0, rate=3.0))
    text = out.getvalue()
    assert "halfway" in text
    assert "3/3" in text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"total": "10"}, TypeError, "total must be None or an int"),
        ({"total": -1}, ValueError, "total must be None or an int >= 0, got -1"),
        ({"backend": "rich"}, ValueError, "backend must be 'auto', 'tqdm' or 'text'"),
    ],
)
def test_bad_bar_settings_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ProgressBar(**kwargs)


def test_watch_draws_a_bar_when_asked(worker: Any, make_stream: Any) -> None:
    stream = make_stream()
    for i in range(5):
        stream.put(echo, i)
    stream.close()
    assert list(stream) == list(range(5))
    result = run_ordered("watch", stream.name, "--bar", "--interval", "0.01")
    assert result.exit_code == 0, result.output
    assert "5/5" in result.output
    last = result.output.rstrip().splitlines()[-1]
    assert last.startswith("5/5 delivered, 0 in flight")
    assert last.endswith(", closed")
