"""Writing one benchmark's section of ``benchmarks/README.md``, leaving the other sections alone."""

from __future__ import annotations

from pathlib import Path


def update_readme(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with ``heading`` (a ``## ...`` line), or append it."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start < 0:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + section + ("\n" if nxt >= 0 else "") + text[end:]
    path.write_text(text.rstrip("\n") + "\n")
