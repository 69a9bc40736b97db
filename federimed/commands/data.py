"""Data commands: `ingest`, `ingest-federation` and `audit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_OUT = Path("data/hospitals")
console = Console()


def _ingest_one(sources: list[Path], hospital: str, out: Path, heldout_share: float, seed: int) -> dict:
    """Run the pipeline for one hospital with a progress bar; exits with a clear message on bad input."""
    from ingest.errors import IngestError
    from ingest.pipeline import ingest

    labels = {"read": "reading sources", "cases": "building cases"}
    with Progress(
        TextColumn(f"[bold]{hospital}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            return ingest(sources, hospital, out, heldout_share=heldout_share, seed=seed, progress=report)
        except (IngestError, ValueError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None


def _summary(manifests: list[dict], out: Path) -> None:
    table = Table(title=f"Ingested into {out}")
    columns = ("hospital", "sources", "patients", "cases", "train", "held-out", "train/held-out patients", "skipped")
    for column in columns:
        table.add_column(column, justify="left" if column in ("hospital", "sources") else "right")
    for m in manifests:
        c, s = m["counts"], m["split"]
        kinds = ", ".join(sorted({f"{src['format']} ({src['version']})" for src in m["sources"]}))
        table.add_row(
            m["hospital"], kinds, str(c["patients"]), str(c["cases"]), str(c["train_cases"]), str(c["heldout_cases"]),
            f"{s['train_patients']}/{s['heldout_patients']}", str(c["skipped"]),
        )
    console.print(table)
    for m in manifests:
        for skip in m["skipped"][:10]:
            console.print(f"[yellow]skipped[/] {m['hospital']}: {skip['source']} {skip['location']}: {skip['reason']}")
        if len(m["skipped"]) > 10:
            console.print(f"[yellow]… {len(m['skipped']) - 10} more skipped records listed in manifest.json[/]")


HeldoutShare = Annotated[float, typer.Option(min=0.0, max=0.95, help="Share of patients held out for evaluation.")]
Seed = Annotated[int, typer.Option(help="Seed of the deterministic patient split.")]
Out = Annotated[Path, typer.Option(help="Folder that receives one sub-folder per hospital.", resolve_path=True)]


def register(app: typer.Typer) -> None:
    """Add the data commands to the root app."""

    @app.command("ingest")
    def ingest_cmd(
        sources: Annotated[list[Path], typer.Argument(help="Synthea CSV export folders, FHIR bundles or folders.", resolve_path=True)],
        hospital: Annotated[str, typer.Option(help="Hospital name: the output sub-folder.")],
        out: Out = DEFAULT_OUT,
        heldout_share: HeldoutShare = 0.2,
        seed: Seed = 13,
    ) -> None:
        """Turn Synthea records into de-identified training dialogues and targets for one hospital."""
        _summary([_ingest_one(sources, hospital, out, heldout_share, seed)], out)

    @app.command("ingest-federation")
    def ingest_federation_cmd(
        synth_dir: Annotated[Path, typer.Argument(help="Output of `federimed synth`: <hospital>/fhir folders.", resolve_path=True)],
        out: Out = DEFAULT_OUT,
        heldout_share: HeldoutShare = 0.2,
        seed: Seed = 13,
    ) -> None:
        """Ingest every hospital folder that `federimed synth` produced."""
        hospitals = sorted(p for p in synth_dir.iterdir() if (p / "fhir").is_dir()) if synth_dir.is_dir() else []
        if not hospitals:
            console.print(f"[red]error:[/] {synth_dir}: no <hospital>/fhir folders found")
            raise typer.Exit(2)
        _summary([_ingest_one([h / "fhir"], h.name, out, heldout_share, seed) for h in hospitals], out)

    @app.command("validation-split")
    def validation_split_cmd(
        data: Annotated[Path, typer.Argument(help="Ingested hospitals (data/hospitals).", resolve_path=True)] = Path(
            "data/hospitals"),
        out: Annotated[Path, typer.Option(help="Where the validation hospitals go.", resolve_path=True)] = Path(
            "data/validation"),
        share: Annotated[float, typer.Option(min=0.01, max=0.99, help="Share of training patients that validate.")] = 0.2,
        seed: Seed = 0,
    ) -> None:
        """Carve a validation federation out of the training patients only (never the held-out ones), to
        choose a training recipe on: train and score candidates with `federimed train --data OUT`."""
        from ingest.validation_split import carve_validation

        try:
            counts = carve_validation(data, out, share, seed)
        except (FileNotFoundError, ValueError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        table = Table(title=f"Validation federation in {out}")
        for column in ("hospital", "training dialogues", "validation dialogues"):
            table.add_column(column)
        for name, row in counts.items():
            table.add_row(name, str(row["train"]), str(row["validation"]))
        console.print(table)

    @app.command("audit")
    def audit_cmd(
        directory: Annotated[Path, typer.Argument(help="Folder of ingest outputs to scan (every file, recursively).", resolve_path=True)],
        source: Annotated[list[Path], typer.Option(help="Raw Synthea source the outputs came from (repeatable).", resolve_path=True)],
    ) -> None:
        """Scan outputs for any identifier of the source patients; exit 1 if one is found."""
        from ingest.audit import collect_identifiers, scan
        from ingest.errors import IngestError
        from ingest.readers import read_source

        if not directory.is_dir():
            console.print(f"[red]error:[/] {directory}: not a folder")
            raise typer.Exit(2)
        try:
            identifiers = collect_identifiers(read_source(s) for s in source)
        except IngestError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        hits, files = scan(directory, identifiers)
        summary = f"{len(identifiers)} identifier values, {files} files scanned"
        if not hits:
            console.print(f"[green]audit clean:[/] no identifier found ({summary})")
            return
        table = Table(title=f"Identifiers found in {directory} ({summary})")
        for column in ("file", "line", "kind", "value (masked)"):
            table.add_column(column)
        for hit in hits:
            table.add_row(str(hit.path.relative_to(directory)), str(hit.line), hit.kind, hit.masked)
        console.print(table)
        console.print(f"[red]audit failed:[/] {len(hits)} identifier occurrence(s)")
        raise typer.Exit(1)
