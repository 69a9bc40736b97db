"""Accelerator check of the training path: load → LoRA → train → checkpoint → reload → generate.

Runs FederiMed's own model, training and checkpoint code on whatever device `ModelSettings(device="auto")`
picks (CUDA + bfloat16 when present) and writes what it measured to bench/results/gpu_check.json.

    python bench/gpu_check.py --dialogues data/hospitals/general/train.jsonl            # default base model
    python bench/gpu_check.py --tiny-from TOKENIZER_DIR --dialogues FILE                # a small random
        Llama built on the spot with that tokenizer: a "local path" base model, for machines without the GGUF
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from federimed.checkpoints import new_run, save_round
from federimed.config import LoraSettings, ModelSettings, RunSettings, TrainSettings
from federimed.model import add_lora, load_base, load_for_inference
from federimed.training import encode_dialogues, evaluate_loss, load_dialogues, train_local

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"


def tiny_llama(tokenizer_dir: Path, out: Path) -> Path:
    """Save a small randomly initialised Llama with the tokenizer in `tokenizer_dir` to `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model alias, Hugging Face id or local path")
    parser.add_argument("--tiny-from", type=Path, default=None, help="build a small random Llama with this tokenizer")
    parser.add_argument("--dialogues", type=Path, required=True, help="a train.jsonl of ingested dialogues")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="federimed-gpu-"))
    base = str(tiny_llama(args.tiny_from, work / "tiny-llama")) if args.tiny_from else args.base
    model_settings = ModelSettings(**({"base": base} if base else {}))
    train = TrainSettings(local_steps=args.steps, batch_size=args.batch_size, seq_len=256)
    settings = RunSettings(model=model_settings, lora=LoraSettings(), train=train, rounds=1)

    started = time.perf_counter()
    model, tokenizer = load_base(model_settings)
    load_s = time.perf_counter() - started
    model = add_lora(model, settings.lora)
    examples = encode_dialogues(tokenizer, load_dialogues(args.dialogues), train.seq_len)
    loss_before, _ = evaluate_loss(model, examples)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    result = train_local(model, tokenizer, examples, train, steps=args.steps)
    loss_after, _ = evaluate_loss(model, examples)

    run = new_run(work / "runs", settings, "centralized", {"check": len(examples)})
    checkpoint = save_round(run, 1, model, {"train_loss": result.loss})
    reloaded, tok = load_for_inference(model_settings, checkpoint)
    prompt = tok.apply_chat_template(load_dialogues(args.dialogues)[0]["messages"][:2], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True).to(reloaded.device)
    started = time.perf_counter()
    output = reloaded.generate(**prompt, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    generate_s = time.perf_counter() - started
    new_tokens = output.shape[1] - prompt["input_ids"].shape[1]

    report = {
        "machine": platform.node(),
        "device": torch.cuda.get_device_name(0) if model.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "base": model_settings.base,
        "model_device": str(model.device),
        "model_dtype": str(next(model.parameters()).dtype),
        "load_s": round(load_s, 2),
        "examples": len(examples),
        "steps": result.steps,
        "train_tokens_per_s": round(result.tokens_per_s, 1),
        "loss_before": round(loss_before, 4),
        "loss_after": round(loss_after, 4),
        "reloaded_device": str(reloaded.device),
        "generate_tokens_per_s": round(new_tokens / generate_s, 1),
        "sample_answer": tok.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if loss_after >= loss_before:
        raise SystemExit("training did not lower the loss on its own data")


if __name__ == "__main__":
    main()
