"""report.html: the report's Markdown as one self-contained HTML page, readable offline.

The report sections produce a small, regular subset of Markdown (headings, paragraphs, ``-``
lists, fenced code, GitHub tables, images on their own line, and inline code, ``**bold**`` and
``_italic_``); :func:`markdown_to_html` renders exactly that subset, so report.md and
report.html always carry the same content. Images are inlined as ``data:image/png;base64`` URIs
and the CSS is embedded: the page loads nothing from anywhere (no CDN, no web fonts, no
scripts). Bold table cells (the best router of a case) are highlighted.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path

HTML = "report.html"

CSS = """
:root { --fg: #1d232a; --muted: #5b6570; --line: #d8dde3; --head: #f1f4f7; --zebra: #fafbfc;
        --best: #e3f4e8; --best-fg: #0b6b2c; --accent: #2f5d8a; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1600px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; margin: 1.8em 0 0.5em; padding-bottom: 0.2em; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; color: var(--accent); }
p, li { max-width: 75em; }
code { font: 0.9em/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
       background: #f3f5f7; padding: 0.05em 0.3em; border-radius: 3px; }
pre { background: #f3f5f7; padding: 10px 14px; border-radius: 4px; overflow-x: auto; }
pre code { background: none; padding: 0; }
nav { background: var(--head); border: 1px solid var(--line); border-radius: 4px;
      padding: 6px 14px; display: inline-block; }
nav ul { margin: 0.3em 0; padding-left: 1.2em; }
a { color: var(--accent); }
.table-wrap { overflow-x: auto; max-height: 640px; overflow-y: auto; border: 1px solid var(--line);
              border-radius: 4px; margin: 0.6em 0; }
table { border-collapse: collapse; font-size: 0.86em; width: max-content; min-width: 100%; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; text-align: left; z-index: 1; }
tbody tr:nth-child(even) { background: var(--zebra); }
tbody tr:hover { background: #eef3f8; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: var(--best); color: var(--best-fg); }
td.case { color: var(--muted); }
figure { margin: 0.6em 0 1em; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.9em; }
td.unreliable { color: #8a5a00; }
td.baseline, tr.baseline td { color: var(--muted); font-style: italic; }
.summary.table-wrap { max-height: none; }
.summary table { font-size: 0.84em; width: 100%; }
.summary td { white-space: normal; padding: 2px 7px; line-height: 1.25; }
figure.headline img { max-height: 350px; width: auto; }
h2#summary { margin-top: 0.6em; }
"""

_TABLE_SEP = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)\s*$")
_CLASS = re.compile(r"^<!--\s*class:\s*(?P<name>[A-Za-z0-9_ -]+?)\s*-->$")  # class of the next block
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<text>.*?)\s*#*\s*$")


# ----------------------------------------------------------------------------- inline

def _inline(text: str) -> str:
    """Inline Markdown to HTML: `code` first (left verbatim), then **bold** and _italic_."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part, quote=False)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w\\])_(?=\S)(.+?)(?<=\S)_(?!\w)", r"<em>\1</em>", part)
        out.append(part)
    return "".join(out)


def _split_row(line: str) -> list[str]:
    """The cells of a table line; ``\\|`` is a literal bar inside a cell."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _table(lines: list[str], css: str = "") -> str:
    header = _split_row(lines[0])
    numeric = [c.strip().endswith(":") for c in _split_row(lines[1])]
    numeric += [False] * (len(header) - len(numeric))
    head = "".join(f'<th{" class=num" if numeric[i] else ""}>{_inline(c)}</th>'
                   for i, c in enumerate(header))
    body = []
    for line in lines[2:]:
        cells = []
        row = _split_row(line)[:len(header)]
        baseline = any(c.endswith("(baseline)") for c in row)  # a reference point: never best
        for i, cell in enumerate(row):
            classes = ["num"] if numeric[i] else []
            if header[i] == "case":
                classes.append("case")
            if baseline:
                classes.append("baseline")
            elif re.fullmatch(r"\*\*.+\*\*", cell):
                classes.append("best")
            if cell.endswith("\u2020"):  # a time that cannot be trusted (summary_section.DAGGER)
                classes.append("unreliable")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_inline(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table-wrap{" " + css if css else ""}"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def data_uri(path: Path) -> str | None:
    """``data:<mime>;base64,...`` of a local file, or None if it cannot be read."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _image(alt: str, src: str, base_dir: Path, css: str = "") -> str:
    """A figure with the image inlined; a local file only (remote sources are never loaded)."""
    uri = None
    if not re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I):  # no scheme: a path beside the report
        target = (base_dir / src).resolve()
        if base_dir.resolve() in target.parents:
            uri = data_uri(target)
    if uri is None:
        return f"<p><em>[image not available: {html.escape(alt)}]</em></p>"
    return (f'<figure{f" class={chr(34)}{css}{chr(34)}" if css else ""}><img alt="{html.escape(alt)}" src="{uri}">'
            f"</figure>")


def _anchor(text: str, used: set[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    anchor, n = slug, 2
    while anchor in used:
        anchor, n = f"{slug}-{n}", n + 1
    used.add(anchor)
    return anchor


# ----------------------------------------------------------------------------- blocks

def markdown_to_html(markdown: str, base_dir: Path) -> tuple[str, str, list[tuple[str, str]]]:
    """(body HTML, the first heading's text, [(anchor, text) of every level-2 heading]).

    Images are looked up relative to ``base_dir`` and inlined.
    """
    lines = markdown.splitlines()
    out, toc, used, title = [], [], set(), ""
    paragraph: list[str] = []
    css = ""  # from a `<!-- class: name -->` line, for the next table or figure

    def flush() -> None:
        if paragraph:
            out.append("<p>" + _inline(" ".join(paragraph)) + "</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
        elif (m := _CLASS.match(stripped)):
            flush()
            css = m["name"]
            i += 1
        elif stripped.startswith("```"):
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
        elif (m := _HEADING.match(stripped)):
            flush()
            level, text = len(m["level"]), m["text"]
            anchor = _anchor(text, used)
            title = title or text
            if level == 2:
                toc.append((anchor, text))
            out.append(f'<h{level} id="{anchor}">{_inline(text)}</h{level}>')
            i += 1
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1].strip()):
            flush()
            end = i + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out.append(_table(lines[i:end], css))
            css = ""
            i = end
        elif (m := _IMAGE.match(stripped)):
            flush()
            out.append(_image(m["alt"], m["src"], base_dir, css))
            css = ""
            i += 1
        elif stripped.startswith(("- ", "* ")):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith(("- ", "* ")):
                items.append("<li>" + _inline(lines[i].strip()[2:]) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            paragraph.append(stripped)
            i += 1
    flush()
    return "\n".join(out), title, toc


def render_html(markdown: str, base_dir: Path) -> str:
    """The whole page: embedded CSS, the content, and a table of contents before the second
    level-2 heading (the first is the summary, which opens the page)."""
    body, title, toc = markdown_to_html(markdown, base_dir)
    if toc:
        nav = ("<nav><strong>Contents</strong><ul>"
               + "".join(f'<li><a href="#{a}">{_inline(t)}</a></li>' for a, t in toc)
               + "</ul></nav>")
        first_h2 = body.find("<h2")
        at = body.find("<h2", first_h2 + 1) if first_h2 >= 0 and "summary" in body[first_h2:first_h2 + 20] else first_h2
        body = body[:at] + nav + "\n" + body[at:] if at >= 0 else body + nav
    title_text = re.sub(r"`", "", title) or "moebench report"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title_text)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def write_html(markdown: str, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` from the report's Markdown; return its path."""
    path = Path(out_dir) / HTML
    path.write_text(render_html(markdown, Path(out_dir)), encoding="utf-8")
    return path
