"""Text sources: the embedded corpus (no download) and the user's files, folders and token files.

The embedded corpus is the documentation that ships with Python: the ``pydoc_data.topics`` help
pages (the language reference, ~0.5 MB) followed by the docstrings of a fixed list of standard
library modules, read with ``ast`` from their source files (nothing is imported). Documents come
in a fixed order, so every rank and every run builds the same text for a given Python version.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

# Standard-library modules whose docstrings join the corpus (pure-Python sources, documented in prose).
STDLIB_MODULES = (
    "argparse", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email/message",
    "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http/client",
    "http/cookiejar", "imaplib", "inspect", "ipaddress", "json/__init__", "json/decoder", "json/encoder",
    "logging/__init__", "logging/handlers", "mailbox", "mimetypes", "multiprocessing/pool", "netrc",
    "ntpath", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform",
    "poplib", "posixpath", "pprint", "pydoc", "queue", "random", "re/__init__", "sched", "secrets",
    "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "turtle", "typing", "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings",
    "weakref", "zipfile", "zipfile/__init__",
)

# Suffixes read as text when the user passes a folder (a single file is read whatever its name).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".html", ".tex", ".json", ".csv")
TOKEN_SUFFIX = ".bin"


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                name = getattr(node, "name", path.stem)
                out.append(f"{name}\n{doc}")
    return out


def embedded_documents() -> list[str]:
    """The embedded corpus as a list of documents (help topics, then stdlib docstrings)."""
    from pydoc_data.topics import topics

    docs = [f"{key}\n{'*' * len(key)}\n{topics[key].strip()}" for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen = set()
    for name in STDLIB_MODULES:
        path = stdlib / f"{name}.py"
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        docs.extend(_docstrings(path))
    return docs


def _cache_path() -> Path:
    import hashlib
    import sys

    key = hashlib.sha256(("\n".join(STDLIB_MODULES) + sys.version).encode()).hexdigest()[:16]
    root = Path(os.environ.get("HVDLLM_CACHE", Path.home() / ".cache" / "hvdllm"))
    return root / f"corpus-{key}.txt"


def embedded_text() -> str:
    """The embedded corpus as one string; documents are separated by a blank line.

    Parsing the stdlib sources takes seconds, so the text is cached under ``$HVDLLM_CACHE``
    (default ``~/.cache/hvdllm``), keyed by the Python version and module list; written atomically.
    """
    path = _cache_path()
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = "\n\n".join(embedded_documents()) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return text


def list_sources(path: str) -> tuple[list[Path], str]:
    """Files behind ``path`` and their kind: ``"text"`` or ``"tokens"`` (uint16 ``.bin`` files).

    A folder contributes its text files (by suffix) or, if it holds any, its ``.bin`` files, sorted
    by relative path so the order is the same everywhere. Raises ValueError (one line) when the path
    is missing, or holds no usable or only empty files.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--data {path}: no such file or directory")
    if p.is_file():
        files = [p]
    else:
        every = sorted((f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts)), key=lambda f: f.relative_to(p).as_posix())
        bins = [f for f in every if f.suffix == TOKEN_SUFFIX]
        files = bins or [f for f in every if f.suffix.lower() in TEXT_SUFFIXES]
        if not files:
            raise ValueError(f"--data {path}: the folder holds no text files ({', '.join(TEXT_SUFFIXES)}) "
                             f"or token files ({TOKEN_SUFFIX})")
    kinds = {"tokens" if f.suffix == TOKEN_SUFFIX else "text" for f in files}
    if len(kinds) > 1:
        raise ValueError(f"--data {path}: mixes .bin token files and text files; pass one kind")
    kind = kinds.pop()
    if sum(os.path.getsize(f) for f in files) == 0:
        raise ValueError(f"--data {path}: is empty")
    if kind == "tokens" and any(os.path.getsize(f) % 2 for f in files):
        bad = next(f for f in files if os.path.getsize(f) % 2)
        raise ValueError(f"--data {bad}: a .bin token file must hold uint16 tokens (an even number of bytes)")
    return files, kind


def read_text_files(files: list[Path]) -> str:
    """Concatenate text files (UTF-8; undecodable bytes replaced), separated by blank lines."""
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
