"""The README and docs/*.md say what runs: every `python X.py ...`, `python -m tools.X ...` and
`torchrun ... X.py ...` line of their ```bash blocks, and every such inline code span, parses with
that script's own
argparse parser (get_parser(), and torchrun's for torchrun lines), flags spelled out in full, no
placeholder; the README stays within 15,000 characters; every relative link points to a file
(and heading) that exists.

Parsing never runs a script, so the whole file takes seconds. Each check also has a test that
hands it a broken command or page and expects it to fail (the last section).
"""
import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_CHARS = 15_000
TEST_COMMAND = "python -m pytest -q tests"      # what .ci/run runs, and what the README tells
PYTHONS = {"python", "python3"}
OPERATORS = {"&&", "||", ";", "|", "&", ";;"}
# what a reader would have to replace before a command runs: `...`, FLAGS, RUN, DIR, <path>
PLACEHOLDER = re.compile(r"\.\.\.|^[A-Z][A-Z0-9_]*$|^<.*>$")
# `python X.py ...`, `python -m tools.X ...` or `torchrun ... X.py ...` in single backticks
INLINE_COMMAND = (r"(?<!`)`((?:python3? [\w./-]+\.py|python3? -m tools\.\w+|torchrun [^`]*?\.py)"
                  r"\b[^`]*)`(?!`)")
# the card's scripts at the root (X.py), the tools beside them (python -m tools.X)
SCRIPTS_THE_README_RUNS = {"train.py", "sample.py", "export.py", "tools.released",
                           "tools.evaluate"}


# --- reading the pages -------------------------------------------------------------------------

def bash_blocks(text):
    """(first line number, body) of every ```bash (sh, shell) fenced block."""
    blocks = []
    for m in re.finditer(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", text, re.M | re.S):
        blocks.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


def command_lines(start, body):
    """(line number, text) of each command of a block, backslash continuations joined."""
    lines, pending, first = [], "", start
    for number, line in enumerate(body.splitlines(), start):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((first, pending + line))
        pending = ""
    if pending:
        lines.append((first, pending))
    return lines


def simple_commands(line):
    """A shell line -> its simple commands as token lists (comments dropped, split at && ; | ...,
    leading VAR=value assignments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    result = []
    for tokens in commands:
        tokens = drop_redirections(tokens)
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            tokens = tokens[1:]
        if tokens:
            result.append(tokens)
    return result


def drop_redirections(tokens):
    """`> log`, `2>&1`, `< in`: shell plumbing, not arguments."""
    kept, skip = [], False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
        elif re.fullmatch(r"[<>]+&?", token):
            if kept and kept[-1].isdigit() and i > 0 and tokens[i - 1] == kept[-1]:
                kept.pop()
            skip = True
        else:
            kept.append(token)
    return kept


def is_project_command(tokens):
    """`python X.py ...`, `python -m tools.X ...` or `torchrun ...`; pip, git, curl,
    `python -m pytest` are not."""
    if tokens[0] == "torchrun":
        return True
    if Path(tokens[0]).name not in PYTHONS or len(tokens) < 2:
        return False
    return tokens[1].endswith(".py") or (tokens[1] == "-m" and tokens[2:3] != ["pytest"]
                                         and len(tokens) > 2 and tokens[2].startswith("tools."))


def script_and_argv(tokens):
    """A python command's script (X.py, or tools.X for -m) and its arguments."""
    if tokens[1] == "-m":
        return tokens[2], tokens[3:]
    return tokens[1], tokens[2:]


def inline_commands(text):
    """(line number, text) of every `python X.py ...` / `torchrun ... X.py ...` code span of
    the prose."""
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(INLINE_COMMAND, prose)]


def project_commands(path):
    """(page:line, command text, tokens) of every project command in path's bash blocks and
    inline code spans."""
    text = path.read_text()
    lines = [line for start, body in bash_blocks(text) for line in command_lines(start, body)]
    found = []
    for number, line in lines + inline_commands(text):
        for tokens in simple_commands(line):
            if is_project_command(tokens):
                found.append((f"{path.relative_to(ROOT)}:{number}", shlex.join(tokens), tokens))
    return found


# --- the checks --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def script_parser_factory(script):
    """The get_parser of a script at the root (X.py) or of a tool (tools.X), a fresh parser per
    call, or an AssertionError saying what is wrong."""
    if script.endswith(".py"):
        path, name = ROOT / script, Path(script).stem
        assert path.parent == ROOT, f"{script} is not at the root; tools run as python -m tools.X"
    else:
        path, name = ROOT / (script.replace(".", "/") + ".py"), script
        assert script.count(".") == 1, f"{script} is not a tool of this project"
    assert path.is_file(), f"{script} is not a script of this project"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(name)
    assert callable(getattr(module, "get_parser", None)), \
        f"{script} has no get_parser() (scripts build their argparse parser there)"
    return module.get_parser


def parse(parser, argv, what):
    """parser.parse_args(argv), which must not exit; its error message becomes the failure."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines() or ["exited"]
            raise AssertionError(f"{what} {shlex.join(argv)!r}: {lines[-1]}") from None


def check_command(tokens):
    """One project command: its placeholders, its launcher's flags and its script's flags."""
    bad = [t for t in tokens if PLACEHOLDER.search(t)]
    assert not bad, f"placeholder(s) {bad} in: {shlex.join(tokens)}"
    if tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        launcher = parse(get_args_parser(), tokens[1:], "torchrun")  # as torchrun reads it
        script, argv = launcher.training_script, launcher.training_script_args
        assert not launcher.module and not launcher.no_python, "torchrun -m / --no-python"
    else:
        script, argv = script_and_argv(tokens)
    parser = script_parser_factory(script)()
    if "-h" in argv or "--help" in argv:
        return
    parser.allow_abbrev = False  # a page spells every flag out (torchrun reads --run as --run-path)
    parse(parser, argv, script)


def check_size(text):
    assert len(text) <= MAX_README_CHARS, \
        f"README.md has {len(text):,} characters (at most {MAX_README_CHARS:,})"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(prose):
    """The anchors of a page's headings (code blocks already removed)."""
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def anchors(path):
    return headings(re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S))


def broken_links(text, base):
    """Relative links (markdown, reference-style, <img src>) of a page in folder base whose file,
    or whose #heading, does not exist; links inside code are not links."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = (re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
               + re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, re.M)
               + re.findall(r"<img[^>]*\bsrc=\"([^\"]+)\"", prose))
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (base / file) if file else None
        if path is not None and not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (path is None or path.suffix == ".md"):
            names = anchors(path) if path is not None else headings(prose)
            if anchor not in names:
                broken.append(f"{target} (no heading #{anchor})")
    return broken


def broken_pointers(text):
    """What a module's comments point to that a user does not have: README.md#anchor or
    docs/PAGE.md#anchor whose page or heading does not exist, a README named without its
    section's anchor, the project's design notes (not in the repository)."""
    broken = []
    for m in re.finditer(r"\b(README\.md|docs/[\w-]+\.md)(?:#([\w-]+))?", text):
        path = ROOT / m.group(1)
        if not path.is_file():
            broken.append(f"{m.group(0)} (no such file)")
        elif m.group(2) and m.group(2) not in anchors(path):
            broken.append(f"{m.group(0)} (no heading #{m.group(2)})")
    for m in re.finditer(r"(?<!official )README(?!\.md)|DESIGN|shared/", text):
        broken.append(f"{m.group(0)!r} (point to README.md#heading or docs/PAGE.md#heading)")
    return broken


# --- the pages ---------------------------------------------------------------------------------

COMMANDS = [c for page in PAGES for c in project_commands(page)]


@pytest.mark.parametrize("where, text, tokens", COMMANDS,
                         ids=[f"{where} {text[:60]}" for where, text, _ in COMMANDS])
def test_command_parses(where, text, tokens):
    check_command(tokens)


def test_readme_shows_every_step():
    """The extraction finds the README's commands (an empty list would pass the test above)."""
    commands = project_commands(README)
    scripts = {script_and_argv(tokens)[0] for _, _, tokens in commands if tokens[0] != "torchrun"}
    missing = sorted(SCRIPTS_THE_README_RUNS - scripts)
    assert not missing, f"the README has no command for {missing}"
    assert any(tokens[0] == "torchrun" for _, _, tokens in commands), "no torchrun command"


def test_readme_size():
    check_size(README.read_text())


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    assert not broken_links(page.read_text(), page.parent)


CODE = [*sorted(ROOT.glob("*.py")), *sorted((ROOT / "lib").glob("*.py")),
        *sorted((ROOT / "tools").glob("*.py")), *sorted((ROOT / ".ci").iterdir())]


@pytest.mark.parametrize("module", CODE, ids=[str(p.relative_to(ROOT)) for p in CODE])
def test_pointers_in_code_resolve(module):
    assert not broken_pointers(module.read_text())


def test_readme_test_command_is_what_ci_runs():
    blocks = bash_blocks(README.read_text())
    lines = [line.strip() for start, body in blocks for _, line in command_lines(start, body)]
    assert TEST_COMMAND in lines, f"the README does not give `{TEST_COMMAND}`"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci, f".ci/run does not run `{TEST_COMMAND}`"


def test_the_readme_installs_what_the_tests_import():
    """After the README's install, its test block's pip line brings pytest (CI installs the same
    file): the test command does not fail for want of it."""
    lines = [line.strip() for _, body in bash_blocks(README.read_text())
             for line in body.splitlines()]
    install = "pip install -r requirements-dev.txt"
    assert install in lines, f"the README does not say `{install}`"
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and any(line.startswith("pytest") for line in dev)
    assert "-r requirements-dev.txt" in (ROOT / ".ci" / "run").read_text()


SCRIPTS = sorted([p.name for p in ROOT.glob("*.py") if "def get_parser" in p.read_text()]
                 + [f"tools.{p.stem}" for p in (ROOT / "tools").glob("*.py")
                    if "def get_parser" in p.read_text()])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_each_default_once(script):
    """--help: a flag with a default says it once (the help's own words or the formatter's), and
    none says "default: None"."""
    parser = script_parser_factory(script)()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or not action.help:
            continue
        text = formatter._expand_help(action)
        flag = action.option_strings[-1]
        assert text.count("default:") <= 1 and "default: None" not in text, (flag, text)
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in text, (flag, text)


# --- each check fails when it should -----------------------------------------------------------

@pytest.mark.parametrize("line", [
    "python sample.py --run runs/demo",                          # abbreviation of --run-dir
    "python sample.py --run-dir runs/demo --no-such-flag",      # unknown flag
    "python sample.py --run-dir runs/demo --cfg high",          # wrong type
    "python sample.py --run-dir runs/demo --runtime tensorrt",  # not a choice
    "python export.py --run-dir runs/demo --fp16 --int8",       # mutually exclusive
    "python -m tools.evaluate --samples s.npz",                 # a required flag missing
    "python tools/evaluate.py --samples s.npz --reference r.npz",  # a tool run as a file
    "python -m tools.no_such_tool --help",                      # not a tool of the project
    "python train.py --data /imagenet/train FLAGS",             # placeholder
    "python train.py --data /imagenet/train --preset large ...",
    "python no_such_script.py --run-dir runs/demo",             # not a script of the project
    "torchrun --nproc_per_node 2 sample.py --run runs/demo",    # torchrun: --run is its --run-path
    "torchrun --no-such-launcher-flag 2 sample.py --run-dir runs/demo",
    "torchrun --nproc_per_node 2 sample.py --run-dir runs/demo --bad-flag",
])
def test_check_command_fails_on(line):
    [tokens] = simple_commands(line)
    with pytest.raises(AssertionError):
        check_command(tokens)


def test_check_command_passes_good_lines():
    for line in ["torchrun --nproc_per_node 8 sample.py --run-dir x --cfg 3.1 --out '' --npz a.npz",
                 "python export.py --run-dir runs/demo --int8 --out runs/demo/onnx-int8",
                 "python train.py --help",
                 "python -m tools.evaluate --samples s.npz --reference r.npz"]:
        [tokens] = simple_commands(line)
        check_command(tokens)


def test_extraction():
    page = ("text\n```bash\npip install -r requirements.txt\npython sample.py --run-dir r \\\n"
            "    --cfg 3  # comment\ncd x && python3 export.py --run-dir r\n"
            "python -m tools.watch --run-dir r\npython -m pytest -q tests\n```\n"
            "```python\npython a.py\n```\n")
    found = [line for start, body in bash_blocks(page) for line in command_lines(start, body)]
    commands = [tokens for _, line in found for tokens in simple_commands(line)
                if is_project_command(tokens)]
    assert commands == [["python", "sample.py", "--run-dir", "r", "--cfg", "3"],
                        ["python3", "export.py", "--run-dir", "r"],
                        ["python", "-m", "tools.watch", "--run-dir", "r"]]
    assert [start for start, _ in found] == [3, 4, 6, 7, 8]
    prose = ("Run `python train.py --resume\n runs/demo` or "
             "`torchrun --nproc_per_node 2 sample.py`; `python -m tools.evaluate --help`; "
             "`sample.py`, `torchrun` and "
             "`python -m pytest` are not commands of a script.\n")
    assert inline_commands(prose) == [(1, "python train.py --resume runs/demo"),
                                      (2, "torchrun --nproc_per_node 2 sample.py"),
                                      (2, "python -m tools.evaluate --help")]


def test_check_size_fails_when_too_long():
    check_size("x" * MAX_README_CHARS)
    with pytest.raises(AssertionError):
        check_size("x" * (MAX_README_CHARS + 1))


def test_broken_pointers_are_found():
    text = ("# docs/training.md#determinism and README.md#speed exist; the official README too\n"
            "# docs/training.md#no-such-heading, docs/nowhere.md, README: Speed, DESIGN \u00a74\n")
    assert broken_pointers(text) == [
        "docs/training.md#no-such-heading (no heading #no-such-heading)",
        "docs/nowhere.md (no such file)",
        "'README' (point to README.md#heading or docs/PAGE.md#heading)",
        "'DESIGN' (point to README.md#heading or docs/PAGE.md#heading)"]


def test_broken_links_are_found():
    text = ("# Top\n[ok](README.md) [ok](#top) [web](https://example.com) `[code](nowhere.md)`\n"
            "[gone](docs/no_such.png) ![gone](no_such.png)\n"
            "[bad anchor](README.md#no-such-heading)\n"
            "[bad](#nowhere)\n[ref]: missing.md\n<img src=\"missing.png\">\n")
    assert sorted(broken_links(text, ROOT)) == sorted([
        "docs/no_such.png (no such file)", "no_such.png (no such file)",
        "README.md#no-such-heading (no heading #no-such-heading)", "#nowhere (no heading #nowhere)",
        "missing.md (no such file)", "missing.png (no such file)"])
    assert slug("Reproduce the paper's numbers with the released weights") == \
        "reproduce-the-papers-numbers-with-the-released-weights"
