"""Serving: the generation engines behind the assistant and the evaluation.

`backend` holds the engine interface and the transformers reference; `llama_cpp_engine` runs the
base GGUF with llama.cpp; `gguf_lora` exports a PEFT checkpoint as a llama.cpp LoRA adapter (cached
per checkpoint); `select` picks the engine for a model and version.
"""
