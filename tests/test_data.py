"""Data pipeline: records -> Examples -> deterministic splits, and the error messages for bad input."""

from __future__ import annotations

import json
import os

import pytest

from conftest import make_toy_tokenizer
from seqcpo.data import (
    PLAIN_TEMPLATE,
    DataConfig,
    DataError,
    Splits,
    assign_splits,
    export_jsonl,
    leading_special_ids,
    load_splits,
    read_records,
    render_prompt,
    split_key,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DOLLY = os.path.join(FIXTURES, "dolly_small.jsonl")
BROKEN = os.path.join(FIXTURES, "broken_line.jsonl")
DOCS = os.path.join(FIXTURES, "documents.txt")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def small(**kw) -> DataConfig:
    kw.setdefault("validation_size", 2)
    kw.setdefault("test_size", 2)
    return DataConfig(**kw)


def all_examples(splits: Splits):
    return splits.train + splits.validation + splits.test


def dolly_rows():
    with open(DOLLY) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture
def chat_tokenizer(toy_tokenizer):
    toy_tokenizer.chat_template = CHAT_TEMPLATE
    yield toy_tokenizer
    toy_tokenizer.chat_template = None


# -- instruction task


def test_dolly_plain_template(toy_tokenizer):
    splits = load_splits(small(dataset=DOLLY, task="instruction"), toy_tokenizer)
    examples = {ex.meta["id"]: ex for ex in all_examples(splits)}
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (8, 2, 2)
    assert sorted(examples, key=int) == [str(i) for i in range(12)]  # ids = 0-based positions
    rows = dolly_rows()
    eos = toy_tokenizer.eos_token_id
    for i, row in enumerate(rows):
        ex = examples[str(i)]
        if row["context"]:
            prompt = PLAIN_TEMPLATE.format(instruction=row["instruction"], context=row["context"])
        else:
            prompt = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
            assert "### Input:" not in ex.meta["prompt"]
        assert ex.meta["prompt"] == prompt
        assert ex.prefix_ids == toy_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ex.continuation_ids == toy_tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [eos]
        assert ex.meta["reference"] == row["response"]
        assert ex.meta["category"] == row["category"]
        assert ex.meta["source"] == DOLLY
        assert not ex.meta["prefix_truncated"] and not ex.meta["continuation_truncated"]


def test_dolly_chat_template(chat_tokenizer):
    splits = load_splits(small(dataset=DOLLY, task="instruction"), chat_tokenizer)  # "auto" -> chat
    assert splits.stats["chat_template"] == 1
    ex = next(e for e in all_examples(splits) if e.meta["id"] == "1")  # the record with a context
    row = dolly_rows()[1]
    expected = f"<|user|>\n{row['instruction']}\n\n{row['context']}\n<|assistant|>\n"
    assert ex.meta["prompt"] == expected
    assert ex.prefix_ids == chat_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert ex.continuation_ids[-1] == chat_tokenizer.eos_token_id
    no_context = next(e for e in all_examples(splits) if e.meta["id"] == "0")
    assert no_context.meta["prompt"] == f"<|user|>\n{dolly_rows()[0]['instruction']}\n<|assistant|>\n"
    plain = render_prompt("Do it.", "", chat_tokenizer, "plain")
    assert plain == "### Instruction:\nDo it.\n\n### Response:\n"


def test_chat_template_required(toy_tokenizer):
    with pytest.raises(DataError, match="no chat template.*prompt_template='plain'"):
        load_splits(small(dataset=DOLLY, task="instruction", prompt_template="chat"), toy_tokenizer)


def test_truncation_keeps_prompt_end_and_response_start(toy_tokenizer):
    cfg = small(dataset=DOLLY, task="instruction", max_prefix_tokens=12, max_continuation_tokens=6)
    splits = load_splits(cfg, toy_tokenizer)
    rows = dolly_rows()
    eos = toy_tokenizer.eos_token_id
    for ex in all_examples(splits):
        row = rows[int(ex.meta["id"])]
        full_prompt = toy_tokenizer(
            render_prompt(row["instruction"], row["context"], toy_tokenizer), add_special_tokens=False
        )["input_ids"]
        response = toy_tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert ex.prefix_ids == full_prompt[-12:]
        assert ex.continuation_ids == response[:5] + [eos]  # 6 tokens including EOS
        assert ex.meta["prefix_truncated"] and ex.meta["continuation_truncated"]
        assert ex.meta["reference"] == toy_tokenizer.decode(response[:5])
        assert ex.meta["prompt"].endswith("### Response:\n")
    assert splits.stats["continuation_truncated"] == 12


def test_bos_tokenizer_gets_bos_before_plain_prompt():
    from tokenizers.processors import TemplateProcessing

    tok = make_toy_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert leading_special_ids(tok) == [1]
    cfg = small(dataset=DOLLY, task="instruction", max_prefix_tokens=10)
    for ex in all_examples(load_splits(cfg, tok)):
        assert ex.prefix_ids[0] == 1 and len(ex.prefix_ids) == 10  # BOS kept when the prompt is cut
        assert 1 not in ex.continuation_ids


# -- continuation task


def test_txt_continuation_windows(toy_tokenizer):
    cfg = small(dataset=DOCS, prefix_tokens=8, continuation_tokens=16, validation_size=1, test_size=1)
    splits = load_splits(cfg, toy_tokenizer)
    assert splits.stats["records"] == 4 and splits.stats["skipped_short"] == 1  # "Short paragraph."
    records, _ = read_records(cfg)
    assert records[2].where == f"{DOCS} line 5 (paragraph 2)"
    for ex in all_examples(splits):
        assert len(ex.prefix_ids) == 8 and len(ex.continuation_ids) == 16
        doc = records[int(ex.meta["id"])].fields["text"]
        tokens = toy_tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert ex.prefix_ids + ex.continuation_ids == tokens[:24]
        assert ex.meta["prompt"] == toy_tokenizer.decode(tokens[:8])
        assert ex.meta["reference"] == toy_tokenizer.decode(tokens[8:24])
        assert ex.meta["category"] is None and ex.meta["window"] == 0


def test_windows_per_document(toy_tokenizer):
    cfg = small(dataset=DOCS, prefix_tokens=8, continuation_tokens=16, windows_per_document=3,
                validation_size=1, test_size=1)
    splits = load_splits(cfg, toy_tokenizer)
    records, _ = read_records(cfg)
    assert len(splits.validation) == len(splits.test) == 1  # evaluation keeps the first window only
    assert all(ex.meta["window"] == 0 for ex in splits.validation + splits.test)
    assert [ex.meta["window"] for ex in splits.train] == [0, 1, 2]
    second = splits.train[1]
    assert second.meta["id"] == f"{splits.train[0].meta['id']}#1"
    tokens = toy_tokenizer(records[int(splits.train[0].meta["id"])].fields["text"], add_special_tokens=False)
    assert second.prefix_ids + second.continuation_ids == tokens["input_ids"][24:48]


def test_txt_rejected_for_instruction_task(toy_tokenizer):
    with pytest.raises(DataError, match="documents.txt.*task=continuation"):
        load_splits(small(dataset=DOCS, task="instruction"), toy_tokenizer)


# -- the embedded Wikipedia default


@pytest.fixture(scope="module")
def wiki_continuation(toy_tokenizer):
    return load_splits(DataConfig(), toy_tokenizer)


@pytest.mark.integration
def test_wiki_continuation(wiki_continuation):
    s = wiki_continuation
    assert len(s.train) > 5000 and len(s.validation) == 64 and len(s.test) == 64
    assert s.stats["records"] == 10033 and s.stats["skipped_short"] > 0
    ex = s.validation[0]
    assert set(ex.meta) >= {"id", "prompt", "reference", "category", "source"}
    assert ex.meta["source"] == "wiki" and ex.meta["category"] in {"People", "Arts", "Geography", "History",
        "Uncategorized", "Biology and health sciences", "Physical sciences", "Society and social sciences",
        "Technology", "Everyday life", "Philosophy and religion", "Mathematics"}
    assert all(len(e.prefix_ids) == 32 and len(e.continuation_ids) == 64 for e in s.train[:200])
    ids = [set(e.meta["id"] for e in part) for part in (s.train, s.validation, s.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


@pytest.mark.integration
def test_wiki_instruction(toy_tokenizer):
    s = load_splits(DataConfig(task="instruction", validation_size=0.01, test_size=0.01), toy_tokenizer)
    assert len(s.train) > 9000 and 50 < len(s.validation) < 150
    ex = next(e for e in s.train if e.meta["id"] == "2001: A Space Odyssey")
    assert ex.meta["prompt"] == (
        "### Instruction:\nWrite the opening paragraph of an encyclopedia article about "
        '"2001: A Space Odyssey" (1968 film by Stanley Kubrick).\n\n### Response:\n'
    )
    assert ex.meta["category"] == "Arts" and ex.meta["context"] == ""
    assert ex.meta["reference"].startswith("2001: A Space Odyssey is a 1968 epic science fiction film")
    assert len(ex.continuation_ids) == 128 and ex.continuation_ids[-1] == toy_tokenizer.eos_token_id


# -- splits


@pytest.mark.integration
def test_wiki_splits_deterministic(wiki_continuation):
    # Same config -> same ids: the assignment is a pure function of (seed, usable ids), checked here against
    # the rule itself (the 64 smallest keys go to validation, the next 64 to test).
    s = wiki_continuation
    usable = [e.meta["id"] for e in all_examples(s)]
    assert assign_splits(usable, 64, 64) == assign_splits(list(usable), 64, 64)
    ranked = sorted(usable, key=lambda i: split_key(0, i))
    assert {e.meta["id"] for e in s.validation} == set(ranked[:64])
    assert {e.meta["id"] for e in s.test} == set(ranked[64:128])
    position = {r.id: k for k, r in enumerate(read_records(DataConfig())[0])}
    assert [position[e.meta["id"]] for e in s.validation] == sorted(position[e.meta["id"]] for e in s.validation)
    reseeded = assign_splits(usable, 64, 64, seed=1)
    assert {i for i, part in zip(usable, reseeded) if part == "validation"} != set(ranked[:64])


def test_split_values_pinned():
    # A stable hash (sha256), not Python's salted hash(): these values hold on every machine.
    out = assign_splits([str(i) for i in range(10)], 2, 2, seed=0)
    assert out.count("validation") == 2 and out.count("test") == 2
    assert out == assign_splits([str(i) for i in range(10)], 2, 2, seed=0)
    assert out == ["train", "train", "train", "test", "validation", "train", "train", "validation", "train", "test"]


def test_adding_records_keeps_assignments_fractions():
    old = [f"doc-{i}" for i in range(1000)]
    new = old + [f"doc-{i}" for i in range(1000, 3000)]
    a, b = assign_splits(old, 0.05, 0.05), assign_splits(new, 0.05, 0.05)
    assert b[:1000] == a
    assert 20 < a.count("validation") < 80


def test_adding_records_counts_never_pull_into_evaluation():
    old = [f"doc-{i}" for i in range(1000)]
    new = old + [f"doc-{i}" for i in range(1000, 1100)]
    a, b = assign_splits(old, 64, 64), assign_splits(new, 64, 64)
    assert b.count("validation") == 64 and b.count("test") == 64
    assert all(y == "train" for x, y in zip(a, b) if x == "train")  # train stays train
    moved = sum(x != y for x, y in zip(a, b))
    assert moved <= 100 // 4  # only boundary records (expected about 128 * 100/1100 = 12)


def test_adding_records_end_to_end(tmp_path, toy_tokenizer):
    rows = dolly_rows()
    with_ids = [dict(r, id=f"q{i}") for i, r in enumerate(rows)]
    first = write_jsonl(tmp_path / "a.jsonl", with_ids)
    more = write_jsonl(tmp_path / "b.jsonl", with_ids + [dict(r, id=f"extra{i}") for i, r in enumerate(rows)])
    cfg = dict(task="instruction", validation_size=0.2, test_size=0.2)
    a = load_splits(DataConfig(dataset=first, **cfg), toy_tokenizer)
    b = load_splits(DataConfig(dataset=more, **cfg), toy_tokenizer)
    for part in ("train", "validation", "test"):
        ids_a = {e.meta["id"] for e in getattr(a, part)}
        ids_b = {e.meta["id"] for e in getattr(b, part)}
        assert ids_a <= ids_b
    assert load_splits(DataConfig(dataset=first, **cfg), toy_tokenizer).validation == a.validation


def test_max_examples_caps_train(toy_tokenizer):
    s = load_splits(small(dataset=DOLLY, task="instruction", max_examples=3), toy_tokenizer)
    assert len(s.train) == 3 and len(s.validation) == 2
    ids = [e.meta["id"] for e in s.train]
    assert ids == sorted(ids, key=int)  # back in source order
    assert ids == [e.meta["id"] for e in load_splits(small(dataset=DOLLY, task="instruction", max_examples=3),
                                                    toy_tokenizer).train]


def test_too_many_evaluation_records(toy_tokenizer):
    with pytest.raises(DataError, match=r"validation_size \+ test_size = 128 .* only 12 usable"):
        load_splits(DataConfig(dataset=DOLLY, task="instruction"), toy_tokenizer)


# -- other sources


def test_json_parquet_and_hub_sources(tmp_path, toy_tokenizer, monkeypatch):
    rows = dolly_rows()
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows))
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({f"k{i}": r for i, r in enumerate(rows)}))
    as_lines = write_jsonl(tmp_path / "lines.json", rows)
    import datasets

    parquet = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    ids = {}
    for path in (str(as_list), str(as_dict), as_lines, parquet):
        recs, source = read_records(small(dataset=path, task="instruction"))
        assert len(recs) == 12 and source == path
        assert recs[3].fields["response"] == rows[3]["response"]
        ids[path] = recs[3].id
    assert ids[str(as_dict)] == "k3" and ids[parquet] == "3"

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    s = load_splits(small(dataset="databricks/databricks-dolly-15k", task="instruction"), toy_tokenizer)
    assert calls == [("databricks/databricks-dolly-15k", None, "train")]
    assert len(all_examples(s)) == 12 and s.train[0].meta["source"] == "databricks/databricks-dolly-15k"

    def failing(name, config=None, split=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="someone/missing-set.*could not load.*offline"):
        load_splits(small(dataset="someone/missing-set", task="instruction"), toy_tokenizer)


def test_export_jsonl(tmp_path, toy_tokenizer):
    s = load_splits(small(dataset=DOLLY, task="instruction"), toy_tokenizer)
    out = tmp_path / "sub" / "validation.jsonl"
    export_jsonl(s.validation, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.meta["id"] for e in s.validation]
    assert rows[0]["prefix_ids"] == s.validation[0].prefix_ids
    assert set(rows[0]) == {"id", "prompt", "reference", "category", "prefix_ids", "continuation_ids"}
    assert os.listdir(out.parent) == ["validation.jsonl"]  # no temp file left behind


# -- bad input: every message names the file, the line and the field


def test_broken_json_line(toy_tokenizer):
    with pytest.raises(DataError) as err:
        load_splits(small(dataset=BROKEN, task="instruction"), toy_tokenizer)
    assert str(err.value).startswith(f"{BROKEN} line 3: not valid JSON (Expecting ',' delimiter")


def test_missing_field(tmp_path, toy_tokenizer):
    rows = dolly_rows()
    rows[2] = {"instruction": "Name a colour.", "context": ""}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)
    assert str(err.value) == (
        f'{path} line 3: missing field "response" (fields present: instruction, context); '
        "map another name with response_field"
    )


def test_field_mapping(tmp_path, toy_tokenizer):
    rows = [{"prompt": r["instruction"], "input": r["context"], "output": r["response"]} for r in dolly_rows()]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    cfg = small(dataset=path, task="instruction", instruction_field="prompt", context_field="input",
                response_field="output")
    s = load_splits(cfg, toy_tokenizer)
    assert len(all_examples(s)) == 12 and all(e.meta["category"] is None for e in s.train)


def test_empty_and_wrongly_typed_fields(tmp_path, toy_tokenizer):
    rows = dolly_rows()
    rows[6]["response"] = "   "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError, match=rf'^{path} line 7: field "response" is empty$'):
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)
    rows[6]["response"] = 42
    path = write_jsonl(tmp_path / "typed.jsonl", rows)
    with pytest.raises(DataError, match=rf'^{path} line 7: field "response" must be a string, got int$'):
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)
    rows[6] = ["not", "an", "object"]
    path = write_jsonl(tmp_path / "list.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path} line 7: expected a JSON object, got list$"):
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)


def test_missing_text_field_continuation(tmp_path, toy_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "some text"}])
    with pytest.raises(DataError, match=rf'^{path} line 1: missing field "text" \(fields present: body\); '
                                        "map another name with text_field$"):
        load_splits(small(dataset=path), toy_tokenizer)
    # an instruction file read as continuation text: the error names the task that fits, not only text_field
    path = write_jsonl(tmp_path / "instr.jsonl", dolly_rows())
    with pytest.raises(DataError, match=rf'^{path} line 1: missing field "text" .*map another name with text_field, '
                                        r"or set task: instruction \(--task instruction\)"):
        load_splits(small(dataset=path), toy_tokenizer)
    path = write_jsonl(tmp_path / "plain.jsonl", [{"id": "a", "text": "one two three"}])
    with pytest.raises(DataError, match=r"or set task: continuation \(--task continuation\)"):
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)


def test_duplicate_ids(tmp_path, toy_tokenizer):
    rows = [dict(r, id="same" if i in (1, 4) else str(i)) for i, r in enumerate(dolly_rows())]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path} line 5: duplicate id 'same' \(first at {path} line 2\)"):
        load_splits(small(dataset=path, task="instruction"), toy_tokenizer)


def test_missing_file_and_unknown_extension(tmp_path, toy_tokenizer):
    missing = str(tmp_path / "data" / "train.jsonl")
    with pytest.raises(DataError, match=rf"^{missing}: no such file"):
        load_splits(small(dataset=missing), toy_tokenizer)
    odd = tmp_path / "train.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError, match=rf"^{odd}: unknown file extension '.csv'; use one of .jsonl"):
        load_splits(small(dataset=str(odd)), toy_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{empty}: no records"):
        load_splits(small(dataset=str(empty)), toy_tokenizer)


def test_zero_usable_examples(toy_tokenizer):
    with pytest.raises(DataError) as err:
        load_splits(small(dataset=DOCS, prefix_tokens=500, continuation_tokens=500), toy_tokenizer)
    assert str(err.value) == (
        f"{DOCS}: no usable examples: all 4 documents are shorter than prefix_tokens + continuation_tokens = "
        "1000 tokens; lower prefix_tokens or continuation_tokens"
    )


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a",\n   "response": }\n]')
    with pytest.raises(DataError, match=rf"^{path} line 3: not valid JSON \(Expecting value"):
        read_records(small(dataset=str(path), task="instruction"))


def test_config_validation():
    with pytest.raises(ValueError, match="task='dolly': choose one of continuation, instruction"):
        DataConfig(task="dolly")
    with pytest.raises(ValueError, match="validation_size=2.5"):
        DataConfig(validation_size=2.5)
    with pytest.raises(ValueError, match="leaves no training data"):
        DataConfig(validation_size=0.5, test_size=0.5)
    fields = DataConfig.__dataclass_fields__.values()
    assert all(f.metadata.get("help") for f in fields)


def test_skip_bad_records(tmp_path, toy_tokenizer, caplog):
    rows = dolly_rows()
    rows[6]["response"] = ""
    del rows[9]["instruction"]
    path = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    with caplog.at_level("WARNING", logger="seqcpo.data"):
        s = load_splits(small(dataset=path, task="instruction", skip_bad_records=True), toy_tokenizer)
    assert s.stats["skipped_bad"] == 2 and s.stats["records"] == 12 and len(all_examples(s)) == 10
    assert {"6", "9"}.isdisjoint(e.meta["id"] for e in all_examples(s))
    assert f'{path} line 7: field "response" is empty' in caplog.text


def test_saved_dataset_folder(tmp_path, toy_tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(dolly_rows())}).save_to_disk(tmp_path / "dolly")
    s = load_splits(small(dataset=str(tmp_path / "dolly"), task="instruction"), toy_tokenizer)
    assert len(all_examples(s)) == 12
