"""FederiMed's Chainlit app for doctors: paste a case or attach a FHIR bundle, get a grounded suggestion.

Thin by design: de-identification, retrieval, prompting and generation live in `federimed.assistant`,
logins in `federimed.users`, chat history in `federimed.history`. Start it with `federimed chat`.
"""

from __future__ import annotations

import json
from pathlib import Path
from contextlib import aclosing
from typing import Any

import chainlit as cl
from chainlit.data import get_data_layer
from chainlit.input_widget import Select, Slider, Switch

from federimed import chat_ui, safety
from federimed.assistant import DEFAULT_MAX_NEW_TOKENS, Assistant, CaseError, Prepared
from federimed.history import data_layer
from federimed.serving.guarded import EngineCrashed
from federimed.serving.turns import AnswerLine
from federimed.users import UserStore

SETTINGS = chat_ui.AppSettings.from_env()
LINE = AnswerLine(SETTINGS.together)  # one engine per server: doctors in line (federimed chat --together)


@cl.data_layer
def history() -> Any:
    return data_layer(SETTINGS.database_url)


@cl.password_auth_callback
async def login(username: str, password: str) -> cl.User | None:
    verified = await cl.make_async(UserStore(SETTINGS.users_db).verify)(username, password)
    return cl.User(identifier=username, metadata={"role": "doctor", "provider": "credentials"}) if verified else None


@cl.set_starters
async def starters(user: cl.User | None = None) -> list[cl.Starter]:
    return [cl.Starter(label=label, message=case) for label, case in chat_ui.STARTERS.items()]


async def _send_settings(values: dict[str, Any]) -> dict[str, Any]:
    menu = chat_ui.version_menu(SETTINGS.runs_dir, baselines=SETTINGS.baselines)
    chosen = values.get("model") if values.get("model") in menu.items.values() else menu.default
    widgets = [
        Switch(id="retrieval", label="Ground answers in guideline excerpts", initial=values.get("retrieval", True)),
        Select(id="model", label="Model version", items=menu.items, initial_value=chosen),
        Slider(id="temperature", label="Temperature (0 = deterministic)", initial=values.get("temperature", 0.0),
               min=0.0, max=1.0, step=0.1),
        Slider(id="max_tokens", label="Longest answer (tokens)", initial=values.get("max_tokens", DEFAULT_MAX_NEW_TOKENS),
               min=32, max=512, step=16),
    ]  # fmt: skip
    settings = await cl.ChatSettings(widgets).send()
    cl.user_session.set("settings", settings)
    return settings


@cl.on_chat_start
async def start() -> None:
    await _send_settings({})


@cl.on_chat_resume
async def resume(thread: dict[str, Any]) -> None:
    meta = thread.get("metadata") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    await _send_settings(meta.get("chat_settings") or {})


@cl.on_settings_update
async def settings_update(settings: dict[str, Any]) -> None:
    cl.user_session.set("settings", settings)


async def _title_thread(case_text: str) -> None:
    """Name the chat after the de-identified case (Chainlit names it after the raw first message)."""
    if layer := get_data_layer():
        await layer.update_thread(cl.context.session.thread_id, name=chat_ui.thread_title(case_text))


@cl.on_message
async def on_message(message: cl.Message) -> None:
    settings = cl.user_session.get("settings") or await _send_settings({})
    bundles = [Path(e.path) for e in message.elements if e.path and chat_ui.is_bundle(e.name, e.mime)]
    others = [e.name for e in message.elements if not (e.path and chat_ui.is_bundle(e.name, e.mime))]
    if others:
        await cl.ErrorMessage(content=chat_ui.unsupported_upload(others)).send()
        return
    try:
        assistant = await cl.make_async(chat_ui.assistant_for)(settings["model"], SETTINGS)
        async with cl.Step(name=chat_ui.CASE_STEP, type="tool") as case_step:
            case_text = await cl.make_async(assistant.case_text)(bundles[0] if bundles else message.content)
            understood = await cl.make_async(assistant.understand)(case_text)
            case_step.output = chat_ui.case_summary(understood, from_bundle=bool(bundles))
    except CaseError as exc:
        await cl.ErrorMessage(content=f"**The case could not be used:** {exc}").send()
        return
    if not bundles and case_text != message.content.strip():
        message.content = case_text  # show the doctor what is kept (the data layer stores only this)
        await message.update()
    try:
        await _answer(assistant, understood.text, settings)
    finally:
        await _title_thread(understood.text)


async def _answer(assistant: Assistant, case_text: str, settings: dict[str, Any]) -> None:
    snippets = []
    if settings["retrieval"]:
        async with cl.Step(name=chat_ui.RETRIEVAL_STEP, type="retrieval") as retrieval_step:
            snippets = await cl.make_async(assistant.retrieve)(case_text)
            retrieval_step.output = chat_ui.retrieval_summary(snippets)
    if cohort := await cl.make_async(assistant.cohort)(case_text):
        async with cl.Step(name=chat_ui.COHORT_STEP, type="tool") as cohort_step:
            cohort_step.output = cohort
    if assistant.notice:
        await cl.Message(content=f"_{assistant.notice}_").send()
    answer, waiting = cl.Message(content=""), cl.Message(content="", author=chat_ui.QUEUE_AUTHOR)

    async def show_place(ahead: int) -> None:
        if ahead == 0:
            return await end_wait()
        shown = bool(waiting.content)
        waiting.content = chat_ui.queue_text(ahead)
        await (waiting.update() if shown else waiting.send())

    async def end_wait() -> None:  # this doctor's turn: the queue message goes
        if waiting.content:
            waiting.content = ""
            await waiting.remove()

    pieces = assistant.astream(
        Prepared.of(case_text, snippets),
        temperature=float(settings["temperature"]),
        max_new_tokens=int(settings["max_tokens"]),
        line=LINE,
        on_wait=show_place,
    )
    try:
        async with aclosing(pieces):  # stop or a closed tab leaves the line at once
            async for piece in pieces:
                await answer.stream_token(piece)
    except CaseError as exc:
        await cl.ErrorMessage(content=f"**The case could not be answered:** {exc}").send()
        return
    except EngineCrashed as exc:
        await cl.ErrorMessage(content=f"**The model stopped unexpectedly:** {exc}. Please ask again.").send()
        return
    finally:
        await end_wait()
    sources = chat_ui.source_elements(snippets)
    warning = safety.warning_text(safety.check(case_text, answer.content))
    answer.content = chat_ui.with_footer(answer.content, sources, assistant.version)
    await answer.send()  # ends the stream and stores the message
    for source in sources:  # one by one, so that they stack in order in the side panel
        await cl.Text(name=source.name, content=source.content, display="side").send(for_id=answer.id)
    if warning:  # right under the answer, in the history too
        await cl.Message(content=warning, author=chat_ui.SAFETY_AUTHOR).send()
