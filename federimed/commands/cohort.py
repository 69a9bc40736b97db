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
    secagg: Annotated[bool, typer.Option(help="Sum the counts with SecAgg+: the server never sees one "
                                         "hospital's counts.")] = False,
    epsilon: Annotated[float, typer.Option(min=0, help="Patient-level differential privacy: Gaussian noise on "
                                           "the summed counts at this ε (0: none).")] = 0.0,
    delta: Annotated[float, typer.Option(min=1e-12, max=0.1, help="δ of the differential privacy.")] = 1e-6,
) -> None:
    """Count, at each hospital, patients, decisions, conditions ended within 90 days and the drugs started per
    diagnosis (and per age band and sex); sum the counts through Flower (only counts travel; with --secagg
    only their sum is ever unmasked), optionally add DP noise, suppress small cells and write
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
                            min_cell=min_cell, task="cohort", secagg=secagg and len(hospitals) > 1,
                            cohort_epsilon=epsilon, cohort_delta=delta)
    if secagg and len(hospitals) == 1:
        console.print("[yellow]note:[/] one hospital: its counts are the sum, SecAgg+ would hide nothing; "
                      "summed in the clear.")
    try:
        with console.status(f"Counting at {len(hospitals)} hospitals through Flower…"):
            path = cohort_on_loopback(hospitals, options, _app_dir())
    except FlowerProcessError as err:
        raise fail(str(err)) from None
    console.print(summary_table(json.loads(path.read_text())))
    console.print(f"[green]cohort statistics:[/] {path}")


def summary_table(artefact: dict) -> Table:
    """Diagnosis-level cells of an artefact: patients, decisions, hospitals, conditions ended and the top drugs
    started."""
    hidden = artefact["suppressed_strata"]
    title = (f"Cohort statistics of {len(artefact['hospitals'])} hospitals (cells under {artefact['min_cell']} "
             f"suppressed{'' if hidden is None else f': {hidden} strata'})")
    if dp := artefact["dp"]:
        title += f", DP ε {dp['epsilon']:g} at δ {dp['delta']:g} per patient (noise σ {dp['sigma']:.1f})"
    table = Table(title=title)
    for column in ("diagnosis", "patients", "decisions", "hospitals", f"ended ≤ {artefact['ended_within_days']} d",
                   "drugs started (share of patients)"):
        table.add_column(column, justify="left" if column.startswith("d") and column != "decisions" else "right")
    for key, cell in artefact["strata"].items():
        code, band, sex = key.split("|")
        if band != "*":
            continue
        top = sorted(cell["drugs"].items(), key=lambda d: (-d[1], d[0]))[:4]
        drugs = ", ".join(f"{d} {n / cell['patients']:.0%}" for d, n in top)
        ended = "–" if cell["ended"] is None else f"{cell['ended'] / cell['decisions']:.0%}"
        table.add_row(artefact["diagnoses"].get(code, code), str(cell["patients"]), str(cell["decisions"]),
                      str(cell["hospitals"]), ended, drugs or "–")
    return table


def register(app: typer.Typer) -> None:
    app.command()(cohort)
