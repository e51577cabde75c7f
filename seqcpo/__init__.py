"""seqcpo: sequence-level training of causal LMs with Contrastive Preference Optimization.

Feng et al., "Sequence-level Large Language Model Training with Contrastive Preference Optimization",
Findings of NAACL 2025 (arXiv 2502.16433); the method as implemented here is docs/method.md.

The trainer, TRL-style::

    from seqcpo import SeqCPOConfig, SeqCPOTrainer
    trainer = SeqCPOTrainer(model=model, args=SeqCPOConfig(output_dir="runs/x", task="continuation"),
                            train_dataset=raw_records, processing_class=tokenizer)

(``SeqCPOTrainer`` and ``SeqCPOConfig`` are imported on first use: ``import seqcpo`` stays light.)
"""

__version__ = "0.1.0"

__all__ = ["SeqCPOConfig", "SeqCPOTrainer", "__version__"]


def __getattr__(name: str):
    if name == "SeqCPOTrainer":
        from seqcpo.training.trainer import SeqCPOTrainer

        return SeqCPOTrainer
    if name == "SeqCPOConfig":
        from seqcpo.training.config import SeqCPOConfig

        return SeqCPOConfig
    raise AttributeError(f"module 'seqcpo' has no attribute {name!r}")
