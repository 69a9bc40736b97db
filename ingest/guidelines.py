"""Guideline documents → chunks with source metadata, ready to embed.

Reads Markdown, plain text, HTML and PDF files from a folder. Markdown and text files may start with a
front-matter block (``---`` lines around ``key: value`` pairs naming title, guideline, issuer, year, url and
licence); HTML documents carry the same keys in ``<meta name=...>`` tags, PDFs in their document info.
Documents are split at Markdown headings (HTML headings are converted to Markdown first; PDFs split per
page) and then into pieces small enough for all-MiniLM-L6-v2's 256 word-piece window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CHUNK_SIZE = 800
"""Most characters in one chunk's embedded text (heading prefix included): stays under 256 word pieces."""
CHUNK_OVERLAP = 100
SPLITTER_VERSION = "md-headers+recursive/1"
"""Changes whenever the splitting logic changes, so that indexes built with an older one are rebuilt."""

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES | TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
METADATA_KEYS = ("title", "guideline", "issuer", "year", "url", "licence")
UNKNOWN_LICENCE = "not stated in the document"

_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_FIRST_HEADING = re.compile(r"^#\s+(.+?)\s*$", re.MULTILINE)
_HEADERS = [("#", "h1"), ("##", "h2"), ("###", "h3")]
_META_ALIASES = {"license": "licence", "publisher": "issuer", "dc.title": "title", "dc.publisher": "issuer"}


class GuidelineDocumentError(ValueError):
    """A guideline document could not be read; the message names the file."""


@dataclass(frozen=True)
class GuidelineDocument:
    """One loaded document: Markdown-ish text plus its source metadata."""

    source: str
    """File name relative to the corpus folder."""
    text: str
    title: str
    guideline: str = ""
    issuer: str = ""
    year: str = ""
    url: str = ""
    licence: str = UNKNOWN_LICENCE
    pages: tuple[str, ...] = ()
    """PDF only: the text of each page (then `text` is their concatenation)."""


@dataclass(frozen=True)
class Chunk:
    """A piece of one document's section, with the metadata a citation needs."""

    text: str
    source: str
    title: str
    section: str
    url: str
    licence: str
    issuer: str = ""
    year: str = ""

    @property
    def embedding_text(self) -> str:
        """What gets embedded: title and section heading give each piece its topic."""
        return f"{_prefix(self.title, self.section)}{self.text}"


@dataclass(frozen=True)
class SkippedDocument:
    """A file in the corpus folder that was not indexed, and why."""

    source: str
    reason: str


@dataclass
class LoadResult:
    """Documents read from a folder plus the files that were skipped."""

    documents: list[GuidelineDocument] = field(default_factory=list)
    skipped: list[SkippedDocument] = field(default_factory=list)


def shipped_corpus_dir() -> Path:
    """The starter corpus that ships with FederiMed (summaries in the project's own words)."""
    return Path(__file__).resolve().parent / "guidelines"


def corpus_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, sorted, whether or not its format is supported."""
    if not folder.is_dir():
        raise GuidelineDocumentError(f"{folder}: guideline folder not found")
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_documents(folder: Path) -> LoadResult:
    """Load every supported document below `folder`; unreadable or unsupported files are reported."""
    result = LoadResult()
    for path in corpus_files(folder):
        source = path.relative_to(folder).as_posix()
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            result.skipped.append(SkippedDocument(source, f"unsupported format {path.suffix or '(none)'!r}"))
            continue
        try:
            document = load_document(path, source=source)
        except GuidelineDocumentError as error:
            result.skipped.append(SkippedDocument(source, str(error)))
            continue
        result.documents.append(document)
    return result


def load_document(path: Path, *, source: str | None = None) -> GuidelineDocument:
    """Read one document; raises GuidelineDocumentError naming the file when it cannot be read."""
    source = source or path.name
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        document = _load_pdf(path, source)
    elif suffix in HTML_SUFFIXES:
        document = _load_html(path, source)
    elif suffix in MARKDOWN_SUFFIXES | TEXT_SUFFIXES:
        document = _load_markdown(path, source)
    else:
        raise GuidelineDocumentError(f"{path}: unsupported format {suffix or '(none)'!r}")
    if not document.text.strip():
        raise GuidelineDocumentError(f"{path}: no text found")
    return document


def split_document(document: GuidelineDocument) -> list[Chunk]:
    """Split at headings (pages for PDFs), then into pieces whose embedding text fits CHUNK_SIZE."""
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    if document.pages:
        sections = [(f"Page {number}", text) for number, text in enumerate(document.pages, 1)]
    else:
        splitter = MarkdownHeaderTextSplitter(headers_to_split_on=_HEADERS, strip_headers=True)
        sections = [
            (" > ".join(part.metadata[key] for key in ("h2", "h3") if part.metadata.get(key)), part.page_content)
            for part in splitter.split_text(document.text)
        ]
    chunks = []
    for section, text in sections:
        for piece in _split_to_fit(text, CHUNK_SIZE - len(_prefix(document.title, section))):
            chunks.append(Chunk(
                text=piece, source=document.source, title=document.title, section=section,
                url=document.url, licence=document.licence, issuer=document.issuer, year=document.year,
            ))
    return chunks


def split_documents(documents: list[GuidelineDocument]) -> list[Chunk]:
    """All chunks of all documents, in document order."""
    return [chunk for document in documents for chunk in split_document(document)]


def _prefix(title: str, section: str) -> str:
    return f"{title} - {section}\n" if section else f"{title}\n"


def _split_to_fit(text: str, size: int) -> list[str]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=min(CHUNK_OVERLAP, size // 4))
    return [piece.strip() for piece in splitter.split_text(text) if piece.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise GuidelineDocumentError(f"{path}: not UTF-8 text (byte {error.start})") from error
    except OSError as error:
        raise GuidelineDocumentError(f"{path}: cannot read ({error.strerror})") from error


def _load_markdown(path: Path, source: str) -> GuidelineDocument:
    text = _read_text(path)
    meta: dict[str, str] = {}
    match = _FRONT_MATTER.match(text)
    if match:
        meta = _parse_front_matter(match.group(1), path)
        text = text[match.end():]
    if "title" not in meta:
        heading = _FIRST_HEADING.search(text)
        meta["title"] = heading.group(1) if heading else _title_from_name(path)
    return _document(source, text, meta)


def _parse_front_matter(block: str, path: Path) -> dict[str, str]:
    meta = {}
    for number, line in enumerate(block.splitlines(), 2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise GuidelineDocumentError(f"{path}: line {number}: front matter needs 'key: value', got {line!r}")
        key = key.strip().lower().replace("license", "licence")
        if key in METADATA_KEYS:
            meta[key] = value.strip().strip("'\"")
    return meta


def _load_html(path: Path, source: str) -> GuidelineDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_read_text(path), "html.parser")
    meta: dict[str, str] = {}
    for tag in soup.find_all("meta", attrs={"name": True, "content": True}):
        key = _META_ALIASES.get(tag["name"].strip().lower(), tag["name"].strip().lower())
        if key in METADATA_KEYS and tag["content"].strip():
            meta.setdefault(key, tag["content"].strip())
    canonical = soup.find("link", rel="canonical")
    if "url" not in meta and canonical and canonical.get("href"):
        meta["url"] = canonical["href"]
    if "title" not in meta and soup.title and soup.title.get_text(strip=True):
        meta["title"] = soup.title.get_text(strip=True)
    for tag in soup(["script", "style", "noscript", "head", "nav", "footer"]):
        tag.decompose()
    for heading in soup.find_all(re.compile(r"^h[1-6]$")):
        level = min(int(heading.name[1]), 3)
        heading.replace_with(f"\n\n{'#' * level} {heading.get_text(' ', strip=True)}\n\n")
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if "title" not in meta:
        heading = _FIRST_HEADING.search(text)
        meta["title"] = heading.group(1) if heading else _title_from_name(path)
    return _document(source, text, meta)


def _load_pdf(path: Path, source: str) -> GuidelineDocument:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        pages = tuple(re.sub(r"[ \t]+", " ", page.extract_text() or "").strip() for page in reader.pages)
        info = reader.metadata or {}
    except Exception as error:  # pypdf raises many exception types on malformed files
        raise GuidelineDocumentError(f"{path}: unreadable PDF ({type(error).__name__}: {error})") from error
    meta = {
        key: str(info[name]).strip()
        for key, name in (("title", "/Title"), ("issuer", "/Author"), ("guideline", "/Subject"),
                          ("url", "/URL"), ("licence", "/Licence"), ("year", "/Year"))
        if info.get(name) and str(info[name]).strip()
    }
    meta.setdefault("title", _title_from_name(path))
    return _document(source, "\n\n".join(pages), meta, pages=pages)


def _document(source: str, text: str, meta: dict[str, str], pages: tuple[str, ...] = ()) -> GuidelineDocument:
    return GuidelineDocument(
        source=source, text=text, pages=pages, title=meta["title"],
        guideline=meta.get("guideline", ""), issuer=meta.get("issuer", ""), year=meta.get("year", ""),
        url=meta.get("url", ""), licence=meta.get("licence") or UNKNOWN_LICENCE,
    )


def _title_from_name(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip().capitalize()
