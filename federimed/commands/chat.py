"""`federimed ask`, `federimed chat` and `federimed users`: ask about a case, serve the doctors' chat, manage logins."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.table import Table

from federimed.serving.turns import DEFAULT_TOGETHER

console = Console()
err = Console(stderr=True)
users_app = typer.Typer(help="Doctors who may log in to the chat (salted scrypt hashes in a local SQLite file).")

RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Training runs (checkpoints) folder.", resolve_path=True)]
IndexDir = Annotated[
    Optional[Path], typer.Option("--index-dir", help="Guideline index folder [default: data/guideline-index, built if missing].", resolve_path=True)
]
UsersDb = Annotated[
    Optional[Path], typer.Option("--db", help="User store [default: $FEDERIMED_USERS_DB or data/users.db].", resolve_path=True)
]
AUTH_SECRET_FILE = "chainlit-auth-secret"


def register(app: typer.Typer) -> None:
    """Add `ask`, `chat` and the `users` group to the root app."""
    app.command()(ask)
    app.command()(chat)
    app.add_typer(users_app, name="users")


def ask(
    case: Annotated[Optional[str], typer.Argument(help="The case as free text (identifiers are scrubbed first).")] = None,
    bundle: Annotated[Optional[Path], typer.Option("--bundle", help="A FHIR R4 bundle (JSON) instead of text.", resolve_path=True)] = None,
    model: Annotated[str, typer.Option("--model", help="latest, base, RUN, RUN/round-N or an adapter folder.")] = "latest",
    retrieval: Annotated[bool, typer.Option("--retrieval/--no-retrieval", help="Ground the answer in guidelines.")] = True,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Longest answer, in tokens.")] = 160,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=2.0, help="0 = greedy.")] = 0.0,
    runs_dir: RunsDir = Path("runs"),
    index_dir: IndexDir = None,
) -> None:
    """Ask the model about one case: prints the answer as it is written, then any safety warning (allergy,
    duplicate medication), its guideline sources and the federation's counts for patients like this."""
    from federimed import free_text, safety
    from federimed.assistant import Assistant, CaseError
    from federimed.checkpoints import CheckpointError
    from federimed.model import ModelLoadError
    from federimed.retrieval import IndexIntegrityError
    from federimed.serving.guarded import EngineCrashed

    if (case is None) == (bundle is None):
        raise typer.BadParameter("give either the case text or --bundle FILE (not both)")
    try:
        assistant = Assistant(adapter=model, runs_dir=runs_dir, index_dir=index_dir, retrieval=retrieval)
        if assistant.notice:
            err.print(f"[yellow]{assistant.notice}[/]")
        with console.status("De-identifying the case and searching the guidelines…"):
            understood = assistant.understand(assistant.case_text(bundle if bundle is not None else case))
            prepared = assistant.prepare_text(understood.text)
        if understood.parsed:
            console.print(Panel(Markdown(free_text.summary(understood)), title="What I understood", border_style="blue"))
        console.print(Panel(prepared.case_text, title="Case as the model reads it (de-identified)", border_style="dim"))
        with console.status("Loading the model…"):
            assistant.model()
        console.rule(f"[bold]Answer[/] · {assistant.version.describe()}")
        pieces = []
        for piece in assistant.generate(prepared, temperature=temperature, max_new_tokens=max_tokens):
            console.print(piece, end="", markup=False, highlight=False)
            pieces.append(piece)
        console.print()
    except (CaseError, CheckpointError, ModelLoadError, IndexIntegrityError, EngineCrashed) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if prepared.snippets:
        table = Table(title="Guideline sources")
        for column in ("#", "guideline — section", "where", "similarity"):
            table.add_column(column, justify="right" if column in ("#", "similarity") else "left")
        for n, s in enumerate(prepared.snippets, 1):
            table.add_row(str(n), f"{s.title} — {s.section}", s.url or s.source, f"{s.score:.2f}")
        console.print(table)
    if warning := safety.warning_text(safety.check(prepared.case_text, "".join(pieces))):
        console.print(Panel(Markdown(warning), title="Safety check", border_style="red"))
    if cohort := assistant.cohort(prepared.case_text):
        console.print(Panel(Markdown(cohort), title="Patients like this in the federation", border_style="cyan"))
    console.print("[dim]Decision support only: not a substitute for clinical judgement (synthetic training data).[/]")


def chat(
    port: Annotated[int, typer.Option("--port", help="Port to serve on.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Interface to bind (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    runs_dir: RunsDir = Path("runs"),
    index_dir: IndexDir = None,
    users_db: UsersDb = None,
    baselines: Annotated[bool, typer.Option(
        "--baselines", help="For evaluators: also offer the evaluation baselines (local-only, centralized) in "
        "the model menu. Doctors are served the federated model that runs/latest names.")] = False,
    together: Annotated[int, typer.Option(
        "--together", min=1, max=32, help="Most doctors' answers decoded together (1: one at a time). Greedy "
        "answers are the same either way (README, 'Many doctors at once').")] = DEFAULT_TOGETHER,
) -> None:
    """Serve the doctors' chat (Chainlit) with password login and per-doctor history; prints the URL."""
    from federimed.model import cache_root
    from federimed.users import UserStore

    store = UserStore(users_db)
    if not store.list():
        err.print(f"[red]error:[/] no users in {store.path}: add one with `federimed users add NAME`")
        raise typer.Exit(1)
    if index_dir is None:
        from federimed.retrieval import default_index_dir, ensure_default_index

        with console.status("Checking the guideline index…"):
            ensure_default_index()
        index_dir = default_index_dir()
    env = dict(os.environ)
    env.update(
        FEDERIMED_RUNS_DIR=str(runs_dir.resolve()),
        FEDERIMED_INDEX_DIR=str(index_dir.resolve()),
        FEDERIMED_USERS_DB=str(store.path.resolve()),
        CHAINLIT_APP_ROOT=str(app_root()),
        FEDERIMED_CHAT_BASELINES="1" if baselines else "0",
        FEDERIMED_CHAT_TOGETHER=str(together),
        CHAINLIT_AUTH_SECRET=env.get("CHAINLIT_AUTH_SECRET") or _auth_secret(cache_root() / AUTH_SECRET_FILE),
    )
    if not env.get("FEDERIMED_DATABASE_URL"):
        env["FEDERIMED_DATABASE_URL"] = f"sqlite+aiosqlite:///{Path('data/chainlit.db').resolve()}"
    command = [sys.executable, "-m", "chainlit", "run", str(app_root() / "app" / "app.py"), "--headless",
               "--host", host, "--port", str(port)]  # fmt: skip
    console.print(f"FederiMed chat at [bold]http://{host}:{port}[/] (log in as one of: {', '.join(u.name for u in store.list())})")
    try:
        raise typer.Exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def app_root() -> Path:
    """The folder holding app/app.py, chainlit.md, .chainlit/ and public/."""
    return Path(__file__).resolve().parents[2]


def _auth_secret(path: Path) -> str:
    """The JWT secret that signs chat logins: created once, owner-only, kept in the local cache."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    return secret


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")] = False,
    db: UsersDb = None,
) -> None:
    """Add a doctor; asks for the password twice unless --password-stdin."""
    from federimed.users import UserError, UserStore

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        store = UserStore(db)
        store.add(name, password)
    except UserError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"Added [bold]{name}[/] to {store.path}")


@users_app.command("list")
def users_list(db: UsersDb = None) -> None:
    """List the doctors who may log in."""
    from federimed.users import UserStore

    store = UserStore(db)
    table = Table(title=f"Users in {store.path}")
    table.add_column("name")
    table.add_column("added (UTC)")
    for user in store.list():
        table.add_row(user.name, user.created)
    console.print(table if table.row_count else f"No users in {store.path}: add one with `federimed users add NAME`")


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="Login name.")], db: UsersDb = None) -> None:
    """Remove a doctor (their chat history stays in the chat database)."""
    from federimed.users import UserError, UserStore

    try:
        store = UserStore(db)
        store.remove(name)
    except UserError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"Removed [bold]{name}[/] from {store.path}")
