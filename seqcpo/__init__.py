"""seqcpo: sequence-level training of causal LMs with Contrastive Preference Optimization.

Feng et al., "Sequence-level Large Language Model Training with Contrastive Preference Optimization",
Findings of NAACL 2025 (arXiv 2502.16433).
"""

__version__ = "0.1.0"
