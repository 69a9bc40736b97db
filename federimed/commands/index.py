"""`federimed index`: build the guideline retrieval index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `index` command to the root app."""

    @app.command("index")
    def index(
        docs_dir: Annotated[Path | None, typer.Argument(
            help="Folder of guideline documents (.md, .txt, .html, .pdf). Default: the shipped starter corpus.",
            show_default=False, resolve_path=True)] = None,
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="Index directory. Default: data/guideline-index.", show_default=False, resolve_path=True)] = None,
        force: Annotated[bool, typer.Option("--force", help="Rebuild even when nothing changed.")] = False,
    ) -> None:
        """Chunk, embed (all-MiniLM-L6-v2) and index guideline documents for the chat's retrieval.

        DOCS_DIR: .md, .txt, .html or .pdf guideline documents; default: the shipped starter corpus.

        An index whose corpus, chunking and model are unchanged is kept; unreadable files are reported.
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from federimed.retrieval import IndexIntegrityError, build_index, default_index_dir
        from ingest.guidelines import GuidelineDocumentError, shipped_corpus_dir

        console = Console()
        docs = docs_dir or shipped_corpus_dir()
        out_dir = out or default_index_dir()
        with Progress(TextColumn("[bold]Embedding chunks"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("embed", total=None)
            try:
                result = build_index(docs, out_dir, force=force,
                                     on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                     total=total))
            except (GuidelineDocumentError, IndexIntegrityError) as error:
                console.print(f"[red]error:[/red] {error}")
                raise typer.Exit(1) from error

        table = Table(title=f"Guideline index {out_dir}", show_header=False)
        table.add_row("corpus", str(docs))
        table.add_row("documents", str(result.documents))
        table.add_row("chunks", str(result.chunks))
        table.add_row("skipped", str(len(result.skipped)))
        table.add_row("status", "built" if result.built else "unchanged, kept existing index")
        console.print(table)
        for skipped in result.skipped:
            console.print(f"[yellow]skipped[/yellow] {skipped.source}: {skipped.reason}")
