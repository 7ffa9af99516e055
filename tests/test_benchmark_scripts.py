"""Every developer script in benchmarks/ follows the one command style of docs/ARCHITECTURE.md "Benchmarks", read
from its source (``ast``), never run: a module docstring saying what it measures and how to run it, an argparse
``main(argv=None)`` that ``if __name__ == "__main__": sys.exit(main())`` calls, the shared flag names (``--out``,
``--tiny``, ``--time-budget``), and callers (shell scripts, docs) that pass only flags the scripts accept."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
SHELL = sorted(BENCH.glob("*.sh"))

# other spellings of the shared flags: allowed only as hidden aliases (help=argparse.SUPPRESS) of the shared name
SYNONYMS = {
    "--out": ("--output", "--out-file", "--outfile", "--json", "--result", "-o"),
    "--time-budget": ("--max-seconds", "--time-limit", "--max-time", "--budget", "--seconds"),
    "--tiny": ("--dry-run", "--cpu", "--smoke", "--toy", "--small"),
}
# calls that write a result file: a script that makes one takes its path as --out
WRITERS = {"write_text", "write_bytes", "dump", "save", "save_result", "savefig", "to_csv"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _main(tree: ast.Module) -> ast.FunctionDef | None:
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)


def _add_argument_calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "add_argument"]


def _hidden(call: ast.Call) -> bool:
    """help=argparse.SUPPRESS"""
    return any(kw.arg == "help" and isinstance(kw.value, ast.Attribute) and kw.value.attr == "SUPPRESS"
               for kw in call.keywords)


def _dest(call: ast.Call) -> str | None:
    return next((kw.value.value for kw in call.keywords if kw.arg == "dest" and isinstance(kw.value, ast.Constant)),
                None)


def flags(path: Path) -> tuple[set[str], set[str]]:
    """(visible option strings, hidden ones) of a script's parser."""
    visible, hidden = set(), set()
    for call in _add_argument_calls(_tree(path)):
        names = {a.value for a in call.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
        (hidden if _hidden(call) else visible).update(names)
    return visible, hidden


def _writes_files(tree: ast.Module) -> bool:
    for n in ast.walk(tree):
        if not isinstance(n, ast.Call):
            continue
        name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
        if name in WRITERS:
            return True
        if name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value[:1] in "wax"
                                  for a in n.args[1:2]):
            return True
    return False


def test_there_are_scripts():
    assert len(SCRIPTS) >= 5 and SHELL


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_docstring_says_what_and_how(path):
    doc = ast.get_docstring(_tree(path))
    assert doc, f"{path.name}: no module docstring (what it measures, how to run it)"
    assert len(doc.splitlines()[0]) > 20, f"{path.name}: the docstring's first line should say what it measures"
    assert re.search(r"^Usage \(repo root[^)]*\):", doc, re.M), f"{path.name}: no 'Usage (repo root...):' line"
    assert f"python benchmarks/{path.name}" in doc, f"{path.name}: the usage does not show `python benchmarks/...`"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_argparse_main_and_entry_point(path):
    tree = _tree(path)
    main = _main(tree)
    assert main is not None, f"{path.name}: no top-level main()"
    params = main.args.args
    assert [a.arg for a in params] == ["argv"] and len(main.args.defaults) == 1, \
        f"{path.name}: main's signature should be main(argv=None)"
    default = main.args.defaults[0]
    assert isinstance(default, ast.Constant) and default.value is None, f"{path.name}: argv must default to None"
    calls = [n for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert any(c.func.attr == "ArgumentParser" for c in calls), f"{path.name}: main builds no argparse parser"
    assert any(c.func.attr == "parse_args" and [getattr(a, "id", None) for a in c.args] == ["argv"] for c in calls), \
        f"{path.name}: main should call parser.parse_args(argv)"
    last = tree.body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.test) in ('__name__ == "__main__"', "__name__ == '__main__'"),\
        f"{path.name}: the module should end with `if __name__ == \"__main__\":`"
    assert [ast.unparse(s) for s in last.body] == ["sys.exit(main())"], \
        f"{path.name}: the entry point should be `sys.exit(main())` (main returns the exit status)"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shared_flag_names(path):
    tree = _tree(path)
    visible, hidden = flags(path)
    for shared, others in SYNONYMS.items():
        used = sorted(visible & set(others))
        assert not used, f"{path.name}: {used} should be spelled {shared} (an old spelling may stay as a hidden alias)"
    for call in _add_argument_calls(tree):
        names = [a.value for a in call.args if isinstance(a, ast.Constant)]
        if _hidden(call) and names:
            shared = next((s for s, others in SYNONYMS.items() if names[0] in others), None)
            if shared is not None:
                assert shared in visible and _dest(call) == shared[2:].replace("-", "_"), \
                    f"{path.name}: hidden alias {names[0]} should store into {shared}'s dest"
    if _writes_files(tree):
        assert "--out" in visible, f"{path.name}: writes a result file but takes no --out"


@pytest.mark.parametrize("path", SHELL, ids=lambda p: p.name)
def test_shell_header_has_usage(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#!"), f"{path.name}: no shebang"
    header = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "Usage" in text and f"bash benchmarks/{path.name}" in text, \
        f"{path.name}: the header comment should give its usage (`bash benchmarks/{path.name} ...`)"


def _invocations(text: str):
    """(script name, option strings) of each `benchmarks/name.py ...` command in a shell script or a doc
    (`benchmarks/NAME.py` is a placeholder); calls of a `.baseline/` checkout (older code, older flags) are not this
    tree's scripts."""
    text = text.replace("\\\n", " ")
    for m in re.finditer(r"(?<![\w./])benchmarks/([a-z][a-z0-9_]*)\.py([^\n`|;)]*)", text):
        command = m.group(2).split(" 2>")[0].split(" >")[0]
        yield m.group(1), {tok.split("=")[0] for tok in command.split() if tok.startswith("--")}


def test_callers_pass_flags_the_scripts_take():
    callers = [*SHELL, *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", *SCRIPTS]
    problems = []
    for caller in callers:
        for name, options in _invocations(caller.read_text()):
            script = BENCH / f"{name}.py"
            if not script.exists():
                problems.append(f"{caller.name}: benchmarks/{name}.py does not exist")
                continue
            visible, _ = flags(script)
            unknown = sorted(options - visible)
            if unknown:
                problems.append(f"{caller.name}: benchmarks/{name}.py {unknown}")
    assert not problems, "callers use flags the scripts do not take (or only as hidden aliases):\n" + \
        "\n".join(problems)
