"""Documents for vector stores: the text of an uploaded file (plain text, Markdown, HTML, PDF) and
its chunks, windows of a model's tokens that overlap, as OpenAI's static chunking strategy cuts
them."""

import html.parser
import io
from pathlib import PurePath

from ..errors import InvalidParameter

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".csv", ".json", ".jsonl", ".py", ".log", ""}


def text_of(filename: str, data: bytes) -> str:
    """The file's text; InvalidParameter ("file") for a kind that is not read, or no text at all."""
    suffix = PurePath(filename).suffix.lower()
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        text = _pdf_text(data)
    elif suffix in (".html", ".htm") or data.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        text = _html_text(data.decode("utf-8", errors="replace"))
    elif suffix in TEXT_SUFFIXES or b"\0" not in data[:4096]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameter("file", f"{filename} is not UTF-8 text, Markdown, HTML or PDF") from None
    else:
        raise InvalidParameter("file", f"{filename} is not text, Markdown, HTML or PDF")
    if not text.strip():
        raise InvalidParameter("file", f"{filename} holds no text")
    return text


def chunks(tokenizer, text: str, max_tokens: int, overlap: int) -> list[tuple[str, int]]:
    """(text, token count) windows of `max_tokens` tokens, each starting `max_tokens - overlap`
    after the one before (the last may be shorter)."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    offsets = encoding.offsets
    step = max(1, max_tokens - overlap)
    out = []
    for start in range(0, max(1, len(offsets)), step):
        window = offsets[start:start + max_tokens]
        if not window:
            break
        out.append((text[window[0][0]:window[-1][1]], len(window)))
        if start + max_tokens >= len(offsets):
            break
    return out


def _pdf_text(data: bytes) -> str:
    try:
        from pypdf import PdfReader  # the `retrieval` extra
        from pypdf.errors import PdfReadError
    except ImportError:
        raise InvalidParameter("file", 'PDF files need pypdf on the server: pip install "pyserve[retrieval]"') from None
    try:
        return "\n\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages)
    except (PdfReadError, ValueError, KeyError) as exc:
        raise InvalidParameter("file", f"the PDF cannot be read: {exc}") from None


class _TextOfHTML(html.parser.HTMLParser):
    SKIPPED = {"script", "style", "head", "noscript", "template"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre"}

    def __init__(self):
        super().__init__()
        self.parts, self._skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self._skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED and self._skipping:
            self._skipping -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def _html_text(markup: str) -> str:
    parser = _TextOfHTML()
    parser.feed(markup)
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)
