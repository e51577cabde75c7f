"""Negative generators for CPO (docs/method.md, "Negatives": AN, BN, MN, TN and their mixtures).

Every generator follows :class:`NegativeGenerator`: ``gen(examples, k, generator, ranked=False)``
returns :class:`seqcpo.types.Negatives` with exactly K negatives per example, all randomness drawn
from seeded ``torch.Generator`` objects, one per example (:mod:`seqcpo.seeding`; BN's pool is its batch by
definition), rows sorted best first when ``ranked`` (scores non-increasing),
and a negative equal to its gold never valid (it is redrawn, or kept with ``valid=False``).
Build one from a spec string with :func:`build_negative_generator` ("an:2,tn:2").
"""

from seqcpo.negatives.autoregressive import AutoregressiveNegatives, DecodingConfig
from seqcpo.negatives.base import NegativeGenerator, uses_gold_logits
from seqcpo.negatives.batch import BatchNegatives
from seqcpo.negatives.mean_field import MeanFieldNegatives, mean_field_negatives_from_logits
from seqcpo.negatives.mixture import MixtureNegatives
from seqcpo.negatives.registry import GENERATOR_NAMES, build_negative_generator, parse_spec
from seqcpo.negatives.similarity import lcs_length, rouge_l_f
from seqcpo.negatives.truncation import TruncationNegatives

__all__ = [
    "AutoregressiveNegatives",
    "BatchNegatives",
    "DecodingConfig",
    "GENERATOR_NAMES",
    "MeanFieldNegatives",
    "MixtureNegatives",
    "NegativeGenerator",
    "TruncationNegatives",
    "build_negative_generator",
    "lcs_length",
    "mean_field_negatives_from_logits",
    "parse_spec",
    "rouge_l_f",
    "uses_gold_logits",
]
