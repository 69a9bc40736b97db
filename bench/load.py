"""Many doctors at once: the real chat server under 1, 5, 10 and 20 simultaneous logged-in sessions.

Starts `federimed chat` on loopback (a fresh history database, one login per simulated doctor) and, for each
level N, opens N Socket.IO sessions the way the browser does (password login cookie, then
`connection_successful`). Each session sends `--cases` held-out cases one after another (a case waits for
the previous answer); a level also stops at `--level-timeout` seconds. At the same moment one more doctor
pastes a 50,000-character text, which must be refused at once without holding up the others.

Per level it reports the first-token latency p50/p95 (case sent → the answer's first streamed token), the
tokens/s each doctor sees while their answer streams, the errors, and the paste's refusal time. Afterwards
every doctor's stored history is read back through the server's REST API: it must hold one chat with
exactly the cases that doctor sent, and nobody else's.

All of it runs once per `--together` setting of the server (`federimed chat --together N`: 1, the default,
answers one doctor at a time; 8 decodes up to 8 waiting answers together), and the answers each doctor
received are compared across settings (greedy: they must be the same). Writes
bench/results/load.json with the CPU it ran on.

    .venv/bin/python bench/load.py --runs-dir runs --data data/hospitals --index-dir data/guideline-index
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASSWORD = "load-test-password"
PASTE_CHARS = 50_000
WARM_UP = "dr-warm-up"


def doctor_names(level: int) -> list[str]:
    """The logins of one level: its asking doctors, then the one who pastes 50,000 characters."""
    return [*(f"dr-{level}-{i}" for i in range(level)), f"dr-{level}-paste"]


@dataclass
class Turn:
    """One case sent by one doctor, as the browser saw it."""

    sent: float
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None

    @property
    def first_token_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def tokens_per_s(self) -> float | None:
        if self.first_token is None or self.ended is None or self.tokens < 2 or self.ended <= self.first_token:
            return None
        return (self.tokens - 1) / (self.ended - self.first_token)


@dataclass
class Doctor:
    """One logged-in browser session (Socket.IO client) of the chat."""

    url: str
    name: str
    turns: list[Turn] = field(default_factory=list)
    sent_texts: list[str] = field(default_factory=list)

    async def open(self) -> None:
        import httpx
        import socketio

        async with httpx.AsyncClient(base_url=self.url) as http:
            response = await http.post("/login", data={"username": self.name, "password": PASSWORD})
            response.raise_for_status()
            self.cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        self._ended = asyncio.Event()
        self._ready = asyncio.Event()  # the chat has started: its settings came, then the end of that task
        self._settings_seen = False
        self.sio = socketio.AsyncClient(reconnection=False)
        self.sio.on("chat_settings", self._on_settings)
        self.sio.on("stream_token", self._on_token)
        self.sio.on("new_message", self._on_message)
        self.sio.on("task_end", self._on_task_end)
        auth = {"sessionId": str(uuid.uuid4()), "clientType": "webapp", "userEnv": "{}", "chatProfile": None, "threadId": None}
        await self.sio.connect(self.url, socketio_path="/ws/socket.io", headers={"Cookie": self.cookie}, auth=auth,
                               transports=["websocket"])  # fmt: skip
        await self.sio.emit("connection_successful")
        await asyncio.wait_for(self._ready.wait(), 60)

    async def _on_settings(self, _data: object) -> None:
        self._settings_seen = True

    async def _on_token(self, data: dict) -> None:
        turn = self.turns[-1]
        turn.first_token = turn.first_token or time.perf_counter()
        turn.tokens += 1
        turn.text += data.get("token", "")

    async def _on_message(self, data: dict) -> None:
        if data.get("isError") and self.turns:
            self.turns[-1].error = data.get("output", "error")

    async def _on_task_end(self, _data: object) -> None:
        if not self.turns and self._settings_seen:
            self._ready.set()
        elif self.turns and self.turns[-1].ended is None:
            self.turns[-1].ended = time.perf_counter()
            self._ended.set()

    async def ask(self, text: str, timeout: float) -> Turn:
        """Send one case and wait for the end of its answer (at most `timeout` s)."""
        self._ended.clear()
        self.sent_texts.append(text)
        turn = Turn(sent=time.perf_counter())
        self.turns.append(turn)
        message = {"id": str(uuid.uuid4()), "threadId": "", "name": self.name, "type": "user_message", "output": text,
                   "createdAt": datetime.now(timezone.utc).isoformat()}  # fmt: skip
        await self.sio.emit("client_message", {"message": message, "fileReferences": []})
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except asyncio.TimeoutError:
            turn.error = turn.error or f"no end of answer within {timeout:.0f} s"
        return turn

    async def close(self) -> None:
        await self.sio.disconnect()

    async def history(self) -> list[dict]:
        """This doctor's stored chats, each with its steps, as the server returns them to this doctor."""
        import httpx

        async with httpx.AsyncClient(base_url=self.url, headers={"Cookie": self.cookie}) as http:
            listed = await http.post("/project/threads", json={"pagination": {"first": 50}, "filter": {}})
            listed.raise_for_status()
            threads = []
            for thread in listed.json()["data"]:
                full = await http.get(f"/project/thread/{thread['id']}")
                full.raise_for_status()
                threads.append(full.json())
            return threads


def percentile(values: list[float], share: float) -> float | None:
    """The `share` quantile (numpy's linear interpolation), or None without values."""
    import numpy as np

    return round(float(np.percentile(values, 100 * share)), 3) if values else None


def history_problems(doctor: Doctor, threads: list[dict]) -> list[str]:
    """What is wrong with one doctor's stored history: it must be one chat, theirs, with exactly their cases."""
    from federimed.scrub import scrub_free_text

    problems = []
    if len(threads) != 1:
        problems.append(f"{doctor.name}: {len(threads)} chats stored, expected 1")
    for thread in threads:
        if thread.get("userIdentifier") != doctor.name:
            problems.append(f"{doctor.name}: a chat of {thread.get('userIdentifier')!r} is listed")
        asked = [s["output"].strip() for s in thread.get("steps", []) if s.get("type") == "user_message"]
        if asked != [scrub_free_text(t.strip()) for t in doctor.sent_texts]:  # the chat stores the scrubbed case
            problems.append(f"{doctor.name}: the chat holds {len(asked)} cases, not the {len(doctor.sent_texts)} sent")
    return problems


async def run_level(url: str, level: int, cases: list[str], per_doctor: int, timeout: float) -> tuple[dict, dict[tuple, str]]:
    """N doctors asking at once (plus one pasting 50,000 characters); their latencies and history checks."""
    *doctors, paster = (Doctor(url, name) for name in doctor_names(level))
    await asyncio.gather(*(d.open() for d in [*doctors, paster]))
    deadline = time.perf_counter() + timeout

    async def session(index: int, doctor: Doctor) -> None:
        for n in range(per_doctor):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            await doctor.ask(cases[(index * per_doctor + n) % len(cases)], left)

    started = time.perf_counter()
    paste = asyncio.create_task(paster.ask("x" * PASTE_CHARS, 60))
    await asyncio.gather(*(session(i, d) for i, d in enumerate(doctors)))
    wall = time.perf_counter() - started
    pasted = await paste
    threads = await asyncio.gather(*(d.history() for d in doctors))
    await asyncio.gather(*(d.close() for d in [*doctors, paster]))
    turns = [t for d in doctors for t in d.turns]
    firsts = [t.first_token_s for t in turns if t.first_token_s is not None and not t.error]
    speeds = [t.tokens_per_s for t in turns if t.tokens_per_s is not None and not t.error]
    problems = [p for d, ts in zip(doctors, threads) for p in history_problems(d, ts)]
    return {
        "sessions": level,
        "answers": sum(1 for t in turns if not t.error),
        "errors": [t.error for t in turns if t.error],
        "first_token_s": {"p50": percentile(firsts, 0.5), "p95": percentile(firsts, 0.95), "max": percentile(firsts, 1.0)},
        "tokens_per_s_per_session": {"median": round(statistics.median(speeds), 1) if speeds else None,
                                     "min": round(min(speeds), 1) if speeds else None},
        "tokens_per_answer_median": statistics.median(t.tokens for t in turns) if turns else None,
        "wall_s": round(wall, 1),
        "paste_50k": {"refused": bool(pasted.error) and "limit" in pasted.error,
                      "reply_s": round((pasted.ended or time.perf_counter()) - pasted.sent, 3), "message": pasted.error},
        "history_problems": problems,
    }, {(level, d.name, n): t.text for d in doctors for n, t in enumerate(d.turns) if not t.error}


async def warm_up(url: str, case: str) -> None:
    """One answer before timing: the first chat loads the model."""
    doctor = Doctor(url, WARM_UP)
    await doctor.open()
    turn = await doctor.ask(case, 600)
    await doctor.close()
    if turn.error:
        sys.exit(f"the chat could not answer a held-out case: {turn.error}")


def serve_levels(args: argparse.Namespace, cases: list[str], levels: list[int], together: int) -> tuple[list[dict], dict[tuple, str]]:
    """Start the chat server with `--together`, run every level against it; the results and every answer."""
    from federimed.chat_server import chat_server
    from federimed.users import UserStore

    with tempfile.TemporaryDirectory(prefix="federimed-load-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp)
        users = UserStore(folder / "users.db")
        for level in levels:
            for name in doctor_names(level):
                users.add(name, PASSWORD)
        users.add(WARM_UP, PASSWORD)
        options = ("--together", str(together))
        with chat_server(folder, runs_dir=args.runs_dir.resolve(), index_dir=args.index_dir.resolve(),
                         users_db=users.path, options=options) as server:  # fmt: skip
            asyncio.run(warm_up(server.url, cases[0]))
            results, texts = [], {}
            for level in levels:
                print(f"--together {together}: {level} simultaneous doctor(s)…", flush=True)
                result, answers = asyncio.run(run_level(server.url, level, cases, args.cases, args.level_timeout))
                results.append(result)
                texts |= answers
                print(json.dumps(result), flush=True)
    return results, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--data", type=Path, default=Path("data/hospitals"), help="hospital folders with heldout.jsonl")
    parser.add_argument("--index-dir", type=Path, default=Path("data/guideline-index"))
    parser.add_argument("--levels", default="1,5,10,20", help="simultaneous sessions, comma-separated")
    parser.add_argument("--cases", type=int, default=2, help="cases each doctor sends, one after another")
    parser.add_argument("--level-timeout", type=float, default=600.0, help="seconds a level may run")
    parser.add_argument("--together", default="1,8", help="`federimed chat --together` settings to compare")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.json")
    args = parser.parse_args()

    from federimed.assistant import DEFAULT_MAX_NEW_TOKENS
    from federimed.cpu import this_cpu

    heldout = sorted(args.data.glob("*/heldout.jsonl"))
    cases = [json.loads(line)["messages"][1]["content"] for path in heldout for line in path.read_text().splitlines() if line.strip()]
    if not cases:
        sys.exit(f"no held-out cases under {args.data}: run the demo (or `federimed data`) first")
    levels = [int(n) for n in args.levels.split(",")]
    started = time.perf_counter()
    runs, answers = {}, {}
    for together in [int(n) for n in args.together.split(",")]:
        runs[together], answers[together] = serve_levels(args, cases, levels, together)
    common = set.intersection(*(set(a) for a in answers.values()))  # answered under every setting
    out = {
        "benchmark": "load",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": this_cpu().summary(),
        "cases_per_doctor": args.cases,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "model": "runs/latest under --runs-dir, greedy, guideline retrieval on",
        "together": {str(k): v for k, v in runs.items()},
        "answers_compared_across_settings": len(common),
        "same_answers_across_settings": round(
            sum(len({a[key] for a in answers.values()}) == 1 for key in common) / max(1, len(common)), 3),
        "goal": "20 sessions: p95 first token < 5 s, no errors",
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
