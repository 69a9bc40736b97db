"""FederiMed: federated LoRA fine-tuning of a clinical LLM, and a guideline-grounded doctors' chat."""

__version__ = "0.1.0"
