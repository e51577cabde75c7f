"""Preference data in: TRL's standard and conversational formats (explicit and implicit prompt), several rejected
answers, ranked lists with scores or ranks (ties), streaming, and one-line errors naming file, row and field."""

import json

import pytest

from conftest import make_toy_tokenizer
from seqcpo.data import DataConfig, DataError, load_splits
from seqcpo.data.examples import record_examples
from seqcpo.data.sources import Record

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = make_toy_tokenizer()
    t.chat_template = CHAT
    return t


def _one(tok, fields, **cfg):
    pairs, stats = record_examples([Record("r0", fields, "prefs.jsonl line 3")], DataConfig(**cfg), tok, "prefs.jsonl")
    assert len(pairs) == 1
    return pairs[0][1][0], stats


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_standard_explicit_prompt_is_detected_and_tokenized_apart(tok):
    ex, stats = _one(tok, {"prompt": "The quick", "chosen": " brown fox", "rejected": " lazy dog"})
    assert ex.prefix_ids == _ids(tok, "The quick")
    assert ex.continuation_ids == _ids(tok, " brown fox") + [tok.eos_token_id]
    assert ex.rejected_ids == [_ids(tok, " lazy dog") + [tok.eos_token_id]]
    assert ex.scores is None and ex.meta["format"] == "standard/pairs"
    assert stats["rejected_answers"] == 1


def test_standard_implicit_prompt_is_the_common_beginning(tok):
    ex, _ = _one(tok, {"chosen": "Paris is the capital", "rejected": ["Paris is a city", "Paris is big"]})
    assert ex.meta["prompt"] == "Paris is"  # the answers keep their leading space
    assert ex.continuation_ids == _ids(tok, " the capital") + [tok.eos_token_id]
    assert ex.rejected_ids == [_ids(tok, " a city") + [2], _ids(tok, " big") + [2]]
    assert ex.meta["format"] == "standard/pairs/implicit"


def test_conversational_rows_go_through_the_chat_template_and_score_the_answer_only(tok):
    prompt = [{"role": "user", "content": "Name a city."}]
    ex, _ = _one(tok, {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris"}],
                       "rejected": [[{"role": "assistant", "content": "Bread"}], [{"role": "assistant", "content": "Fog"}]]})
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<|assistant|>") and ex.meta["prompt"] == prompt_text
    assert ex.prefix_ids == _ids(tok, prompt_text)
    assert ex.continuation_ids == _ids(tok, "Paris\n")  # the rest of prompt + answer, as the template ends it
    assert ex.rejected_ids == [_ids(tok, "Bread\n"), _ids(tok, "Fog\n")]
    # implicit prompt: the leading messages the conversations share
    implicit, _ = _one(tok, {"chosen": prompt + [{"role": "assistant", "content": "Paris"}],
                             "rejected": prompt + [{"role": "assistant", "content": "Bread"}]})
    assert implicit.prefix_ids == ex.prefix_ids and implicit.continuation_ids == ex.continuation_ids
    assert implicit.meta["format"] == "conversational/pairs/implicit"


def test_ranked_lists_sort_best_first_with_ties_in_file_order(tok):
    ex, _ = _one(tok, {"prompt": "Q", "completions": ["a fox", "the dog", "a cat", "salt"], "scores": [1, 3, 3, 0.5]})
    assert ex.continuation_ids == _ids(tok, "the dog") + [2]  # the first listed of the two best
    assert ex.rejected_ids == [_ids(tok, t) + [2] for t in ("a cat", "a fox", "salt")]
    assert ex.scores == [3.0, 3.0, 1.0, 0.5]
    by_rank, _ = _one(tok, {"prompt": "Q", "completions": ["a fox", "the dog"], "ranks": [2, 1]})
    assert by_rank.continuation_ids == _ids(tok, "the dog") + [2] and by_rank.scores == [-1.0, -2.0]


def test_answers_are_cut_to_the_context_and_counted(tok):
    long = " ".join(["river"] * 30)
    ex, stats = _one(tok, {"prompt": "Q", "chosen": long, "rejected": "fog"}, max_context_tokens=12)
    assert len(ex.prefix_ids) + len(ex.continuation_ids) == 12 and ex.continuation_ids[-1] == 2
    assert stats["continuation_truncated"] == 1
    pairs, stats = record_examples([Record("r0", {"prompt": "Q", "chosen": long, "rejected": "fog"}, "f line 1")],
                                   DataConfig(max_context_tokens=12, overlong="skip"), tok, "f")
    assert pairs == [] and stats["skipped_long"] == 1


@pytest.mark.parametrize("fields, message", [
    ({"question": "x", "answer": "y"}, 'no preference format fits this row .*fields present: question, answer'),
    ({"prompt": "x", "chosen": "  ", "rejected": "b"}, 'field "chosen" is empty'),
    ({"prompt": "x", "chosen": "a", "rejected": ["b", ""]}, r'field "rejected\[1\]" is empty'),
    ({"prompt": "x", "chosen": "a b", "rejected": ["c", " a b "]}, r'field "rejected\[1\]" equals the chosen answer'),
    ({"prompt": "x", "completions": ["a", "b", "a"], "scores": [3, 2, 1]}, r'field "completions\[2\]" equals the chosen'),
    ({"prompt": "x", "completions": ["a", "b"], "scores": [1]}, 'field "scores" must be a list of 2 numbers'),
    ({"prompt": "x", "completions": ["a", "b"]}, 'field "completions" needs "scores"'),
    ({"prompt": "x", "chosen": "a"}, 'field "chosen" without "rejected"'),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}, 'field "prompt" must be a string'),
    ({"chosen": "same start", "rejected": "same start and more"}, 'no field "prompt", and one answer is the others\' common beginning'),
    # campaign 2: contradictory rows were read by one of their readings, a huge score or a lone surrogate crashed
    ({"prompt": "x", "chosen": "a", "rejected": "b", "completions": ["a", "b"], "scores": [1, 0]},
     'fields "chosen" and "completions" both given'),
    ({"prompt": "x", "completions": ["a", "b"], "scores": [1, 0], "ranks": [2, 1]}, 'fields "scores" and "ranks" both'),
    ({"prompt": "x", "completions": ["a", "b"], "ranks": [0, -1]}, r'field "ranks\[0\]" must be a whole number >= 1'),
    ({"prompt": "x", "completions": ["a", "b"], "ranks": [1, 2.7]}, r'field "ranks\[1\]" must be a whole number >= 1'),
    ({"prompt": "x", "completions": ["a", "b"], "scores": [10 ** 400, 0]}, r'field "scores\[0\]" must be a finite number'),
    ({"prompt": "x", "chosen": "a\ud800b", "rejected": "b"}, 'field "chosen" holds an unpaired surrogate'),
    ({"prompt": "x\udc00", "chosen": "a", "rejected": "b"}, 'field "prompt" holds an unpaired surrogate'),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a\ud800"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r'field "chosen\[0\].content" holds an unpaired'),
    # campaign 3: a malformed chat message was reported as "must be a string ..., got list"
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r'field "chosen\[0\]" is a message without "content"'),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": None}]}, r'field "rejected\[0\]" has "content" None; it must be a'),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}, "more"],
      "rejected": [{"role": "assistant", "content": "b"}]}, r'field "chosen\[1\]" is str, not a message'),
    ({"prompt": [{"content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r'field "prompt\[0\]" is a message without "role"'),
    ({"prompt": [{"role": "user", "content": 7}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r'field "prompt\[0\]" has "content" 7'),
    ({"prompt": "x", "chosen": ["a", "b"], "rejected": "c"}, r'field "chosen" must be a string .* got a list of str$'),
])
def test_bad_rows_name_the_file_row_and_field(tok, fields, message):
    with pytest.raises(DataError, match="^prefs.jsonl line 3: " + message):
        record_examples([Record("r0", fields, "prefs.jsonl line 3")], DataConfig(task="preference"), tok, "prefs.jsonl")


def test_a_prompt_with_no_room_for_the_answer_is_an_error(tok):
    fields = {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match='line 3: field "prompt" is .* leaves no room for an answer in the context of 20'):
        _one(tok, fields, max_context_tokens=20)


def test_conversational_rows_need_a_chat_template():
    plain = make_toy_tokenizer()
    with pytest.raises(DataError, match="line 3: a conversational row needs a tokenizer with a chat template"):
        _one(plain, {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
                     "rejected": [{"role": "assistant", "content": "b"}]})


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_a_file_loads_by_its_fields_and_errors_name_its_line(tok, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Q{i}", "chosen": f"the river {i}", "rejected": [f"fog {i}", f"salt {i}"]}
            for i in range(6)]
    path = _write(tmp_path / "prefs.jsonl", rows)
    splits = load_splits(DataConfig(dataset=path, validation_size=1, test_size=1), tok)  # task left at its default
    assert len(splits.train) == 4 and all(len(e.rejected_ids) == 2 for e in splits.train)
    bad = _write(tmp_path / "bad.jsonl", rows[:2] + [{"id": "x", "prompt": "Q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r'bad.jsonl line 3: field "rejected" equals the chosen answer'):
        load_splits(DataConfig(dataset=bad, validation_size=0, test_size=0), tok)


def test_streaming_items_carry_the_rejected_answers(tok, tmp_path):
    from seqcpo.data.streaming import load_streaming

    rows = [{"id": f"p{i}", "prompt": f"Q{i}", "completions": [f"fog {i}", f"the river {i}"], "scores": [0, 1]}
            for i in range(5)]
    path = _write(tmp_path / "ranked.jsonl", rows)
    data = load_streaming(DataConfig(dataset=path, streaming=True, validation_size=0, test_size=0), tok,
                          need_validation=False)
    it = iter(data.train(tok))
    first = next(it)
    assert first["continuation_ids"] == _ids(tok, "the river 0") + [2]
    assert first["rejected_ids"] == [_ids(tok, "fog 0") + [2]] and first["scores"] == [1.0, 0.0]


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_streaming_reads_rows_whose_field_types_vary_exactly_as_without_streaming(tok, tmp_path, ext):
    """Defect: streamed JSON went through datasets' reader, which turns a field whose type varies across rows into
    JSON text and gives every row every column: a row's rejected list became one negative '["fog 1", "salt 1"]',
    a lone one kept its quotes ('"fog 0"'), string ids next to integer ones became '"s4"' (another split), and a
    ranked row in a file of chosen/rejected rows was refused for a "chosen" it does not have."""
    from seqcpo.data.streaming import load_streaming

    rows = [{"id": 0, "prompt": "Q0", "chosen": "the river 0", "rejected": "fog 0"}]
    rows += [{"id": i if i < 4 else f"s{i}", "prompt": f"Q{i}", "chosen": f"the river {i}",
              "rejected": [f"fog {i}", f"salt {i}"]} for i in range(1, 8)]
    rows += [{"id": "x", "prompt": "Qx", "completions": ["fog x", "the river x"], "scores": [0, 1]}]
    if ext == ".jsonl":
        path = _write(tmp_path / "mixed.jsonl", rows)
    else:
        path = str(tmp_path / "mixed.json")
        with open(path, "w") as fh:
            json.dump(rows, fh)
    c = dict(dataset=path, validation_size=2, test_size=2)
    memory = load_splits(DataConfig(**c), tok)
    stream = load_streaming(DataConfig(**c, streaming=True), tok, need_validation=True, need_test=True)

    def key(e):
        return str(e.meta["id"]), list(e.continuation_ids), [list(r) for r in e.rejected_ids]

    assert [key(e) for e in stream.validation] == [key(e) for e in memory.validation]
    assert [key(e) for e in stream.test] == [key(e) for e in memory.test]
    train, it = [], iter(stream.train(tok))
    for _ in range(len(memory.train)):
        item = next(it)
        train.append((item["id"], list(item["continuation_ids"]), [list(r) for r in item["rejected_ids"]]))
    assert train == [key(e) for e in memory.train]
    by_id = dict((i, rej) for i, _, rej in train + [key(e) for e in memory.validation + memory.test])
    assert by_id["1"] == [_ids(tok, "fog 1") + [2], _ids(tok, "salt 1") + [2]]
    assert by_id["0"] == [_ids(tok, "fog 0") + [2]] and "s4" in by_id


def test_null_fields_are_absent_so_a_mixed_parquet_file_reads(tok, tmp_path):
    """A Parquet (or Arrow) table gives every row every column, null where the row had none: a ranked row beside
    chosen/rejected rows was refused for a "chosen" it does not have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"p{i}", "prompt": f"Q{i}", "chosen": f"the river {i}", "rejected": f"fog {i}"} for i in range(4)]
    rows.append({"id": "x", "prompt": "Qx", "completions": ["fog x", "the river x"], "scores": [0.0, 1.0]})
    path = tmp_path / "mixed.parquet"
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("completions", pa.list_(pa.string())),
                        ("scores", pa.list_(pa.float64()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    splits = load_splits(DataConfig(dataset=str(path), validation_size=0, test_size=0), tok)
    by_id = {e.meta["id"]: e for e in splits.train}
    assert set(by_id) == {"p0", "p1", "p2", "p3", "x"}
    assert by_id["x"].continuation_ids == _ids(tok, "the river x") + [2] and by_id["x"].scores == [1.0, 0.0]


def test_an_unpaired_surrogate_in_a_text_field_is_one_line(tmp_path):
    from seqcpo.data.fields import text_records

    recs = [Record("r0", {"text": "fine"}, "d.jsonl line 1"), Record("r1", {"text": "bad \ud800 text"}, "d.jsonl line 2")]
    with pytest.raises(DataError, match=r'^d.jsonl line 2: field "text" holds an unpaired surrogate'):
        text_records(recs, DataConfig(task="continuation"))
    kept, _, bad = text_records(recs, DataConfig(task="continuation", skip_bad_records=True))
    assert [r.id for r in kept] == ["r0"] and bad == 1


def test_the_task_shown_for_a_preference_file_is_preference(tok, tmp_path):
    """Campaign 2: the dry run and the streaming log called a preference file's task "continuation" (the default
    the rows override)."""
    from seqcpo.data.streaming import load_streaming

    rows = [{"id": f"p{i}", "prompt": f"Q{i}", "chosen": f"the river {i}", "rejected": f"fog {i}"} for i in range(8)]
    path = _write(tmp_path / "prefs.jsonl", rows)
    for sizes in (dict(validation_size=1, test_size=1), dict(validation_size=0.2, test_size=0.2)):
        assert load_splits(DataConfig(dataset=path, **sizes), tok).stats["task"] == "preference"
        stream = load_streaming(DataConfig(dataset=path, streaming=True, **sizes), tok)
        assert stream.stats["task"] == "preference"
