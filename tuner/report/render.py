"""The report's text as sections of paragraphs, tables and bullets, and that text rendered
as Markdown (summary.md) and as one self-contained HTML page (index.html)."""

from __future__ import annotations

import base64
import dataclasses
import html
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""  # a heading of its own, for a section with one table per problem


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    bullets: list[str] = dataclasses.field(default_factory=list)


def config_text(config: dict[str, Any]) -> str:
    """A config as `name=value` pairs (`default`-free: every tunable is listed)."""
    if not config:
        return "(no tunables)"
    return " ".join(f"{name}={value}" for name, value in config.items())


def number_text(value: float | None, digits: int = 1, suffix: str = "") -> str:
    """A figure with `digits` decimals; a dash where there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"


def shortened(label: str, width: int = 60) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section], images: list[Path]) -> str:
    lines = ["# attnbench sweep report", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for table in section.tables:
            if table.caption:
                lines += [f"**{_markdown_cell(table.caption)}**", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "|".join("---" for _ in table.columns) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(_markdown_cell(c) for c in row) + " |")
            lines.append("")
        for bullet in section.bullets:
            lines.append(f"- {bullet}")
        if section.bullets:
            lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines)


def _inline_code(text: str) -> str:
    """HTML-escapes `text` and turns Markdown's `code` and **bold** into tags."""
    escaped = html.escape(text)
    parts = escaped.split("`")
    escaped = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0 1.5em; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""


def render_html(sections: list[Section], images: list[Path], title: str) -> str:
    """One self-contained page: the summary's tables and the plots embedded as data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{_inline_code(p)}</p>" for p in section.paragraphs]
        for table in section.tables:
            caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
            body.append(f"<table>{caption}<tr>" + "".join(f"<th>{html.escape(c)}</th>"
                                                for c in table.columns) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                     for row in table.rows]
            body.append("</table>")
        if section.bullets:
            body.append("<ul>" + "".join(f"<li>{_inline_code(b)}</li>" for b in section.bullets)
                        + "</ul>")
    if images:
        body.append("<h2>Plots</h2>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(image.stem)}">'
                    f"<figcaption>{html.escape(image.name)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
