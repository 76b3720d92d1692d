"""The documentation: the MkDocs site builds with warnings as errors, the tutorials run as
written, and every file README.md names exists.

Tutorials (``docs/tutorials/*.md``) are executed block by block, in order, in one empty
folder: a fenced block with ``title="PATH"`` is a file the reader writes (written there); a
``bash`` block is one command per line (``vbseg ...`` runs this checkout's CLI through the
interpreter running the tests); an untitled ``python`` block runs as a script in that folder;
``text`` and other blocks are shown, not run. Their settings are small (24^3 phantoms,
200 volume draws): the whole file takes about 30-60 s on 2 cores.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]+)"')
# a path into the repository as README.md names it (inside backticks or not)
REPO_PATH = re.compile(r"\b((?:benchmarks|vbseg|tests|experiments|docs|paper_figures)/[\w./-]*\w/?)")
TUTORIAL_TIMEOUT_S = 300


def fenced_blocks(markdown: str) -> list[tuple[str, str | None, str]]:
    """(language, title or None, body) of every fenced code block, in order."""
    blocks = []
    for match in FENCE.finditer(markdown):
        title = TITLE.search(match["attrs"])
        blocks.append((match["lang"], title.group(1) if title else None, match["body"]))
    return blocks


def _environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MPLBACKEND"] = "Agg"
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


def _run(command: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True,
                          timeout=TUTORIAL_TIMEOUT_S)
    assert done.returncode == 0, (f"{what} failed (exit {done.returncode}):\n"
                                  f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def _shell_command(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    if words and words[0] == "vbseg":
        return [sys.executable, "-m", "vbseg.cli", *words[1:]]
    return words


def test_fenced_blocks_are_found():
    blocks = fenced_blocks('text\n```toml title="a.toml"\nx = 1\n```\n\n```bash\nvbseg demo\n```\n')
    assert blocks == [("toml", "a.toml", "x = 1\n"), ("bash", None, "vbseg demo\n")]


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs_as_written(tutorial, tmp_path):
    blocks = fenced_blocks(tutorial.read_text())
    assert any(lang in ("bash", "python") and title is None for lang, title, _ in blocks), \
        f"{tutorial.name} has nothing to run"
    for number, (lang, title, body) in enumerate(blocks, start=1):
        what = f"{tutorial.name}, block {number} ({lang})"
        if title is not None:
            target = tmp_path / title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
        elif lang == "bash":
            for line in body.splitlines():
                command = _shell_command(line)
                if command:
                    _run(command, tmp_path, f"{what}: {line}")
        elif lang == "python":
            script = tmp_path / f"_block_{number}.py"
            script.write_text(body)
            _run([sys.executable, script.name], tmp_path, what)


def test_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page in nav, an unresolvable API
    reference or a missing snippet fails the build."""
    pytest.importorskip("mkdocs", reason="the docs need the [test] or [docs] extra")
    _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
          "--site-dir", str(tmp_path / "site")], ROOT, "mkdocs build --strict")
    guide = (tmp_path / "site" / "guide" / "index.html").read_text()
    assert "How honest are the intervals" in guide, "the guide page lost README's guide"
    assert (tmp_path / "site" / "api" / "posterior" / "index.html").read_text().count("doc-") > 5


def test_readme_keeps_its_set_up_commands_and_guide_markers():
    readme = (ROOT / "README.md").read_text()
    lines = readme.split("```bash\n", 1)[1].splitlines()
    assert lines[0].startswith('pip install -e ".[test]" && vbseg demo')
    assert lines[1].startswith('pip install -e ".[test]" && pytest -n 2 --dist loadfile')
    assert "--8<-- [start:guide]" in readme and "--8<-- [end:guide]" in readme


def test_every_path_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    named = sorted(set(REPO_PATH.findall(readme)))
    assert named, "README.md names no repository paths: the pattern is out of date"
    missing = [path for path in named if not (ROOT / path).exists()]
    assert not missing, f"README.md names paths that do not exist: {missing}"
