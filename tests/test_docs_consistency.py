"""README.md and docs/*.md against the code: every `edgeglm ...` command they show parses with the real
parser, every `python benchmarks/X.py` / `python -m M` line names a script or module that exists and
takes the flags shown (its --help, run once per script), and every agent or fleet setting they name (TOML
blocks, `section.key` names, `[section] key`, `EDGEGLM_SECTION__KEY` variables) is in the config schema.

Deliberate exceptions (an example of an error, a doc others edit whose mismatch is reported) are listed in
ALLOWED with a reason; an entry that no longer matches anything fails too, so the list stays small.
The checkers take the list of files to read, so the last tests run them on copies with a mistake added.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# (doc file name, the command / setting as the problem line quotes it) -> why it is not a mistake
ALLOWED: dict[tuple[str, str], str] = {
    ("README.md", "edgeglm fleet status --jsn"): "the usage error a mistyped flag gives, shown as an example",
    ("install.md", "EDGEGLM_HTTP_API_KEY"): "the misspelling (one underscore) the agent refuses, shown as such",
    ("install.md", "EDGEGLM_HTTP__API_KYE"): "the misspelled field the validation refuses, shown as such",
    ("fleet.md", "EDGEGLM_MQTT_PASSWORD"): "the misspelling (one underscore) the controller refuses, shown as such",
    ("fleet.md", "sampling.bogus"): "an unknown setting `config set` refuses, shown as such",
    ("fleet.md", "model.version"): "a field of the agents' state messages, no setting",
}

# --- the docs: fenced blocks (a logical line each) and inline code spans --------------------------------

FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.S)
HEADING = re.compile(r"^#{1,6}\s")


@dataclass(frozen=True)
class Snippet:
    doc: str  # file name
    line: int
    text: str
    fenced: bool
    lang: str = ""
    context: str = ""  # fenced: the prose since the last heading, up to the block


def snippets(path: Path) -> list[Snippet]:
    lines = path.read_text().splitlines()
    out: list[Snippet] = []
    prose: list[str] = []
    since_heading: list[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            since_heading = [] if HEADING.match(lines[i]) else [*since_heading, lines[i]]
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        prose.extend([""] * (i - start + 2))  # keep prose line numbers
        i += 1
        context = "\n".join(since_heading)
        out.append(Snippet(path.name, start + 1, "\n".join(body), True, lang, context))
        if lang in ("", "bash", "sh", "shell", "console", "ini"):  # shell lines: one logical line each
            j = 0
            while j < len(body):
                first, text = j, body[j]
                while text.endswith("\\") and j + 1 < len(body):
                    j += 1
                    text = text[:-1] + " " + body[j].strip()
                out.append(Snippet(path.name, start + 1 + first, text, True, "line"))
                j += 1
    text = "\n".join(prose)
    for m in SPAN.finditer(text):
        span = m.group(2).replace("\\|", "|")  # a `|` in a table cell
        out.append(Snippet(path.name, text.count("\n", 0, m.start()) + 1, " ".join(span.split()), False))
    return out


def commands(snippet: Snippet) -> list[list[str]]:
    """The simple commands of a shell line or code span: comments and redirections dropped, split at `&&`,
    `||`, pipes (a `|` between spaces; one without is a synopsis's alternatives), `$(` and, in a code block,
    `;` (in prose a `;` ends a clause of an error message: `...; edgeglm refuses this checkpoint`)."""
    out = []
    for part in _split(_uncomment(snippet.text), snippet.fenced):
        part = re.sub(r"\d?>>?\s*(&\d|\S+)", " ", part)
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if words:
            out.append(words)
    return out


def _split(text: str, fenced: bool) -> list[str]:
    """`text` cut at the separators outside quotes."""
    separator = re.compile(r"&&|\|\||\s\|\s|\$\(" + (r"|;" if fenced else ""))
    parts, start, quote, i = [], 0, None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif m := separator.match(text, i):
            parts.append(text[start:i])
            start = i = m.end()
            continue
        i += 1
    return [*parts, text[start:]]


def _uncomment(text: str) -> str:
    quote = None
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


WRAPPERS = {"$", "sudo", "exec", "time", "env", "(", "nohup"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def program(words: list[str]) -> tuple[str, list[str]] | None:
    """('edgeglm' | 'python', its arguments) where the words run one of them, else None."""
    i = 0
    while i < len(words) and (words[i] in WRAPPERS or ASSIGNMENT.match(words[i])):
        i += 1
    if "--" in words[i:] and words[i:i + 1] == ["kubectl"]:  # kubectl exec ... -- CMD
        i = words.index("--", i) + 1
    for j in range(i, len(words)):
        name = words[j].rsplit("/", 1)[-1]
        # the program's first word, or a path to it under a command that runs it (`systemd-run ... /opt/x/bin/edgeglm`)
        if j == i or "/bin/" in words[j]:
            if name == "edgeglm":
                return "edgeglm", words[j + 1:]
            if re.fullmatch(r"python[0-9.]*", name):
                return "python", words[j + 1:]
        if j == i and re.fullmatch(r"benchmarks/\w+\.py", words[j]):  # `benchmarks/x.py --flag` in prose
            return "python", words[j:]
    return None


# --- edgeglm commands -------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"^(<[^>]*>|[A-Z][A-Z0-9_]*|\$\{?\w+\}?)$")


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    from agent.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    if parser._subparsers is None:
        return None
    (action,) = [a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _resolve(words: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The parser the leading command words lead to, and how many words they are."""
    parser, i = _parser(), 0
    while (choices := _subcommands(parser)) is not None:
        if i < len(words) and words[i] in choices:
            parser, i = choices[words[i]], i + 1
        elif parser.prog == "edgeglm agent":  # `edgeglm agent [--flags]` is `edgeglm agent run`
            parser = choices["run"]
        else:
            break
    return parser, i


def synopsis_variants(words: list[str]) -> list[list[str]]:
    """A synopsis as command lines: `[...]` and `...` dropped, each `a|b` alternative taken once (others at
    their first); `fleet offer|config set|device remove --config F` gives one command per subcommand."""
    words = [w.strip("[]").removesuffix("...") for w in words]
    words = [w for w in words if w]
    parser, i = _resolve(words)
    if i < len(words) and "|" in words[i] and _subcommands(parser) is not None:
        alternatives = " ".join(words[i:]).split("|")
        last = alternatives[-1].split()
        n = _resolve([*words[:i], *last])[1] - i
        tail = last[n:]
        return [v for alt in [*alternatives[:-1], " ".join(last[:n])]
                for v in synopsis_variants([*words[:i], *alt.split(), *tail])]
    for j, word in enumerate(words):
        if "|" in word:
            alternatives = [a for a in word.split("|") if a]
            first = [*words[:j], alternatives[0], *words[j + 1:]]
            return [*synopsis_variants(first),
                    *(v for a in alternatives[1:] for v in synopsis_variants([*words[:j], a, *words[j + 1:]])[:1])]
    return [words]


def _dummy(action: argparse.Action, word: str | None) -> str | None:
    """`word` as this option's value, a placeholder (BUNDLE, N, <x>) made one the option takes."""
    if action.choices is not None:
        return word if word in action.choices or (word and not PLACEHOLDER.match(word)) else next(iter(action.choices))
    if word is not None and not PLACEHOLDER.match(word):
        return word
    if action.type is None:
        return word or "x"
    return "1"


def check_edgeglm(argv: list[str], fragment: bool) -> str | None:
    """None if `edgeglm ARGV` parses; else what is wrong. A fragment (a code span in prose: `edgeglm export
    --chunk-kib`) may leave out required arguments and the values of its flags."""
    for variant in synopsis_variants(argv):
        parser, i = _resolve(variant)
        if _subcommands(parser) is not None and i < len(variant) and not variant[i].startswith("-"):
            return f"`{parser.prog}` has no command {variant[i]}"
        words, k = list(variant[:i]), i
        positionals_typed = any(a.type is not None for a in parser._actions if not a.option_strings)
        while k < len(variant):
            word = variant[k]
            k += 1
            if not word.startswith("--") or word == "--":
                words.append("1" if positionals_typed and PLACEHOLDER.match(word) else word)
                continue
            flag, eq, value = word.partition("=")
            action = parser._option_string_actions.get(flag)
            if action is None:
                return f"`{parser.prog}` has no option {flag}"
            if action.nargs == 0:
                words.append(word)
            elif eq:
                words.append(f"{flag}={_dummy(action, value)}")
            else:
                following = variant[k] if k < len(variant) and not variant[k].startswith("-") else None
                k += following is not None
                value = _dummy(action, following)
                words += [flag] if value is None or (following is None and not fragment) else [flag, value]
                if action.nargs in ("+", "*"):
                    while k < len(variant) and not variant[k].startswith("-"):
                        words.append(variant[k])
                        k += 1
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                _parser().parse_args(words)
        except SystemExit as exc:
            if exc.code in (0, None):  # --help, --version
                continue
            message = (err.getvalue().strip().splitlines() or ["?"])[-1]
            if fragment and "the following arguments are required" in message:
                continue
            return f"does not parse ({' '.join(words)}): {message}"
    return None


# --- python benchmarks/X.py and python -m M ------------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
REPO_PACKAGES = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"benchmarks"}


def python_target(args: list[str]) -> tuple[str, str, list[str]] | None:
    """('script' | 'module', name, the arguments), or None for `python -c` and a bare `python`."""
    if not args or args[0] == "-c":
        return None
    if args[0] == "-m" and len(args) > 1:
        return "module", args[1], args[2:]
    if args[0].endswith(".py"):
        return "script", args[0], args[1:]
    return None


def target_exists(kind: str, name: str) -> bool:
    if kind == "script":
        return (REPO / name).is_file()
    top = name.split(".")[0]
    if top in REPO_PACKAGES:
        base = REPO.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    return importlib.util.find_spec(top) is not None and (top == name or importlib.util.find_spec(name) is not None)


@functools.lru_cache(maxsize=None)
def help_flags(kind: str, name: str) -> frozenset[str]:
    argv = [sys.executable, name, "--help"] if kind == "script" else [sys.executable, "-m", name, "--help"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return frozenset()
    # the options' own lines ("  -s S, --long LONG   help"), not flags their help text mentions
    heads = [re.split(r"\s{2,}", line.strip())[0] for line in proc.stdout.splitlines() if re.match(r"\s+-", line)]
    return frozenset(f for head in heads for f in FLAG.findall(head))


def check_python(args: list[str]) -> str | None:
    target = python_target(args)
    if target is None:
        return None
    kind, name, rest = target
    if kind == "module" and name == "agent.cli":
        return check_edgeglm(rest, fragment=True)
    if not target_exists(kind, name):
        return f"{'no script' if kind == 'script' else 'no module'} {name}"
    flags = {w.split("=", 1)[0] for w in rest if FLAG.fullmatch(w.split("=", 1)[0])}
    if not flags:
        return None
    known = help_flags(kind, name)
    if not known:
        return f"{name} --help failed"
    missing = sorted(flags - known)
    return f"{name} has no option {', '.join(missing)} (its --help)" if missing else None


# --- settings --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def schemas() -> dict[str, type[BaseModel]]:
    from agent.config import AgentConfig
    from fleet.config import FleetConfig

    return {"agent": AgentConfig, "fleet": FleetConfig}


def _submodel(annotation) -> type[BaseModel] | None:
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def has_setting(schema: str, path: list[str]) -> bool:
    model: type[BaseModel] | None = schemas()[schema]
    for part in path:
        if model is None or part.lower() not in model.model_fields:
            return False
        model = _submodel(model.model_fields[part.lower()].annotation)
    return True


def owners(path: list[str]) -> list[str]:
    """The schemas whose settings could be meant: a section only one of them has decides."""
    return [s for s in schemas() if path and path[0].lower() in schemas()[s].model_fields]


DOTTED = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)(?:\s*=\s*\S.*)?$")
BRACKETED = re.compile(r"^\[([a-z_]+(?:\.[a-z_]+)*)\](?:\s+([a-z_]+(?:/[a-z_]+)*))?(?:\s*=\s*\S.*)?$")
FILE_SUFFIXES = {"py", "db", "json", "toml", "md", "onnx", "data", "yaml", "yml", "sig", "pub", "pem", "txt",
                 "safetensors", "env", "service", "sh", "tar", "gz", "ext", "crt", "csr"}
ENV = re.compile(r"(?<![\w])EDGEGLM_[A-Z0-9_]*[A-Z0-9]\b(?![<.*])")


def _code_reference(name: str) -> bool:
    """`ota.bundle`, `http.server`, `model.onnx`: a module or file, no setting."""
    parts = name.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return True
    for n in range(len(parts), 1, -1):
        base = REPO.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    try:  # `http.server`
        return parts[0] in sys.stdlib_module_names and importlib.util.find_spec(".".join(parts[:2])) is not None
    except (ImportError, ValueError):
        return False


def setting_names(snippet: Snippet) -> list[tuple[str, list[str], list[str]]]:
    """(as shown, path, the schemas it may belong to) of each setting a code span names."""
    text = snippet.text.strip()
    text = re.sub(r"^(?:edgeglm )?(?:fleet )?config set (?:\.\.\. )?", "", text)  # `config set ... cache.max_mb=null`
    out = []
    if m := DOTTED.match(text.replace("=", " = ", 1) if "=" in text and " = " not in text else text):
        name = m.group(1)
        path = name.split(".")
        if owners(path) and not _code_reference(name):
            out.append((name, path, owners(path)))
    elif m := BRACKETED.match(text):
        section = m.group(1).split(".")
        for key in (m.group(2) or "").split("/") if m.group(2) else [None]:
            path = section + ([key] if key else [])
            if owners(path):
                out.append((text if not m.group(2) else f"[{m.group(1)}] {key}", path, owners(path)))
    return out


def toml_schema(snippet: Snippet) -> str:
    """fleet for the TOML blocks of docs/fleet.md and those introduced as fleet.toml; else agent."""
    intro = "\n".join(snippet.context.splitlines()[-3:])
    return "fleet" if snippet.doc == "fleet.md" or ("fleet.toml" in intro and "agent.toml" not in intro) else "agent"


def toml_keys(text: str) -> list[list[str]]:
    """Every key path of a TOML block, its commented-out settings (`# api_key = "..."`) too."""
    lines = [re.sub(r"^#\s*(?=[a-z_]+\s*=\s*\S)", "", line) for line in text.splitlines()]
    data = tomllib.loads("\n".join(lines))
    paths: list[list[str]] = []

    def walk(node: dict, prefix: list[str]) -> None:
        for key, value in node.items():
            paths.append([*prefix, key])
            if isinstance(value, dict):
                walk(value, [*prefix, key])

    walk(data, [])
    return paths


def other_variables() -> set[str]:
    """EDGEGLM_* names the code reads that are no setting (EDGEGLM_CACHE_DIR)."""
    from agent.config import OTHER_VARIABLES

    names = {f"EDGEGLM_{n}" for n in OTHER_VARIABLES}
    for folder in ("agent", "fleet", "runtime", "ota", "models"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(re.findall(r"os\.environ(?:\.get)?[(\[]\s*[\"'](EDGEGLM_[A-Z0-9_]+)", path.read_text()))
            names.update(re.findall(r"getenv\(\s*[\"'](EDGEGLM_[A-Z0-9_]+)", path.read_text()))
    return names


def check_variable(name: str) -> str | None:
    rest = name.removeprefix("EDGEGLM_")
    if "__" not in rest:
        if has_setting("agent", [rest]) or has_setting("fleet", [rest]) or name in _other_variables():
            return None
        return "is no setting (nested settings take two underscores: EDGEGLM_SECTION__KEY) and no variable " \
               "the code reads"
    path = rest.split("__")
    if any(has_setting(s, path) for s in owners(path)):
        return None
    return f"is no setting of {' or '.join(owners(path)) or 'the agent or the fleet controller'}"


@functools.lru_cache(maxsize=1)
def _other_variables() -> frozenset[str]:
    return frozenset(other_variables())


# --- the checks ------------------------------------------------------------------------------------------

def _problem(snippet: Snippet, shown: str, what: str) -> tuple[str, str, str]:
    return snippet.doc, shown, f"{snippet.doc}:{snippet.line}: `{shown}` {what}"


def _output(args: list[str]) -> list[str] | None:
    """None for a command line. For edgeglm's output (`edgeglm build: interrupted`, a command word ending in
    `:`): [], or for a usage error (`edgeglm fleet status: error: unrecognized arguments: --jsn`) the command
    it is about, `fleet status --jsn`, which ALLOWED lists and which must stay refused."""
    for i, word in enumerate(args):
        if word.startswith("-"):
            return None
        if word.endswith(":"):
            m = re.match(r"error: unrecognized arguments: (.*?)(?: \(|$)", " ".join(args[i + 1:]))
            return [*args[:i], word[:-1], *m.group(1).split()] if m else []
    return None


def command_problems(docs: list[Path]) -> list[tuple[str, str, str]]:
    problems = []
    for path in docs:
        for snippet in snippets(path):
            if snippet.fenced and snippet.lang != "line":
                continue
            for words in commands(snippet):
                found = program(words)
                if found is None or found[0] != "edgeglm":
                    continue
                args = found[1]
                if (output := _output(args)) is not None:  # its output: `edgeglm build: interrupted ...`
                    if not output:
                        continue
                    args = output
                shown = " ".join(["edgeglm", *args])
                if (why := check_edgeglm(args, fragment=not snippet.fenced)) is not None:
                    problems.append(_problem(snippet, shown, why))
    return problems


def python_problems(docs: list[Path]) -> list[tuple[str, str, str]]:
    found = []
    for path in docs:
        for snippet in snippets(path):
            if snippet.fenced and snippet.lang != "line":
                continue
            for words in commands(snippet):
                run = program(words)
                if run is not None and run[0] == "python":
                    found.append((snippet, run[1]))
    # every --help needed, at once (a benchmark's --help may take a few seconds: it imports its peers)
    wanted = {t[:2] for _, args in found if (t := python_target(args)) and t[2] and target_exists(*t[:2])
              and t[1] != "agent.cli" and any(FLAG.fullmatch(w.split("=", 1)[0]) for w in t[2])}
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda t: help_flags(*t), sorted(wanted)))
    problems = []
    for snippet, args in found:
        if (why := check_python(args)) is not None:
            problems.append(_problem(snippet, " ".join(["python", *args]), why))
    # a script named in prose (`benchmarks/long_prompt.py`) exists
    for path in docs:
        for snippet in snippets(path):
            if not snippet.fenced:
                for name in re.findall(r"(?<![\w/.])(benchmarks/\w+\.py)\b", snippet.text):
                    if not (REPO / name).is_file():
                        problems.append(_problem(snippet, name, "names no script"))
    return problems


def setting_problems(docs: list[Path]) -> list[tuple[str, str, str]]:
    problems = []
    for path in docs:
        for snippet in snippets(path):
            if snippet.fenced and snippet.lang == "toml":
                schema = toml_schema(snippet)
                for key in toml_keys(snippet.text):
                    if not has_setting(schema, key):
                        problems.append(_problem(snippet, ".".join(key), f"is no {schema} setting ({schema} TOML "
                                                                         "block)"))
            elif not snippet.fenced:
                for shown, key, schemas_ in setting_names(snippet):
                    if not any(has_setting(s, key) for s in schemas_):
                        problems.append(_problem(snippet, shown, f"is no {' or '.join(schemas_)} setting"))
            if snippet.fenced and snippet.lang in ("toml", "json", "python"):
                continue
            if snippet.fenced and snippet.lang != "line":
                continue
            for name in dict.fromkeys(ENV.findall(snippet.text)):
                if (why := check_variable(name)) is not None:
                    problems.append(_problem(snippet, name, why))
    return problems


def _unexpected(problems: list[tuple[str, str, str]]) -> list[str]:
    return [line for doc, shown, line in problems if (doc, shown) not in ALLOWED]


@functools.lru_cache(maxsize=None)
def problems_of_the_docs(kind: str) -> list[tuple[str, str, str]]:
    return {"commands": command_problems, "python": python_problems, "settings": setting_problems}[kind](DOCS)


def test_edgeglm_commands_in_the_docs_parse():
    problems = _unexpected(problems_of_the_docs("commands"))
    assert not problems, "\n".join(problems)


def test_python_commands_in_the_docs_name_existing_scripts_and_their_flags():
    problems = _unexpected(problems_of_the_docs("python"))
    assert not problems, "\n".join(problems)


def test_settings_and_variables_in_the_docs_exist():
    problems = _unexpected(problems_of_the_docs("settings"))
    assert not problems, "\n".join(problems)


def test_every_allowed_exception_is_still_there():
    """An entry no problem matches is stale (the doc was changed, or the example no longer fails: `--jsn`
    became a flag); remove it."""
    seen = {(doc, shown) for kind in ("commands", "python", "settings") for doc, shown, _ in problems_of_the_docs(kind)}
    stale = [f"{doc}: {shown}" for doc, shown in ALLOWED if (doc, shown) not in seen]
    assert not stale, "ALLOWED entries that match nothing any more (remove them): " + "; ".join(stale)


def test_the_docs_are_read():
    """The extraction finds what the docs hold: a broken parser of Markdown would pass everything."""
    everything = [s for path in DOCS for s in snippets(path)]
    edgeglm = [w for s in everything if not s.fenced or s.lang == "line" for w in commands(s)
               if (p := program(w)) and p[0] == "edgeglm"]
    python = [w for s in everything if not s.fenced or s.lang == "line" for w in commands(s)
              if (p := program(w)) and p[0] == "python" and python_target(p[1])]
    tomls = [s for s in everything if s.fenced and s.lang == "toml"]
    assert len(edgeglm) > 60 and len(python) > 15, (len(edgeglm), len(python))
    assert {toml_schema(s) for s in tomls} == {"agent", "fleet"}
    assert sum(len(setting_names(s)) for s in everything) > 100
    assert len({n for s in everything for n in ENV.findall(s.text)}) > 10


# --- the checks fail on a mistake: copies of docs with one added -----------------------------------------

@pytest.mark.parametrize("doc,old,new,found", [
    ("deploy-k3s.md", "--group default --to 1.0.0", "--group default --to 1.0.0 --bogus-flag",
     "`edgeglm fleet rollback` has no option --bogus-flag"),
    ("runtime.md", "`edgeglm bench --concurrency N`", "`edgeglm bench --concurency N`",
     "`edgeglm bench` has no option --concurency"),
    ("README.md", "`edgeglm demo [--workdir DIR]", "`edgeglm demoo [--workdir DIR]", "`edgeglm` has no command demoo"),
    ("install.md", "edgeglm agent install [--prefix DIR]", "edgeglm agent install --port 9 [--prefix DIR]",
     "`edgeglm agent install` has no option --port"),
    ("scaling.md", "--steps 500,1000,2000,4000 --keep-going", "--steps 500 --keep-goin",
     "benchmarks/fleet_scale.py has no option --keep-goin"),
    ("scaling.md", "python benchmarks/fleet_scale.py --controller-src", "python benchmarks/fleet_scal.py --x",
     "no script benchmarks/fleet_scal.py"),
    ("http-api.md", "max_body_bytes = 1048576", "max_body_byte = 1048576", "`http.max_body_byte` is no agent"),
    ("install.md", "ca_file = \"/etc/edgeglm/ca.pem\"", "cafile = \"/etc/edgeglm/ca.pem\"", "`mqtt.tls.cafile`"),
    ("ota.md", "`ota.probation_s`", "`ota.probation_secs`", "`ota.probation_secs` is no agent setting"),
    ("fleet.md", "`[database] retention_s`", "`[database] retention`", "`[database] retention` is no fleet"),
    ("http-api.md", "EDGEGLM_SAMPLING__MAX_TOKENS=64", "EDGEGLM_SAMPLING__MAXTOKENS=64",
     "`EDGEGLM_SAMPLING__MAXTOKENS` is no setting"),
])
def test_a_mistake_added_to_a_copy_is_found(tmp_path, doc, old, new, found):
    source = REPO / doc if doc == "README.md" else REPO / "docs" / doc
    text = source.read_text()
    assert old in text, old
    copy = tmp_path / doc
    copy.write_text(text.replace(old, new, 1))
    problems = [line for *_, line in command_problems([copy]) + python_problems([copy]) + setting_problems([copy])]
    assert any(found in line for line in problems), problems
