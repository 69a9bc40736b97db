"""`federimed cohort`: federated cohort statistics (what similar patients received), counts only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from federimed.cohort import CMS_MIN_CELL
from federimed.commands import fail

console = Console()


def cohort(
    data: Annotated[Path, typer.Option(help="Ingested data directory (one sub-directory per hospital).",
                                       resolve_path=True)] = Path("data/hospitals"),
    runs_dir: Annotated[Path, typer.Option(help="Where the artefact is written, beside the training runs.",
                                           resolve_path=True)] = Path("runs"),
    min_cell: Annotated[int, typer.Option(min=1, help="Suppress counts under this many patients (CMS "
                                          "publication rule: 11).")] = CMS_MIN_CELL,
) -> None:
    """Count, at each hospital, patients, decisions and the drugs started per diagnosis (and per age band and
    sex); sum the counts through Flower (only counts travel), suppress small cells and write
    RUNS_DIR/cohort-<stamp>/cohort.json, which the chat and `federimed ask` show beside each answer."""
    from federimed.commands.train import _app_dir
    from federimed.fl.deployment import FlowerProcessError, cohort_on_loopback
    from federimed.fl.hospitals import HospitalDataError, ingested_hospitals
    from federimed.fl.settings import ServerOptions

    try:
        hospitals = ingested_hospitals(data)
    except HospitalDataError as err:
        raise fail(str(err)) from None
    if min_cell < CMS_MIN_CELL:
        console.print(f"[yellow]note:[/] counts of {min_cell} to {CMS_MIN_CELL - 1} patients will be shown: below the "
                      f"CMS rule of {CMS_MIN_CELL}, acceptable for synthetic demo data only.")
    options = ServerOptions(hospitals=len(hospitals), min_hospitals=len(hospitals), runs_dir=runs_dir,
                            min_cell=min_cell, task="cohort")
    try:
        with console.status(f"Counting at {len(hospitals)} hospitals through Flower…"):
            path = cohort_on_loopback(hospitals, options, _app_dir())
    except FlowerProcessError as err:
        raise fail(str(err)) from None
    console.print(summary_table(json.loads(path.read_text())))
    console.print(f"[green]cohort statistics:[/] {path}")


def summary_table(artefact: dict) -> Table:
    """Diagnosis-level cells of an artefact: patients, decisions, hospitals and the top drugs started."""
    table = Table(title=f"Cohort statistics of {len(artefact['hospitals'])} hospitals (cells under "
                        f"{artefact['min_cell']} suppressed: {artefact['suppressed_strata']} strata)")
    for column in ("diagnosis", "patients", "decisions", "hospitals", "drugs started (share of patients)"):
        table.add_column(column, justify="left" if column.startswith("d") and column != "decisions" else "right")
    for key, cell in artefact["strata"].items():
        code, band, sex = key.split("|")
        if band != "*":
            continue
        top = sorted(cell["drugs"].items(), key=lambda d: (-d[1], d[0]))[:4]
        drugs = ", ".join(f"{d} {n / cell['patients']:.0%}" for d, n in top)
        table.add_row(artefact["diagnoses"].get(code, code), str(cell["patients"]), str(cell["decisions"]),
                      str(cell["hospitals"]), drugs or "–")
    return table


def register(app: typer.Typer) -> None:
    app.command()(cohort)
