"""The environment a user's login sets, read from the login files as text: never executed.

The files are those a login shell reads: /etc/environment (pam_env's
``NAME=value`` lines), then the user's ~/.profile, ~/.bash_profile,
~/.bash_login, ~/.bashrc, ~/.zshenv and ~/.zprofile. A line counts when it
is a plain assignment (``NAME=value``, ``export NAME=value``, several on one
``export`` line), its words split and unquoted as a POSIX shell does. A
value is taken only when it is literal text, quoted or not, and references
to other variables (``$HOME/bin:$PATH``, ``${HOME}``, a leading ``~``),
which are kept so that they expand at the next login as they did before.
Anything else on an assignment's line (an unquoted ``;``, ``|``, ``&``,
``<``, ``>``, ``(``, ``)``, a command ``$(...)`` or backquotes, any other
``$`` expansion, a line continued on the next) makes the shell do more
than assign: such a line is not taken and is listed under "skipped".
A later assignment of the same name wins, as in the shell.

Values are written back (``script``) in a form built from the parsed
pieces, never from the text as stored: a backup may come from anyone.
"""

import re
import shlex

SYSTEM_FILE = "/etc/environment"
HOME_FILES = (".profile", ".bash_profile", ".bash_login", ".bashrc", ".zshenv", ".zprofile")
HISTORY_FILES = (
    ".bash_history",
    ".zsh_history",
    ".histfile",
    ".sh_history",
    ".python_history",
    ".root_hist",
    ".local/share/fish/fish_history",
    ".ipython/profile_default/history.sqlite",
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LEADING = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_REFERENCE = re.compile(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")
_OPERATORS = ";&|<>()"
MAX_FILE = 1 << 20  # a login file larger than this is not read


class NotPlain(ValueError):
    """A line the shell would do more with than assign: its reason."""


def parse(text: str, source: str, system: bool = False) -> tuple[dict[str, dict], list[dict]]:
    """(variables, skipped) of one file: NAME -> {"value", "raw", "source"}.

    ``raw`` is the value as written back: quoted by ``_render``.
    """
    found: dict[str, dict] = {}
    skipped: list[dict] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        leading = _LEADING.match(stripped)
        if not leading or (system and stripped.startswith("export")):
            continue  # a command, a condition, a function: not ours to read (pam_env knows no export)
        where = f"{source}:{number}"
        try:
            for name, parts in _assignments(stripped, system):
                found[name] = {"value": _shown(parts), "raw": _render(parts), "source": where}
        except NotPlain as e:
            skipped.append({"name": leading.group(1), "source": where, "reason": str(e)})
    return found, skipped


def _assignments(line: str, literal: bool) -> list[tuple[str, list]]:
    """The (name, value pieces) of a line of plain assignments; NotPlain otherwise."""
    words = _words(line, literal)
    if words and words[0][0] == "export":
        words = words[1:]
    out = []
    for raw, parts in words:
        m = _ASSIGN.match(raw)
        if m is None:
            raise NotPlain("not a plain assignment (a command follows)")
        first = parts[0][1][len(m.group(0)) :] if parts and parts[0][0] == "text" else None
        if first is None:
            raise NotPlain("not a plain assignment")
        out.append((m.group(1), ([("text", first)] if first else []) + parts[1:]))
    return out


def _words(line: str, literal: bool) -> list[tuple[str, list]]:
    """The words of a line as a POSIX shell splits them: (text as written, pieces).

    Pieces are ("text", literal text) and ("ref", NAME). With ``literal``
    (pam_env), ``$`` and ``~`` are plain characters.
    """
    words: list[tuple[str, list]] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == "#":
            break  # a comment, to the end of the line
        start, parts = i, []
        while i < n and line[i] not in " \t":
            i = _piece(line, i, parts, literal)
        words.append((line[start:i], _merged(parts)))
    return words


def _piece(line: str, i: int, parts: list, literal: bool) -> int:
    """Read one piece of a word at ``i`` into ``parts``; the index after it."""
    c = line[i]
    if c in _OPERATORS:
        raise NotPlain(f"a shell operator ({c!r})")
    if c == "`":
        raise NotPlain("computed by a command")
    if c == "'":
        end = line.find("'", i + 1)
        if end < 0:
            raise NotPlain("unbalanced quotes")
        parts.append(("text", line[i + 1 : end]))
        return end + 1
    if c == '"':
        return _double_quoted(line, i + 1, parts, literal)
    if c == "\\":
        if i + 1 >= len(line):
            raise NotPlain("continued on the next line")
        parts.append(("text", line[i + 1]))
        return i + 2
    if c == "$" and not literal:
        return _reference(line, i, parts)
    if c == "~" and not literal and line[i - 1 : i] in ("=", ":"):
        end = i + 1
        if line[end : end + 1] not in ("", "/", ":", " ", "\t"):
            raise NotPlain("another user's home (~user)")
        parts.append(("ref", "HOME"))
        return end
    parts.append(("text", c))
    return i + 1


def _double_quoted(line: str, i: int, parts: list, literal: bool) -> int:
    while i < len(line):
        c = line[i]
        if c == '"':
            return i + 1
        if c == "`" and not literal:
            raise NotPlain("computed by a command")
        if c == "\\" and i + 1 < len(line) and line[i + 1] in '$`"\\':
            parts.append(("text", line[i + 1]))
            i += 2
        elif c == "$" and not literal:
            i = _reference(line, i, parts)
        else:
            parts.append(("text", c))
            i += 1
    raise NotPlain("unbalanced quotes")


def _reference(line: str, i: int, parts: list) -> int:
    """``$NAME`` or ``${NAME}``: any other expansion runs or changes something (NotPlain)."""
    m = _REFERENCE.match(line, i)
    if m is None:
        what = line[i : i + 2]
        raise NotPlain("computed by a command" if what in ("$(", "$[") else f"an expansion ({what!r}...)")
    parts.append(("ref", m.group(1) or m.group(2)))
    return m.end()


def _merged(parts: list) -> list:
    out: list = []
    for kind, text in parts:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def _shown(parts: list) -> str:
    return "".join(text if kind == "text" else f"${text}" for kind, text in parts)


def _render(parts: list) -> str:
    """A value as one shell word: single quotes for literal text, double quotes around references."""
    if all(kind == "text" for kind, _ in parts):
        return shlex.quote("".join(text for _, text in parts))
    out = []
    for index, (kind, text) in enumerate(parts):
        if kind == "text":
            out.append(re.sub(r'([$`"\\])', r"\\\1", text))
        else:
            after = parts[index + 1][1][:1] if index + 1 < len(parts) else ""
            out.append(f"${{{text}}}" if re.fullmatch(r"[A-Za-z0-9_]", after) else f"${text}")
    return '"' + "".join(out) + '"'


def collect(read) -> dict:
    """The login environment of a home; ``read(path)`` returns a file's text or None.

    Paths are "/etc/environment" and "~/NAME" for files of the home.
    """
    variables: dict[str, dict] = {}
    skipped: list[dict] = []
    files = []
    for path, system in [(SYSTEM_FILE, True)] + [(f"~/{n}", False) for n in HOME_FILES]:
        text = read(path)
        if text is None:
            continue
        files.append(path)
        found, skip = parse(text, path, system)
        variables.update(found)
        skipped += skip
    return {"variables": variables, "skipped": skipped, "files": files}


def script(variables: dict[str, dict]) -> tuple[str, list[str]]:
    """(the shell file that sets the variables again, one ``export`` a line; the names left out).

    Each stored value is parsed again and written back from its pieces:
    one that is not a plain value (a backup made by hand) is left out.
    """
    lines = [
        "# Written by `vml env restore`: the variables the login files of the saved home set.",
        "# Sourced from ~/.profile; delete the line there (or this file) to undo.",
    ]
    refused = []
    for name in sorted(variables):
        raw = variables[name].get("raw") if isinstance(variables[name], dict) else None
        try:
            if not _NAME.fullmatch(name) or not isinstance(raw, str):
                raise NotPlain("not a variable")
            (got, parts), *more = _assignments(f"{name}={raw}", False)
            if more or got != name:
                raise NotPlain("more than one value")
        except NotPlain:
            refused.append(name)
            continue
        lines.append(f"export {name}={_render(parts)}")
    return "\n".join(lines) + "\n", refused


PROFILE_LINE = '[ -r "$HOME/.vml-environment" ] && . "$HOME/.vml-environment"  # added by vml env restore'
