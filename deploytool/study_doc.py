"""The study document (docs/routing.md by default): one section per study, each between markers that a
later study of the same name replaces, the other sections kept; and the checks on its path, made before
any training so that minutes of runs are never lost at the write.

Both studies use it: penalty_study (a built-in model's recipe varied) and lm_study (a top-k language model
made top-1 four ways).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploytool import io
from deploytool.errors import BadInput

INTRO = """# Routing study: making the router commit to one expert

Hard accuracy routes each test sample (each token, for a token-level router) to its top-1 expert only (what
inference does); soft accuracy blends experts with the router's weights (what training sees). *Confident* =
share of routing decisions (over every router) whose top routing probability is >= 0.99. Worst = worst over
seeds. Each model's section below is rewritten by `deploytool study --model NAME`.
"""


def section_markers(name: str) -> tuple[str, str]:
    """The HTML comments that open and close a study's section in the document.

    Args:
        name: the section's name (a built-in model's, or `lm: FOLDER` for a language model's study).

    Returns:
        (begin, end).
    """
    return f"<!-- study: {name} -->", f"<!-- /study: {name} -->"


def merge_section(existing: str | None, section: str, name: str) -> str:
    """`existing` document with `name`'s section replaced (or appended); a new document if None.

    Args:
        existing: the document's text, or None.
        section: the new section, between section_markers(name).
        name: the section's name.

    Returns:
        The whole document.
    """
    begin, end = section_markers(name)
    if existing is None:
        return f"{INTRO}\n{section}\n"
    if begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return existing.rstrip("\n") + "\n\n" + section + "\n"


def check_out(out: str | Path) -> tuple[Path, str | None]:
    """The document's path, checked before any training, and its text now (None for a new file).

    Args:
        out: the markdown file the study writes its section into.

    Returns:
        (the path, its current text or None).

    Raises:
        BadInput: a directory, a name not ending in .md, a parent that cannot be written, something that is
            not a regular file, or a file that is not text.
    """
    from deploytool.training import check_writable_parent

    out = Path(out)
    if out.is_dir():
        raise BadInput(f"output path {out} is a directory; give a markdown file path")
    if out.suffix.lower() != ".md":
        raise BadInput(f"output path {out} must end in .md (the study is written as markdown)")
    check_writable_parent(out, "output file")  # before minutes of training, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    out = io.check_parent_dir(out)
    if out.exists() and not out.is_file():
        raise BadInput(f"output path {out} is not a regular file")
    if not out.is_file():
        return out, None
    try:
        return out, out.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"output file {out} is not a text (markdown) file; give another path") from exc


def write_section(out: Path, existing: str | None, section: str, name: str) -> None:
    """Write the document at `out` (check_out's path and text) with `name`'s section replaced."""
    io.write_bytes(out, merge_section(existing, section, name).encode())


def pick(names: list[str] | None, known: dict[str, Any], what: str) -> list[str]:
    """The study's configurations: `names` (in order, once each) when given, else every one `known`.

    Raises:
        BadInput: a name `known` does not hold.
    """
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInput(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))
