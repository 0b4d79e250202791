"""The environment a user's login sets, read from the login files as text: never executed.

The files are those a login shell reads: /etc/environment (pam_env's
``NAME=value`` lines), then the user's ~/.profile, ~/.bash_profile,
~/.bash_login, ~/.bashrc, ~/.zshenv and ~/.zprofile. A line counts when it
is a plain assignment (``NAME=value``, ``export NAME=value``, several on one
``export`` line); quoting follows the shell (shlex). A value that needs the
shell to compute it (``$(...)`` or backquotes) is not taken, and is listed
under "skipped" instead. References to other variables (``$HOME/bin:$PATH``)
are kept as written, so they expand in the next login as they did before.
A later assignment of the same name wins, as in the shell.
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
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
MAX_FILE = 1 << 20  # a login file larger than this is not read


def parse(text: str, source: str, system: bool = False) -> tuple[dict[str, dict], list[dict]]:
    """(variables, skipped) of one file: NAME -> {"value", "raw", "source"}."""
    found: dict[str, dict] = {}
    skipped: list[dict] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assign = _LEADING.match(stripped)
        if assign and ("$(" in stripped or "`" in stripped):
            skipped.append({"name": assign.group(1), "source": f"{source}:{number}", "reason": "computed by a command"})
            continue
        try:
            words = shlex.split(stripped, comments=True, posix=True)
        except ValueError:
            continue  # unbalanced quotes: part of a construct this reader does not follow
        if not words:
            continue
        if words[0] == "export" and not system:
            words = words[1:]
            raws = _raw_words(stripped[len("export") :])
        else:
            raws = _raw_words(stripped)
        if not words or not all(_ASSIGN.fullmatch(w) for w in words) or len(raws) != len(words):
            continue  # a command, a function, a condition: not a plain assignment
        for word, raw in zip(words, raws, strict=True):
            name, value = _ASSIGN.fullmatch(word).groups()
            raw_value = raw.split("=", 1)[1]
            if "$(" in raw_value or "`" in raw_value:
                skipped.append({"name": name, "source": f"{source}:{number}", "reason": "computed by a command"})
                continue
            if system:  # pam_env expands nothing: keep the value literal
                raw_value = shlex.quote(value)
            found[name] = {"value": value, "raw": raw_value, "source": f"{source}:{number}"}
    return found, skipped


def _raw_words(text: str) -> list[str]:
    """The words of a line as written (quotes kept), split where the shell splits them."""
    words, word, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote:
            word += c
            if c == "\\" and quote == '"' and i + 1 < len(text):
                word, i = word + text[i + 1], i + 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            word, quote = word + c, c
        elif c == "\\" and i + 1 < len(text):
            word, i = word + c + text[i + 1], i + 1
        elif c.isspace():
            if word:
                words.append(word)
            word = ""
        elif c == "#" and not word:
            break
        else:
            word += c
        i += 1
    return words + ([word] if word else [])


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


def script(variables: dict[str, dict]) -> str:
    """The shell file that sets the captured variables again, one ``export`` per line."""
    lines = [
        "# Written by `vml env restore`: the variables the login files of the saved home set.",
        "# Sourced from ~/.profile; delete the line there (or this file) to undo.",
    ]
    for name in sorted(variables):
        if _NAME.fullmatch(name):
            lines.append(f"export {name}={variables[name]['raw']}")
    return "\n".join(lines) + "\n"


PROFILE_LINE = '[ -r "$HOME/.vml-environment" ] && . "$HOME/.vml-environment"  # added by vml env restore'
