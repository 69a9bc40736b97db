"""The doctors' chat end to end: `federimed chat` serves the Chainlit app; Debian chromium (Playwright)
logs in, finds the federated model as the menu's default (a baseline trained after it is not offered),
sends a case, reads the streamed, grounded answer from the federated model, opens a source, finds the
chat again in the history after a reload, and a second doctor can neither see nor open it."""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chat_support import PROPOSED, build_tiny_index, teach_one_answer

from federimed.chat_server import ChatServerError, chat_server
from federimed.users import UserStore

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PASSWORD = "s3cret-enough-for-tests"
CASE = (
    "Name: Jonathan Quimby\nPatient: 58-year-old male\nNew diagnosis: Essential hypertension\n"
    "Active conditions: none\nCurrent medications: none\nAllergies: none\nRecent findings: BP 152/96 mmHg"
)
THREAD_TITLE = "Essential hypertension · 58-year-old male"
ANSWER = '.step[data-step-type="assistant_message"] .message-content'
STARTUP_S = 180
ANSWER_S = 240


@dataclass
class Server:
    url: str
    database: Path
    log: list[str]
    federated: str  # the federated run's id: doctors are served it by default


def _demo_order_runs(runs: Path) -> str:
    """Runs in the demo's order: a federated run, then a local-only baseline saved after it (the newest
    checkpoint). The federated adapter is taught to propose amoxicillin for every case (`teach_one_answer`):
    the test is about which model serves and what the chat does with its answer, not about its medicine."""
    from federimed.checkpoints import new_run, save_round
    from federimed.config import RunSettings
    from federimed.model import add_lora, load_base

    settings = RunSettings()
    base, tokenizer = load_base(settings.model)
    peft = add_lora(base, settings.lora)
    teach_one_answer(peft, tokenizer)
    federated = new_run(runs, settings, "federated", {"childrens": 12, "general": 20})
    save_round(federated, 1, peft, {"train_loss": 1.0})
    time.sleep(1.1)  # creation times have whole seconds: the baseline is strictly newer
    save_round(new_run(runs, settings, "local-only", {"general": 20}), 1, peft, {"train_loss": 1.0})
    return federated.id


def _cohort_artefact(runs: Path) -> None:
    """Released cohort counts for the test case's diagnosis (hypertension, 50-59, male), as `federimed cohort`
    writes them; another diagnosis counted by too few patients is suppressed."""
    from federimed.cohort import Cell, CohortCounts, release, stratum_key, write_artefact

    counts = CohortCounts(diagnoses={"59621000": "Essential hypertension", "254637007": "Non-small cell lung cancer"})
    counts.cells[stratum_key("59621000")] = Cell(
        patients=40, decisions=52, hospitals=3, ended=0, drugs=Counter(lisinopril=30, amlodipine=12, losartan=3))
    counts.cells[stratum_key("59621000", "50-59", "male")] = Cell(
        patients=14, decisions=16, hospitals=2, ended=0, drugs=Counter(lisinopril=11, amlodipine=4))
    counts.cells[stratum_key("254637007")] = Cell(patients=2, decisions=2, hospitals=1, ended=2, drugs=Counter(cisplatin=2))
    write_artefact(runs, release(counts, min_cell=11, hospitals=["childrens", "general", "geriatric-cardiac"]))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (scripts/setup.sh --dev installs it)")
    tmp = tmp_path_factory.mktemp("chat")
    index = build_tiny_index(tmp)
    users = UserStore(tmp / "users.db")
    users.add("dr.grey", PASSWORD)
    users.add("dr.house", PASSWORD)
    federated = _demo_order_runs(tmp / "runs")
    _cohort_artefact(tmp / "runs")
    try:
        with chat_server(tmp, runs_dir=tmp / "runs", index_dir=index, users_db=users.path, startup_s=STARTUP_S) as chat:
            yield Server(chat.url, chat.database, chat.log, federated)
    except ChatServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _login(browser: object, server: Server, user: str) -> object:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(server.url)
    page.fill("input[name='email']", user)
    page.fill("input[name='password']", PASSWORD)
    page.click("button[type='submit']")
    page.wait_for_selector("#chat-input", timeout=60_000)
    return page


def _shortest_answers(page: object) -> None:
    """Check the model menu offers the federated model by default (and no baseline), then set the
    "Longest answer" slider to its minimum in the chat settings."""
    page.click("#chat-settings-open-modal")
    menu = page.locator("#model")
    menu.wait_for(timeout=30_000)
    assert "Federated · round 1 · 2 hospitals (childrens, general)" in menu.inner_text()
    assert "(default)" in menu.inner_text()
    menu.click()
    page.wait_for_selector("[role='option']", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "chat-model-menu.png"))
    options = page.locator("[role='option']").all_inner_texts()
    assert any(o.startswith("Federated") and o.endswith("(default)") for o in options), options
    assert not any("baseline" in o for o in options), f"an evaluation baseline is offered to doctors: {options}"
    page.locator("[role='option']", has_text="(default)").first.click()
    slider = page.locator("#max_tokens [role='slider'], [id='max_tokens'] ~ * [role='slider']").first
    slider.focus()
    page.keyboard.press("Home")
    page.click("#confirm")


def test_doctor_chats_with_sources_history_and_privacy(server: Server, browser: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = _login(browser, server, "dr.grey")
    for label in ("Hypertension", "Type 2 diabetes", "Strep throat", "COPD exacerbation"):
        assert page.get_by_text(label, exact=True).count() >= 1, f"starter {label!r} missing"
    _shortest_answers(page)

    page.fill("#chat-input", CASE)
    page.click("#chat-submit")
    answer = page.locator(ANSWER).last
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].some(e => e.innerText.includes('Decision support only'))",
        arg=ANSWER,
        timeout=ANSWER_S * 1000,
    )
    text = answer.inner_text()
    assert f"Model: {server.federated}/round-1 · federated" in text and "synthetic" in text
    assert page.locator("[id='step-Guideline retrieval']").count() == 1
    assert page.locator("[id='step-De-identification']").count() == 1
    cohort = page.locator("[id='step-Patients like this in the federation']")
    assert cohort.count() == 1, "the cohort panel is shown beside the answer"
    cohort.first.click()  # open the step
    page.wait_for_selector("text=14 patients", timeout=30_000)
    panel = page.locator("text=14 patients").first.locator("xpath=ancestor::*[contains(., 'Started on:')][1]").inner_text()
    assert "lisinopril 79% of them" in panel and "Essential hypertension, 50-59, male" in panel, panel
    assert "amlodipine" not in panel, panel  # started in 4 of the 14 patients: under 11, never shown
    assert "ended within 90 days of its onset in 0% of the decisions" in panel, panel
    assert "cisplatin" not in page.content()  # a suppressed diagnosis never reaches the chat
    page.screenshot(path=str(ARTIFACTS / "chat-cohort.png"), full_page=True)
    links = answer.locator(".element-link")
    assert links.count() >= 1, "the answer names at least one guideline source"
    assert re.search(r"Source 1: Hypertension", links.first.inner_text(), re.IGNORECASE)
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"), full_page=True)
    user_message = page.locator('.step[data-step-type="user_message"]').last.inner_text()
    assert "Quimby" not in user_message and "[REDACTED]" in user_message, "the chat keeps the de-identified case"
    links.first.click()
    page.wait_for_selector("text=similarity", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "chat-source.png"), full_page=True)

    page.reload()
    thread = page.get_by_text(THREAD_TITLE, exact=True).first
    thread.wait_for(timeout=60_000)
    thread.click()
    page.wait_for_url(re.compile(r"/thread/"), timeout=30_000)
    thread_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    page.locator(ANSWER).last.locator(".element-link").first.click()
    page.wait_for_selector("text=similarity", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "chat-history.png"), full_page=True)
    assert "Quimby" not in page.content(), "the pasted name reached the stored history"

    other = _login(browser, server, "dr.house")
    other.wait_for_timeout(2_000)
    assert other.get_by_text(THREAD_TITLE, exact=True).count() == 0, "another doctor's chat is listed"
    response = other.request.get(f"{server.url}/project/thread/{thread_id}")
    assert response.status in (401, 403, 404), "another doctor can open the chat"
    other.screenshot(path=str(ARTIFACTS / "chat-second-doctor.png"))

    with sqlite3.connect(server.database) as db:
        stored = " ".join(str(v) for row in db.execute('SELECT name FROM threads UNION ALL SELECT output FROM steps') for v in row)
    assert "Quimby" not in stored, "the pasted name reached the chat history"
    assert THREAD_TITLE in stored


FREE_TEXT_CASE = ("62 yo woman, new strep throat. Allergic to penicillin, cephalosporins, macrolides, "
                  "tetracyclines and NSAIDs. On acetaminophen and sertraline.")


def test_a_free_text_case_is_understood_and_its_answer_checked(server: Server, browser: object) -> None:
    from federimed.free_text import understand
    from federimed.safety import check

    ARTIFACTS.mkdir(exist_ok=True)
    page = _login(browser, server, "dr.grey")
    _shortest_answers(page)
    page.fill("#chat-input", FREE_TEXT_CASE)
    page.click("#chat-submit")
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].some(e => e.innerText.includes('Decision support only'))",
        arg=ANSWER,
        timeout=ANSWER_S * 1000,
    )
    page.locator("[id='step-De-identification']").first.click()
    page.wait_for_selector("text=What I understood", timeout=30_000)
    step = page.locator("text=What I understood").first.locator(
        "xpath=ancestor::*[contains(., 'Current medications')][1]").inner_text()
    assert "Streptococcal sore throat (from" in step and "acetaminophen, sertraline" in step, step
    page.screenshot(path=str(ARTIFACTS / "chat-understood.png"), full_page=True)

    shown = page.locator(ANSWER, has_text="Decision support only").last.inner_text()
    flags = check(understand(FREE_TEXT_CASE).text, shown.split("Decision support only")[0])
    assert any(f.drug == PROPOSED and f.kind == "allergy" for f in flags), (shown, flags)  # the model proposed it
    warning = page.locator(ANSWER, has_text="Check before prescribing")
    assert warning.count() == 1, shown
    text = warning.first.inner_text()
    assert all(f.drug in text and f.reason in text for f in flags), (text, flags)
    warning.first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "chat-safety-warning.png"), full_page=True)


def test_a_second_doctor_waits_in_line_and_is_told_their_place(server: Server, browser: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    grey, house = _login(browser, server, "dr.grey"), _login(browser, server, "dr.house")
    for page in (grey, house):
        page.fill("#chat-input", CASE)
    grey.click("#chat-submit")
    house.click("#chat-submit")
    house.wait_for_selector("text=Waiting for the model: 1 doctor ahead of you", timeout=60_000)
    house.screenshot(path=str(ARTIFACTS / "chat-queue.png"), full_page=True)
    for page in (grey, house):  # both are answered, and the queue message goes once it is one's turn
        page.wait_for_function(
            "sel => [...document.querySelectorAll(sel)].some(e => e.innerText.includes('Decision support only'))",
            arg=ANSWER, timeout=ANSWER_S * 1000,
        )  # fmt: skip
    assert house.get_by_text("ahead of you").count() == 0
