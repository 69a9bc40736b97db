"""`federimed export`: write the served artefact of a checkpoint (a llama.cpp GGUF LoRA adapter)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)
FORMATS = ("gguf",)


def register(app: typer.Typer) -> None:
    """Add `export` to the root app."""
    app.command()(export)


def export(
    run: Annotated[str, typer.Option("--run", help="latest, a run id under --runs-dir, RUN/round-N or a checkpoint folder.")] = "latest",
    round_num: Annotated[Optional[int], typer.Option("--round", min=1, help="Round of the run [default: its last].")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Served format: gguf (llama.cpp LoRA adapter).")] = "gguf",
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where the runs live.", resolve_path=True)] = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the served file is up to date.")] = False,
) -> None:
    """Export a checkpoint for fast CPU inference: a GGUF LoRA adapter next to it (round-N/adapter.gguf),
    rebuilt only when the checkpoint changed. The chat and `federimed ask` export on first use anyway."""
    from federimed.checkpoints import (
        RUN_FILE,
        CheckpointError,
        RunDir,
        resolve_checkpoint,
    )
    from federimed.config import ModelSettings
    from federimed.model import ModelLoadError
    from federimed.serving.gguf_lora import ExportError, ensure_served, shipped_base

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    try:
        checkpoint = resolve_checkpoint(run, runs_dir)
        if round_num is not None:
            checkpoint = resolve_checkpoint(str(checkpoint.parent / f"round-{round_num}"), runs_dir)
        run_file = checkpoint.parent / RUN_FILE
        settings = RunDir(checkpoint.parent).settings().model if run_file.is_file() else ModelSettings()
        started = time.perf_counter()
        with console.status(f"Exporting {checkpoint} for llama.cpp…"):
            base, hf_dir = shipped_base(settings)
            path, rebuilt = ensure_served(checkpoint, base, hf_dir, force=force)
    except (CheckpointError, ModelLoadError, ExportError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    size = path.stat().st_size / 1e6
    if rebuilt:
        console.print(f"[green]exported[/] {path} ({size:.1f} MB, {time.perf_counter() - started:.1f} s) for base {base.name}")
    else:
        console.print(f"[dim]up to date:[/] {path} ({size:.1f} MB) matches the checkpoint; --force rebuilds it")
