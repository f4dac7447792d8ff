"""The documentation builds without a warning, and says only what is true.

- The Sphinx build (MyST Markdown pages in ``docs/``) passes with warnings as
  errors.
- Every ```` ```python ```` block of a page runs: a page's blocks are joined,
  in order, into one script run in a fresh interpreter (cwd a temporary
  directory, the repository root on ``PYTHONPATH``). Each block's code keeps
  its line number from the page, so a traceback points at the page's line.
- A ```` ```text ```` block right after a ``% output`` comment line is the
  exact output of the nearest ``python`` block above it.
- A ```` ```{code-block} python ```` block (code that cannot run on its own)
  names, on the line just above it, the test that runs the same code:
  ``% tested by: tests/test_x.py::test_name``; that test must exist.
- Every ``ordered_*`` setting the package reads is documented in
  ``configuration.md``, and every documented one exists; every argument of
  ``OrderedResultStream`` is documented there too. Every key of a stream
  and every Lua script is described in ``how-it-works.md``.
- Every public name (``celery_ordered.__all__``) is in the API reference.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

import celery_ordered
from celery_ordered.redis.keys import StreamKeys
from tests.support import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

#: Seconds one page's examples may take, all blocks together.
PAGE_TIMEOUT = 180

#: Printed between two blocks' output so each block's output can be told apart.
BLOCK_SEPARATOR = "\x1edocs-block:"

TESTED_BY = re.compile(r"^%\s*tested by:\s*(?P<path>[\w./-]+\.py)::(?P<test>[\w:]+)(\[.*\])?\s*$")
OUTPUT_COMMENT = re.compile(r"^%\s*output\s*$")
SETTING = re.compile(r"\bordered_[a-z0-9_]+\b")


@dataclass(frozen=True)
class Fence:
    """One fenced block of a page: its info string, text and line numbers (0-based)."""

    info: str
    content: str
    start: int  # the opening fence line
    end: int  # the line after the closing fence

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""


def fences(page: Path) -> list[Fence]:
    """The page's fenced blocks, as the Markdown parser MyST uses sees them."""
    tokens = MarkdownIt("commonmark").parse(page.read_text(encoding="utf-8"))
    return [
        Fence(token.info.strip(), token.content, token.map[0], token.map[1])
        for token in tokens
        if token.type == "fence" and token.map is not None
    ]


def line_before(page: Path, fence: Fence) -> str:
    lines = page.read_text(encoding="utf-8").splitlines()
    return lines[fence.start - 1].strip() if fence.start > 0 else ""


def python_blocks(page: Path) -> list[Fence]:
    return [fence for fence in fences(page) if fence.info == "python"]


def page_script(page: Path) -> str:
    """The page's python blocks as one script, each at its own line numbers.

    The line of each opening fence prints a separator, so the output of each
    block can be told apart.
    """
    lines = [""] * len(page.read_text(encoding="utf-8").splitlines())
    for fence in python_blocks(page):
        lines[fence.start] = f"print({BLOCK_SEPARATOR + str(fence.start)!r}, flush=True)"
        for offset, line in enumerate(fence.content.splitlines(), start=fence.start + 1):
            lines[offset] = line
    return "\n".join(lines) + "\n"


def expected_outputs(page: Path) -> dict[int, str]:
    """Opening line of a python block -> the output its ``% output`` block shows."""
    expected: dict[int, str] = {}
    last_python: Fence | None = None
    for fence in fences(page):
        if fence.info == "python":
            last_python = fence
        elif OUTPUT_COMMENT.match(line_before(page, fence)):
            assert fence.language == "text", (
                f"{page.name}:{fence.start + 1}: a '% output' block must be ```text"
            )
            assert last_python is not None, (
                f"{page.name}:{fence.start + 1}: '% output' with no python block above it"
            )
            assert last_python.start not in expected, (
                f"{page.name}:{fence.start + 1}: two '% output' blocks for one python block"
            )
            expected[last_python.start] = fence.content
    return expected


def split_output(stdout: str) -> dict[int, str]:
    """Opening line of a python block -> what that block printed."""
    outputs: dict[int, str] = {}
    for chunk in stdout.split(BLOCK_SEPARATOR)[1:]:
        number, _, text = chunk.partition("\n")
        outputs[int(number)] = text
    return outputs


def normalise(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


# -- (a) the build ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def build(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Build the HTML docs once for this module: the process and its output directory."""
    out = tmp_path_factory.mktemp("docs-html")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done, out


def test_the_docs_build_without_a_warning(
    build: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, out = build
    assert done.returncode == 0, f"sphinx failed:\n{done.stderr}\n{done.stdout}"
    assert (out / "index.html").exists()


# -- (b) every python block runs, and shows its real output ------------------------------


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_the_examples_of_a_page_run_and_print_what_it_shows(page: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{page.stem}.md.py"
    script.write_text(page_script(page), encoding="utf-8")
    # The page's own temporary directory (short: unix socket paths are
    # limited), which its examples must leave as they found it: empty.
    scratch = Path(tempfile.mkdtemp(prefix="co-docs-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",  # forked workers must not inherit unwritten output
        "TMPDIR": str(scratch),
    }
    try:
        done = subprocess.run(
            [sys.executable, script.name],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT,
        )  # fmt: skip
        left = sorted(path.name for path in scratch.iterdir())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, (
        f"docs/{page.name}'s examples failed (line numbers are the page's)\n{report}"
    )
    assert left == [], f"docs/{page.name}'s examples left temporary files: {left}"
    outputs = split_output(done.stdout)
    for start, expected in expected_outputs(page).items():
        assert normalise(outputs.get(start, "")) == normalise(expected), (
            f"docs/{page.name}: the block at line {start + 1} printed something other "
            f"than its '% output' block shows\n{report}"
        )


def test_an_output_check_catches_a_wrong_output(tmp_path: Path) -> None:
    # The harness itself: a page whose output block lies is caught.
    page = tmp_path / "lying.md"
    page.write_text(
        "# Page\n\n```python\nprint(1 + 1)\n```\n\n% output\n```text\n3\n```\n",
        encoding="utf-8",
    )
    script = page_script(page)
    assert script.splitlines()[3] == "print(1 + 1)"  # the page's own line 4
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    outputs = split_output(done.stdout)
    assert normalise(outputs[2]) == ["2"]
    assert normalise(expected_outputs(page)[2]) == ["3"]


# -- (c) code that cannot run here names the test that runs it ---------------------------


def defined_tests(path: Path) -> set[str]:
    """``test_x`` and ``Class::test_x`` names defined in a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}::{item.name}")
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_that_cannot_run_here_names_an_existing_test(page: Path) -> None:
    for fence in fences(page):
        if fence.info.split()[:2] != ["{code-block}", "python"]:
            continue
        where = f"docs/{page.name}:{fence.start + 1}"
        found = TESTED_BY.match(line_before(page, fence))
        assert found, (
            f"{where}: a {{code-block}} python block must be preceded by a line "
            "'% tested by: tests/test_x.py::test_name' naming the test that runs its code"
        )
        path = ROOT / found["path"]
        assert path.is_file(), f"{where}: {found['path']} does not exist"
        assert found["test"] in defined_tests(path), (
            f"{where}: {found['path']} has no test {found['test']}"
        )


# -- (d) the configuration page cannot drift from the code --------------------------------


def settings_in_source() -> set[str]:
    """Every ``ordered_*`` name in the package's code, but its public API names."""
    package = ROOT / "celery_ordered"
    found: set[str] = set()
    for path in [*package.rglob("*.py"), *package.rglob("*.lua")]:
        found |= set(SETTING.findall(path.read_text(encoding="utf-8")))
    return found - set(celery_ordered.__all__)


def first_column(page: Path) -> list[str]:
    """The first cell of every table row of a page."""
    rows = page.read_text(encoding="utf-8").splitlines()
    return [row.split("|")[1].strip() for row in rows if row.startswith("|")]


def documented_settings() -> set[str]:
    """The ``ordered_*`` names in the first column of configuration.md's tables."""
    return {
        name for cell in first_column(DOCS / "configuration.md") for name in SETTING.findall(cell)
    }


def test_every_setting_the_code_reads_is_documented() -> None:
    in_source = settings_in_source()
    assert "ordered_redis_url" in in_source  # the scan sees the settings at all
    missing = in_source - documented_settings()
    assert not missing, f"settings missing from the tables of docs/configuration.md: {missing}"


def test_every_documented_setting_exists() -> None:
    stale = documented_settings() - settings_in_source()
    assert not stale, f"docs/configuration.md documents settings the code never reads: {stale}"


def test_every_stream_argument_is_documented() -> None:
    cells = first_column(DOCS / "configuration.md")
    arguments = list(inspect.signature(celery_ordered.OrderedResultStream).parameters)
    missing = [name for name in arguments if f"`{name}`" not in cells]
    assert not missing, f"OrderedResultStream arguments missing from configuration.md: {missing}"


def test_every_key_and_script_of_a_stream_is_described() -> None:
    page = DOCS / "how-it-works.md"
    text = page.read_text(encoding="utf-8")
    rows = first_column(page)
    parts = [key.rsplit(":", 1)[1] for key in StreamKeys("x").all()]
    missing = [part for part in parts if f"`{part}`" not in rows]
    assert not missing, f"keys missing from the table of docs/how-it-works.md: {missing}"
    # _prelude.lua is no script: protocol.py puts it in front of each one.
    scripts = sorted(
        path.stem
        for path in (ROOT / "celery_ordered" / "redis" / "lua").glob("*.lua")
        if not path.name.startswith("_")
    )
    described = sorted(re.findall(r"^\*\*(\w+)\*\* \(", text, re.M))
    assert described == scripts, (
        f"docs/how-it-works.md describes the scripts {described}; the package has {scripts}"
    )


# -- (e) the API reference has every public name ------------------------------------------


def test_every_public_name_is_in_the_api_reference(
    build: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    _, out = build
    html = (out / "api.html").read_text(encoding="utf-8")
    for name in celery_ordered.__all__:
        assert re.search(rf"::\s+celery_ordered\.{re.escape(name)}\s*$", text, re.M), (
            f"docs/api.md has no autodoc directive for celery_ordered.{name}"
        )
        assert f'id="celery_ordered.{name}"' in html, (
            f"the built API page does not describe celery_ordered.{name}"
        )
