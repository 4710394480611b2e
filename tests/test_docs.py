"""The code examples of the documentation are run here, so that they cannot silently rot.

What is collected, from every ``docs/**/*.md`` page and from the "Quickstart" section of README.md:

- fenced ``python`` blocks: executed in page order, in one namespace per page (a page reads like a
  notebook: later blocks may use names defined by earlier ones), with a fresh temporary directory
  as the working directory;
- fenced ``bash`` blocks whose every command line starts with ``python -m sb3_offtrc`` or
  ``sb3-offtrc``: each command is run in-process through :func:`sb3_offtrc.cli.main` and must
  return 0. Other shell blocks (``make``, ``pip``) are documentation only.

Budgets. The examples show realistic budgets; before running, the test shrinks them:
``total_timesteps=N`` and ``--timesteps N`` to at most ``STEP_BUDGET``, ``n_eval_episodes=N`` and
``--episodes N`` to at most ``EPISODE_BUDGET``, and ``--steps N`` (video length) to at most
``FRAME_BUDGET``. Only the keyword spelling is rewritten, so ``.learn(<number>)`` is rejected.
An OffTRC policy built without an explicit ``net_arch`` gets ``SMALL_NET`` instead of the default
two layers of 512, which only costs time here.

Markers. A MyST comment on the line right above a fence (MyST does not render it) controls it; in
README.md, which GitHub renders, the same words in an HTML comment (``<!-- doctest: skip -->``):

- ``% doctest: skip``: never run (say why in the prose);
- ``% doctest: parse``: checked without running: Python is compiled; CLI commands go through the
  argument parser, and their ``--env`` (with ``--cost``) through ``resolve_env_id``. For commands
  too long to run even with a small budget (paper-scale runs on Safety-Gymnasium);
- ``% doctest: requires safety``: run only when Safety-Gymnasium and MuJoCo are installed
  (required, not skipped, under ``SB3_OFFTRC_REQUIRE_SAFETY=1`` as set by ``make test``);
- ``% doctest: requires mujoco``: the same for MuJoCo alone;
- ``% doctest: requires ffmpeg``: run only when ``imageio-ffmpeg`` is installed (MP4 output).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

STEP_BUDGET = 100  # one HazardPoint episode with one env copy; below OffTRC's first update
EPISODE_BUDGET = 1
SMALL_NET = [32, 32]  # OffTRC's default [512, 512] acts ~10x slower; the examples test the API, not learning
FRAME_BUDGET = 20

_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
# MyST's comment, or (README.md, which GitHub renders) an HTML comment
_MARKER = re.compile(r"^(?:%|<!--)\s*doctest:\s*(?P<what>.+?)\s*(?:-->)?\s*$")
_CLI_PREFIXES = ("python -m sb3_offtrc ", "sb3-offtrc ")
_KNOWN_REQUIREMENTS = ("safety", "mujoco", "ffmpeg")
_MARKER_HINT = (
    "an example that cannot run on its own (it reads results of a long run, needs a server, ...) "
    "can be marked with `% doctest: parse` or `% doctest: skip` on the line above its fence "
    "(see tests/test_docs.py)"
)
_SAFETY_REQUIRED = os.environ.get("SB3_OFFTRC_REQUIRE_SAFETY", "") not in ("", "0")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line in the page
    language: str
    code: str
    skip: bool = False
    parse_only: bool = False
    requires: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def extract_blocks(text: str, page: str) -> list[Block]:
    """Fenced code blocks of a Markdown page with their doctest markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        ticks, info = match.group("ticks"), match.group("info").strip()
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        language = info.split()[0] if info else ""
        # `{code-block} python` is a MyST directive spelling of the same thing
        if language in ("{code-block}", "{code}") and len(info.split()) > 1:
            language = info.split()[1]
        block = Block(page, i + 2, language, "\n".join(lines[i + 1 : end]))
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        if marker:
            what = marker.group("what").split()
            if what == ["skip"]:
                block.skip = True
            elif what == ["parse"]:
                block.parse_only = True
            elif what[0] == "requires" and len(what) > 1 and all(r in _KNOWN_REQUIREMENTS for r in what[1:]):
                block.requires = what[1:]
            else:
                raise ValueError(f"{page}:{i}: unknown doctest marker {marker.group(0)!r}")
        blocks.append(block)
        i = end + 1
    return blocks


def readme_quickstart() -> str:
    """The "## Quickstart" section of README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Quickstart' section"
    return match.group(1)


def _shrink(pattern: str, limit: int, code: str) -> str:
    def repl(match: re.Match[str]) -> str:
        value = int(match.group(2).replace("_", ""))
        return f"{match.group(1)}{min(value, limit)}"

    return re.sub(pattern, repl, code)


def apply_budgets(code: str) -> str:
    code = _shrink(r"(total_timesteps\s*=\s*)([\d_]+)", STEP_BUDGET, code)
    code = _shrink(r"(--timesteps[ =])([\d_]+)", STEP_BUDGET, code)
    code = _shrink(r"(n_eval_episodes\s*=\s*)([\d_]+)", EPISODE_BUDGET, code)
    code = _shrink(r"(--episodes[ =])([\d_]+)", EPISODE_BUDGET, code)
    return _shrink(r"(--steps[ =])([\d_]+)", FRAME_BUDGET, code)


def cli_commands(block: Block) -> list[list[str]] | None:
    """The block's commands as argv lists, or None when it is not a pure sb3_offtrc CLI block."""
    if block.language not in ("bash", "console", "sh", "shell"):
        return None
    text = block.code.replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    commands = [line.split(" #", 1)[0].strip() for line in commands]  # trailing comments
    if not commands or not all(cmd.startswith(_CLI_PREFIXES) for cmd in commands):
        return None
    argvs = []
    for cmd in commands:
        words = shlex.split(cmd)
        while words and words[0] != "sb3_offtrc" and words[0] != "sb3-offtrc":
            words.pop(0)  # drop "python -m"
        argvs.append(words[1:])
    return argvs


def _available(requirement: str) -> bool:
    if requirement == "safety":
        from sb3_offtrc.compat import safety_gymnasium_available

        return safety_gymnasium_available()
    if requirement == "mujoco":
        return importlib.util.find_spec("mujoco") is not None
    if requirement == "ffmpeg":
        return importlib.util.find_spec("imageio_ffmpeg") is not None
    raise AssertionError(requirement)


def _pages() -> list[str]:
    pages = sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return [*pages, "README.md"]


def _page_blocks(page: str) -> list[Block]:
    text = readme_quickstart() if page == "README.md" else (ROOT / page).read_text()
    return extract_blocks(text, page)


def _runnable(block: Block) -> bool:
    return block.language == "python" or cli_commands(block) is not None


def _pages_with_code() -> list[str]:
    return [page for page in _pages() if any(_runnable(b) for b in _page_blocks(page))]


def _use_small_offtrc_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    from sb3_offtrc.offtrc.policies import OffTRCPolicy

    original = OffTRCPolicy.__init__

    def small_init(self: OffTRCPolicy, *args: object, net_arch: object = None, **kwargs: object) -> None:
        original(self, *args, net_arch=list(SMALL_NET) if net_arch is None else net_arch, **kwargs)  # type: ignore[arg-type, misc]

    monkeypatch.setattr(OffTRCPolicy, "__init__", small_init)


@pytest.mark.parametrize("page", _pages_with_code())
def test_doc_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _use_small_offtrc_networks(monkeypatch)
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    ran, skipped = 0, []
    for block in _page_blocks(page):
        if block.skip or not _runnable(block):
            continue
        missing = [r for r in block.requires if not _available(r)]
        if missing:
            if _SAFETY_REQUIRED and "safety" in missing:
                pytest.fail(f"{block.where} needs Safety-Gymnasium, which SB3_OFFTRC_REQUIRE_SAFETY=1 demands")
            skipped.append(f"{block.where} (needs {', '.join(missing)})")
            continue
        argvs = cli_commands(block)
        if block.parse_only:
            _check_without_running(block, argvs)
        elif argvs is not None:
            from sb3_offtrc.cli import main

            for argv in argvs:
                argv = shlex.split(apply_budgets(shlex.join(argv)))
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    code = main(argv)
                assert code == 0, (
                    f"{block.where}: `sb3_offtrc {shlex.join(argv)}` returned {code}\n{out.getvalue()}\n{_MARKER_HINT}"
                )
        else:
            assert not re.search(r"\.learn\(\s*[\d_]+", block.code), (
                f"{block.where}: pass total_timesteps= by keyword so that the test can shrink the budget"
            )
            source = "\n" * (block.line - 1) + apply_budgets(block.code)  # tracebacks point at page lines
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(source, str(ROOT / page), "exec"), namespace)
            except Exception as exc:
                exc.add_note(f"in the example at {block.where}; {_MARKER_HINT}")
                raise
        ran += 1
    if ran == 0:
        pytest.skip("every example on this page needs something not installed: " + "; ".join(skipped))


def _check_without_running(block: Block, argvs: list[list[str]] | None) -> None:
    if argvs is None:
        compile(block.code, block.where, "exec")
        return
    from sb3_offtrc.cli import build_parser
    from sb3_offtrc.envs import resolve_env_id

    parser = build_parser()
    for argv in argvs:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{block.where}: `sb3_offtrc {shlex.join(argv)}` does not parse") from exc
        if getattr(args, "env", None):
            resolve_env_id(args.env, getattr(args, "cost", None))


# ------------------------------------------------------------------------- the machinery itself


def test_extract_blocks_reads_markers_and_languages() -> None:
    text = "\n".join(
        [
            "# Page",
            "```python",
            "x = 1",
            "```",
            "% doctest: requires safety",
            "```python",
            "y = 2",
            "```",
            "% doctest: skip",
            "```bash",
            "python -m sb3_offtrc train --timesteps 5000",
            "```",
            "% doctest: parse",
            "```bash",
            "python -m sb3_offtrc eval runs/x",
            "```",
            "```{code-block} python",
            "z = 3",
            "```",
        ]
    )
    blocks = extract_blocks(text, "page.md")
    assert [(b.language, b.line, b.skip, b.parse_only, b.requires) for b in blocks] == [
        ("python", 3, False, False, []),
        ("python", 7, False, False, ["safety"]),
        ("bash", 11, True, False, []),
        ("bash", 15, False, True, []),
        ("python", 18, False, False, []),
    ]
    with pytest.raises(ValueError, match="unknown doctest marker"):
        extract_blocks("% doctest: sometimes\n```python\nx\n```", "page.md")
    # README.md's spelling: an HTML comment, which GitHub does not render either
    (block,) = extract_blocks("<!-- doctest: requires safety mujoco -->\n```python\nx\n```", "README.md")
    assert block.requires == ["safety", "mujoco"]
    (block,) = extract_blocks("<!--doctest: skip-->\n```python\nx\n```", "README.md")
    assert block.skip


def test_budgets_and_cli_parsing() -> None:
    assert apply_budgets("model.learn(total_timesteps=1_000_000)") == f"model.learn(total_timesteps={STEP_BUDGET})"
    assert apply_budgets("learn(total_timesteps=50)") == "learn(total_timesteps=50)"
    assert (
        apply_budgets("evaluate(m, env, n_eval_episodes=10)") == f"evaluate(m, env, n_eval_episodes={EPISODE_BUDGET})"
    )
    block = Block("p.md", 1, "bash", "python -m sb3_offtrc train --timesteps 30000 \\\n  --out runs/x  # comment\n")
    assert cli_commands(block) == [["train", "--timesteps", "30000", "--out", "runs/x"]]
    assert cli_commands(Block("p.md", 1, "bash", "make demo\npython -m sb3_offtrc eval runs/x")) is None
    assert cli_commands(Block("p.md", 1, "python", "print(1)")) is None


def test_every_page_is_reachable_from_the_toctree() -> None:
    """Sphinx -W fails on a page outside every toctree; check it here too, where the build is not run."""
    listed: set[str] = set()
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        for block in extract_blocks(page.read_text(), str(page)):
            if block.language == "{toctree}":
                base = page.parent.relative_to(DOCS)
                entries = [ln.strip() for ln in block.code.splitlines() if ln.strip() and not ln.startswith(":")]
                listed.update(str(base / entry) for entry in entries)
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    assert pages - listed == {"index"}


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path: Path) -> None:
    """What `make docs` does, when the `docs` extra is installed (it is not part of `make test`'s install)."""
    pytest.importorskip("myst_parser")
    sphinx_cmd = pytest.importorskip("sphinx.cmd.build")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = sphinx_cmd.build_main(["-W", "-E", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")])
    assert code == 0, out.getvalue()
