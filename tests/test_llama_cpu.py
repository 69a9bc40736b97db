"""llama.cpp on this machine's CPU: the extra weight buffers chosen from the CPU's flags, every GGUF the
product serves reading long prompts and batches without crashing (in a child process, so a crash fails
one test instead of ending the run), and llama.cpp's log kept off the terminal."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from federimed.checkpoints import new_run, save_round
from federimed.config import LoraSettings, ModelSettings, RunSettings
from federimed.model import add_lora, load_base
from federimed.serving import select
from federimed.serving.backend import prompt_ids
from federimed.cpu import AMX_FLAGS, extra_buffers_safe, parse_cpuinfo, this_cpu
from federimed.serving.gguf_lora import ensure_served, served_base, shipped_base
from federimed.serving.llama_runtime import load_llama

LLAMA_PROBLEM = select.llama_cpp_problem()
needs_llama = pytest.mark.skipif(
    LLAMA_PROBLEM is not None, reason=f"fast engine not installed ({LLAMA_PROBLEM}); scripts/setup.sh installs it"
)
SETTINGS = ModelSettings()
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: other
flags\t\t: fpu
"""
EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: fpu sse2 avx2 fma\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes sve\nCPU implementer\t: 0x41\n"


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    intel = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert intel.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert AMX_FLAGS <= intel.flags and "fpu" in intel.flags
    assert intel.summary()["flags"] == {
        "avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": True,
        "amx_tile": True, "amx_int8": True, "amx_bf16": True,
    }  # fmt: skip
    assert parse_cpuinfo(EPYC).flags == {"fpu", "sse2", "avx2", "fma"}
    assert parse_cpuinfo(GRAVITON).flags == {"fp", "asimd", "aes", "sve"}
    assert parse_cpuinfo("").flags is None and parse_cpuinfo("").summary()["flags"] == "unknown"


def test_extra_buffers_stay_off_where_the_cpu_has_amx_or_is_unknown() -> None:
    assert not extra_buffers_safe(parse_cpuinfo(SAPPHIRE_RAPIDS).flags)
    assert not extra_buffers_safe(frozenset({"avx2", "amx_tile"}))
    assert not extra_buffers_safe(None)
    assert extra_buffers_safe(parse_cpuinfo(EPYC).flags)  # AVX2 repacking is kept
    assert extra_buffers_safe(parse_cpuinfo(GRAVITON).flags)


def run_child(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python; fail with the signal's name when the process is killed by one."""
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        pytest.fail(f"the child process was killed by {name} (a crash in native code)\n{child.stderr[-3000:]}")
    assert child.returncode == 0, child.stderr[-3000:]
    return child


def test_the_child_helper_names_the_signal_that_killed_the_child() -> None:
    with pytest.raises(pytest.fail.Exception, match="killed by SIGSEGV"):
        run_child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")


@pytest.fixture(scope="module")
def adapter_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on every linear layer with random lora_B (PEFT starts it at zero), as llama.cpp serves it."""
    model, _ = load_base(SETTINGS)
    peft_model = add_lora(model, LoraSettings())
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    run = new_run(tmp_path_factory.mktemp("runs"), RunSettings(), "federated", {"north": 8})
    checkpoint = save_round(run, 1, peft_model, {"train_loss": 1.0})
    return ensure_served(checkpoint, *shipped_base(SETTINGS))[0]


SERVED = {
    "shipped": lambda: shipped_base(SETTINGS)[0],
    "f16": lambda: served_base(SETTINGS, "f16"),
    "q8_0": lambda: served_base(SETTINGS, "q8_0"),
}
READ_AND_BATCH = """
    import json, sys
    from pathlib import Path
    from federimed.serving.llama_cpp_engine import LlamaCppEngine

    gguf, adapter, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    engine = LlamaCppEngine(
        Path(gguf), None, eos=frozenset(), context_length=2048, adapter_gguf=Path(adapter) if adapter else None
    )
    engine.last_logits(prompt)  # the whole prompt in one batch
    answers = engine.greedy([prompt[: len(prompt) - i] for i in range(4)], max_new_tokens=6, batch_size=4)
    engine.close()
    print(json.dumps(answers))
"""


@needs_llama
@pytest.mark.parametrize("with_adapter", [False, True], ids=["bare", "adapter"])
@pytest.mark.parametrize("copy", list(SERVED))
def test_every_served_gguf_reads_a_long_prompt_and_decodes_a_batch(copy: str, with_adapter: bool, request: pytest.FixtureRequest) -> None:
    """On Intel CPUs with AMX, llama.cpp's AMX kernels killed the process here for the quantised files."""
    tokenizer = AutoTokenizer.from_pretrained(shipped_base(SETTINGS)[1], local_files_only=True)
    prompt = prompt_ids(tokenizer, [{"role": "user", "content": "A 58-year-old patient. New diagnosis: essential hypertension. " * 3}])
    assert len(prompt) >= 32
    adapter = str(request.getfixturevalue("adapter_gguf")) if with_adapter else ""
    answers = json.loads(run_child(READ_AND_BATCH, str(SERVED[copy]()), adapter, json.dumps(prompt)).stdout)
    assert [len(a) for a in answers] == [6] * 4


@needs_llama
def test_llama_cpp_log_stays_off_the_terminal(adapter_gguf: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Loading an adapter onto weights in extra buffers warns once per tensor ("cannot use buft 'AMX'");
    those lines go to DEBUG, nothing to stderr. (Loading is safe with AMX buffers; decoding batches is not.)"""
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="federimed.llama_cpp"):
        llm = load_llama(str(served_base(SETTINGS, "q8_0")), extra_buffers=True, n_ctx=256, lora_path=str(adapter_gguf), verbose=False)
        llm.close()
    assert "cannot use buft" not in capfd.readouterr().err
    records = [r for r in caplog.records if r.name == "federimed.llama_cpp"]
    assert records, "llama.cpp's log reaches Python logging"
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    if this_cpu().flags and AMX_FLAGS & this_cpu().flags:
        assert sum("cannot use buft 'AMX'" in r.getMessage() for r in records) == 210


def test_llama_cpp_takes_the_share_of_cores_its_parent_gave(monkeypatch) -> None:
    from federimed.serving.llama_cpp_engine import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = cpu_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 8))  # never more threads than cores
    assert cpu_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert cpu_threads() == cores
