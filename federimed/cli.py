"""The `federimed` console command."""

from __future__ import annotations

import typer

from federimed.commands import (
    audit_model,
    chat,
    cohort,
    data,
    demo,
    evaluate,
    experiment,
    export,
    index,
    security,
    synth,
    train,
)

app = typer.Typer(
    name="federimed",
    help="FederiMed: hospitals fine-tune one clinical LLM together; doctors ask it about a case.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)

synth.register(app)
data.register(app)
train.register(app)
cohort.register(app)
security.register(app)
index.register(app)
chat.register(app)
evaluate.register(app)
audit_model.register(app)
export.register(app)
demo.register(app)
experiment.register(app)

if __name__ == "__main__":
    app()
