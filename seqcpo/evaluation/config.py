"""One evaluation config: :class:`EvalConfig` (with its :class:`JudgeConfig`), read by ``seqcpo generate``,
``seqcpo eval`` (flags, or ``--config FILE.yaml``) and a grid's ``eval:`` block alike.

Every field is parsed and range-checked by :mod:`seqcpo.config_loader` where it enters; the judge's settings
travel as these typed fields to :func:`make_judge`, to the win-rate rules and into the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from seqcpo.config_loader import ConfigError, check_fields
from seqcpo.evaluation.judges import DEFAULT_API_KEY_ENV, check_judge, make_judge  # noqa: F401  (the one entry)

SPLITS = ("train", "validation", "test")
JUDGE_BACKENDS = ("none", "local", "openai")
ORDERS = ("both", "random")
MAUVE_FEATURES = ("minilm", "model", "none")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class JudgeConfig:
    """The pairwise judge (``--judge-*`` flags; a grid's ``eval.judge`` mapping, or just its backend name)."""

    backend: str = field(default="none", metadata={"help": "none | local (a causal LM by answer log-probs) | "
                                                            "openai (an OpenAI-compatible API).",
                                                    "allowed": JUDGE_BACKENDS})
    model: Optional[str] = field(default=None, metadata={
        "help": "openai: the model name sent to the API; local: checkpoint folder or name."})
    url: Optional[str] = field(default=None, metadata={
        "help": "openai: API base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1."})
    api_key_env: str = field(default=DEFAULT_API_KEY_ENV, metadata={
        "help": "Name of the environment variable that holds the API key (the key itself is never an option)."})
    prompt: Optional[str] = field(default=None, metadata={
        "help": "Judge prompt template with {prompt}, {a}, {b} (default: the packaged one)."})
    concurrency: int = field(default=8, metadata={"help": "openai: requests in flight.", "check": ">=1"})
    max_retries: int = field(default=5, metadata={"help": "openai: retries on 429/5xx/time-outs.", "check": ">=0"})
    timeout: float = field(default=60.0, metadata={"help": "openai: seconds per request.", "check": ">0"})
    max_tokens: int = field(default=16, metadata={"help": "openai: max_tokens per reply (0 = not sent).",
                                                  "check": ">=0"})
    cache: Optional[str] = field(default=None, metadata={
        "help": "Verdict cache folder (default: OUT/judge_cache; a grid's out_dir/judge_cache)."})
    debias: bool = field(default=True, metadata={
        "help": "local: combine the two orders by summed answer log-odds (position bias cancels) instead of "
                "arg-max verdicts (disagreement = tie)."})
    tie_margin: float = field(default=0.0, metadata={
        "help": "local, debiased: summed log-odds within this band count as a tie.", "check": ">=0"})
    note: Optional[str] = field(default=None, metadata={"help": "Free text printed under the judge in the report."})

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_scalar(cls, backend: str) -> dict:
        """``judge: local`` in a grid means ``judge: {backend: local}``."""
        return {"backend": backend}

    @property
    def uses_log_odds(self) -> bool:
        """True when the win rate reads summed answer log-odds over both orders (the local judge, debiased)."""
        return self.backend == "local" and self.debias


@dataclass
class EvalConfig:
    """What ``seqcpo generate`` / ``seqcpo eval`` / a grid's ``eval:`` block generate, judge and score.

    Models, labels, alphas, head-to-head pairs and ``out`` come from the command line (a grid sets them from
    its arms); the data from ``data_config`` plus the data flags (a grid: each arm's config).
    """

    # -- models (command line; a grid sets them)
    models: list[str] = field(default_factory=list, metadata={"help": "Checkpoint folders or names."})
    labels: Optional[list[str]] = field(default=None, metadata={
        "help": "A display label per model (default: folder names)."})
    alphas: Optional[list[float]] = field(default=None, metadata={
        "help": "Ensemble alpha per model (default: read from each checkpoint's seqcpo_ensemble.json)."})
    head_to_head: list[list[str]] = field(default_factory=list, metadata={
        "help": "Pairs [X, Y]: also judge model X against model Y (labels or paths)."})
    out: Optional[str] = field(default=None, metadata={"help": "Output folder."})
    data_config: Optional[str] = field(default=None, metadata={
        "help": "YAML with DataConfig fields (under 'data:', or at the top level of a training config such as "
                "configs/demo.yaml, whose other fields are left out); over the checkpoint's own data settings."})
    checkpoint_data: bool = field(default=True, metadata={
        "help": "Start from the data settings in the seqcpo_config.yaml of the first model that has one "
                "(its training split settings); false: from the DataConfig defaults."})
    allow_train_overlap: bool = field(default=False, metadata={
        "help": "Score items that are in a model's training split anyway (flagged in the report) instead of "
                "refusing them."})
    # -- what to generate
    split: str = field(default="test", metadata={"help": "Data split to evaluate.", "allowed": SPLITS})
    num_examples: int = field(default=64, metadata={
        "help": "First N examples of the split; 0 = all (negative numbers are refused).", "check": ">=0"})
    decoding: list[str] = field(default_factory=lambda: ["greedy"], metadata={
        "help": "Decoding specs: greedy, sample:t=0.7,p=0.9, beam:n=4, topk:k=50 (keys t p k n m s)."})
    max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "Default: the data's continuation length (continuation_tokens / max_continuation_tokens).",
        "check": ">=1"})
    seed: int = field(default=0, metadata={"help": "Base sampling seed of the decoding configs."})
    batch_size: int = field(default=16, metadata={"help": "Generation batch size.", "check": ">=1"})
    dtype: str = field(default="float32", metadata={"help": "Model dtype.", "allowed": DTYPES})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, or auto."})
    # -- how to score
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"help": "The pairwise judge (JudgeConfig)."})
    order: str = field(default="both", metadata={
        "help": "both: judge each pair in both orders (disagreement = tie); random: one seeded order.",
        "allowed": ORDERS})
    order_seed: int = field(default=0, metadata={"help": "Seed of order random."})
    mauve: str = field(default="minilm", metadata={
        "help": "MAUVE features: all-MiniLM-L6-v2, the evaluated model's mean-pooled hidden states, or none.",
        "allowed": MAUVE_FEATURES})
    ppl: bool = field(default=True, metadata={"help": "Gold-continuation perplexity of each model."})
    baseline: Optional[str] = field(default=None, metadata={
        "help": "Grid: the arm every other arm meets head to head (needs a judge)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        check_fields(self)
        for i, pair in enumerate(self.head_to_head):
            if len(pair) != 2:
                raise ConfigError(f"head_to_head[{i}]={pair!r}: give two models, X and Y")
        if self.labels is not None and self.models and len(self.labels) != len(self.models):
            raise ConfigError(f"--labels: got {len(self.labels)} labels for {len(self.models)} models")
        if self.alphas is not None and self.models and len(self.alphas) != len(self.models):
            raise ConfigError(f"--alphas: got {len(self.alphas)} values for {len(self.models)} models")

    def generation_key(self) -> dict:
        """The options that decide the generations (a grid's stage fingerprint)."""
        return {k: getattr(self, k) for k in ("split", "num_examples", "decoding", "max_new_tokens", "seed",
                                              "dtype", "ppl")}

    def scoring_key(self) -> dict:
        """The options that decide the scores of given generations (a grid's stage fingerprint)."""
        return {"judge": dataclasses.asdict(self.judge), "order": self.order, "order_seed": self.order_seed,
                "mauve": self.mauve, "baseline": self.baseline}


def config_reference_lines() -> list[str]:
    """Markdown tables of :class:`EvalConfig` and :class:`JudgeConfig` (part of ``docs/CONFIG.md``)."""
    from seqcpo.config_loader import field_rules

    lines = ["## Evaluation (`seqcpo eval`, `seqcpo generate`, a grid's `eval:` block)", "",
             "Generated from `seqcpo.evaluation.config.EvalConfig`. On the command line a field is a flag with dashes",
             "(`--num-examples 8`); `--judge X` sets `judge.backend`, `--judge-model` `judge.model` and so on;",
             "`--mauve-features` sets `mauve`; a bool field `x` is `--x [BOOL]` or `--no-x` (`--no-ppl`,",
             "`--no-judge-debias`). `--a_b` and `--a-b` are the same flag; number lists take `0,0.5` or `0 0.5`.",
             "`--config FILE.yaml` reads the same fields from YAML (flags win).", ""]
    for cls in (EvalConfig, JudgeConfig):
        rules = field_rules(cls)
        lines += [f"### `{cls.__name__}`", "", "| field | default | range | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                made = f.default_factory()  # type: ignore[misc]
                default = type(made).__name__ + "()" if dataclasses.is_dataclass(made) else repr(made)
            else:
                default = ""
            rule = rules.get(f.name) or ("one of " + ", ".join(f.metadata["allowed"]) if "allowed" in f.metadata
                                          else "")
            rule = f"`{rule}`" if rule else ""
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{default}` | {rule} | {help_text} |")
        lines.append("")
    return lines
