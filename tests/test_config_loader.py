"""The one config loader (seqcpo.config_loader) behind every command: values parsed by the field's type, from
YAML and from the command line alike; unknown keys, wrong types and out-of-range values refused with one line
naming the place and the field or flag; the negatives' options declared once; EvalConfig for eval, generate and
a grid's eval block."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest

from seqcpo.config_loader import ConfigError, check_value, load_dataclass, parse_cli_overrides
from seqcpo.training.config import SeqCPOConfig, load_config, parse_overrides

BASE = {"report_to": "none", "use_cpu": True}


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def _cfg(tmp_path, text="", argv=()):
    return load_config(_yaml(tmp_path, text), {**BASE, "output_dir": str(tmp_path / "o"), **parse_overrides(list(argv))})


# ----------------------------------------------------------------------------- values by the field's type


def test_no_stays_a_string_from_yaml_and_command_line(tmp_path):
    # YAML 1.1 reads `no` as False; transformers then fails with "False is not a valid SaveStrategy"
    assert _cfg(tmp_path, "save_strategy: no\n").save_strategy == "no"
    assert _cfg(tmp_path, "", ["--save_strategy", "no"]).save_strategy == "no"
    # a str | bool field keeps the string too
    assert _cfg(tmp_path, "include_num_input_tokens_seen: no\n").include_num_input_tokens_seen == "no"
    # strings stay strings in str fields, whatever they look like
    cfg = _cfg(tmp_path, "run_name: off\n", ["--hub_model_id", "1e-5"])
    assert cfg.run_name == "off" and cfg.hub_model_id == "1e-5"


def test_null_reads_none_for_optional_fields_only(tmp_path):
    cfg = _cfg(tmp_path, "reference_dtype: null\n", ["--an_temperatures", "null"])
    assert cfg.reference_dtype is None and cfg.an_temperatures is None
    cfg = _cfg(tmp_path, "reference_dtype: bfloat16\n", ["--reference_dtype", "null"])
    assert cfg.reference_dtype is None

    @dataclasses.dataclass
    class C:
        name: str = "x"
        maybe: Optional[str] = "y"

    assert load_dataclass(C, overrides={"name": "null", "maybe": "null"}) == C("null", None)


def test_numbers_by_the_field_type(tmp_path):
    # `1e-5` is a string to YAML 1.1 (no dot); a float field reads it as a number, from YAML and flags
    cfg = _cfg(tmp_path, "learning_rate: 1e-5\nbeta: 0.25\nmax_steps: 7\n", ["--mn_c", "2e-1"])
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.25 and cfg.max_steps == 7 and cfg.mn_c == 0.2
    assert _cfg(tmp_path, "", ["--learning_rate", "3e-4", "--max_steps", "12"]).learning_rate == 3e-4
    with pytest.raises(ConfigError, match=r"command line: field 'max_steps': '2.5' is not valid \(expected a whole"):
        _cfg(tmp_path, "", ["--max_steps", "2.5"])
    with pytest.raises(ConfigError, match=r"c.yaml: field 'num_negatives': 2.5 is not valid"):
        _cfg(tmp_path, "num_negatives: 2.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: field 'max_steps': True is not valid"):
        _cfg(tmp_path, "max_steps: true\n")


def test_bools_only_for_bool_fields(tmp_path):
    cfg = _cfg(tmp_path, "lora: yes\n", ["--mn_sample", "off", "--length_normalize"])
    assert cfg.lora is True and cfg.mn_sample is False and cfg.length_normalize is True
    with pytest.raises(ConfigError, match=r"command line: field 'lora': 'maybe' is not valid \(expected true or false"):
        _cfg(tmp_path, "", ["--lora", "maybe"])
    with pytest.raises(ConfigError, match=r"c.yaml: field 'negatives': True is not valid \(expected a string"):
        _cfg(tmp_path, "negatives: true\n")
    with pytest.raises(ConfigError, match=r"field 'beta'"):  # a bare flag is true, for bool fields only
        _cfg(tmp_path, "", ["--beta"])


def test_lists_from_yaml_and_command_line(tmp_path):
    cfg = _cfg(tmp_path, "mn_c_range: [0.1, 0.4]\nan_temperatures: [0.5, 1.0, 1.5, 2.0]\n")
    assert cfg.mn_c_range == [0.1, 0.4] and cfg.an_temperatures == [0.5, 1.0, 1.5, 2.0]
    cfg = _cfg(tmp_path, "", ["--mn_c_range", "0.05,0.3", "--an_temperatures", "[0.5, 1, 1.5, 2]"])
    assert cfg.mn_c_range == [0.05, 0.3] and cfg.an_temperatures == [0.5, 1.0, 1.5, 2.0]
    assert cfg.negative_options()["mn_c_range"] == (0.05, 0.3)
    assert _cfg(tmp_path, 'mn_c_range: "0.05,0.5"\n').mn_c_range == [0.05, 0.5]  # the old string form
    with pytest.raises(ConfigError, match=r"field 'mn_c_range\[1\]': 'x' is not valid"):
        _cfg(tmp_path, "", ["--mn_c_range", "0.1,x"])
    with pytest.raises(ConfigError, match=r"mn_c_range=\[0.5, 0.1\]: give two numbers"):
        _cfg(tmp_path, "mn_c_range: [0.5, 0.1]\n")


def test_unknown_keys_name_the_closest_field(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown field 'betta' \(did you mean 'beta'\?\)"):
        _cfg(tmp_path, "betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"command line: unknown field 'num_negative' \(did you mean 'num_negatives'"):
        _cfg(tmp_path, "", ["--num-negative", "2"])


def test_wrong_types_name_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: field 'beta': \[1, 2\] is not valid"):
        _cfg(tmp_path, "beta: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"command line: field 'beta': 'high' is not valid \(expected a number"):
        _cfg(tmp_path, "", ["--beta", "high"])
    with pytest.raises(ConfigError, match=r"c.yaml: field 'lora_target_modules': \{'a': 1\} is not valid"):
        _cfg(tmp_path, "lora_target_modules: {a: 1}\n")


def test_parse_cli_overrides_keeps_strings():
    assert parse_cli_overrides(["--beta", "0.2", "--lora", "--max-steps=7", "--save_strategy", "no"]) == {
        "beta": "0.2", "lora": True, "max_steps": "7", "save_strategy": "no"}
    with pytest.raises(ConfigError, match="expected --key value, got 'stray'"):
        parse_cli_overrides(["stray"])


# ----------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("argv, match", [
    (["--beta", "nan"], r"field 'beta': 'nan' is not valid \(must be a finite number\)"),
    (["--beta", "inf"], r"field 'beta': 'inf' is not valid \(must be a finite number\)"),
    (["--beta", "0"], r"field 'beta': 0.0 must be > 0"),
    (["--cpo_lambda", "-1"], r"field 'cpo_lambda': -1.0 must be >= 0"),
    (["--pss_p_gold", "1.5"], r"field 'pss_p_gold': 1.5 must lie in \[0, 1\]"),
    (["--mn_c", "-0.1"], r"field 'mn_c': -0.1 must lie in \[0, 1\]"),
    (["--an_top_p", "0"], r"field 'an_top_p': 0.0 must lie in \(0, 1\]"),
    (["--num_negatives", "0"], r"field 'num_negatives': 0 must be >= 1"),
    (["--neg_max_tries", "0"], r"field 'neg_max_tries': 0 must be >= 1"),
    (["--learning_rate", "nan"], r"field 'learning_rate': 'nan' is not valid \(must be a finite number\)"),
    (["--learning_rate", "-1e-4"], r"field 'learning_rate': -0.0001 must be >= 0"),
    (["--per_device_train_batch_size", "0"], r"field 'per_device_train_batch_size': 0 must be >= 1"),
    (["--an_strategy", "nucleus"], r"an_strategy='nucleus': choose one of sample, greedy, beam"),
])
def test_out_of_range_values_are_refused_naming_the_field(tmp_path, argv, match):
    with pytest.raises(ConfigError, match=r"command line: " + match if "field" in match else match):
        _cfg(tmp_path, "", argv)


def test_yaml_nan_and_python_construction_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: field 'beta': nan is not valid \(must be a finite number\)"):
        _cfg(tmp_path, "beta: .nan\n")
    with pytest.raises(ConfigError, match=r"beta=nan: must be a finite number"):
        SeqCPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, beta=math.nan)
    with pytest.raises(ConfigError, match=r"cpo_lambda=-1.0: must be >= 0"):
        SeqCPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, cpo_lambda=-1.0)


def test_check_value_rules():
    assert check_value(0.0, ">=0") is None and check_value(1, "[0,1]") is None
    assert check_value(1.0, "[0,1)") == "must lie in [0, 1)"
    assert check_value(-1, ">=1") == "must be >= 1"
    assert check_value(math.inf, ">0") == "must be a finite number"
    assert check_value("text", ">0") is None and check_value(None, ">0") is None


def test_output_dir_errors_name_the_option(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*/f: is a file, not a folder"):
        load_config(None, {**BASE, "output_dir": str(a_file)})
    with pytest.raises(ConfigError, match=r"output_dir .*/f/run: .*/f is a file, not a folder"):
        load_config(None, {**BASE, "output_dir": str(a_file / "run")})


def test_cli_errors_are_one_line_naming_the_option(tmp_path, capsys):
    from seqcpo.cli import main

    for argv, needle in [
        (["train", "--beta", "nan"], "field 'beta': 'nan' is not valid (must be a finite number)"),
        (["train", "--save_strategy", "no", "--max_steps", "2.5"], "field 'max_steps'"),
        (["negatives", "--out", str(tmp_path / "n"), "--shard-size", "0"], "--shard-size 0: must be >= 1"),
        (["ensemble", "--from", "a", "--to", "b", "--alphas", "0,nan", "--out", str(tmp_path / "e")], "--alphas"),
    ]:
        rc = main([*argv, "--output_dir", str(tmp_path / "o"), "--report_to", "none"] if argv[0] == "train" else argv)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err, (argv, err)
        assert len([line for line in err.splitlines() if line.startswith("seqcpo: error")]) == 1


# ----------------------------------------------------------------------------- negatives' options declared once


def test_negative_options_are_declared_once():
    from seqcpo.negatives.registry import OPTIONS

    fields = {f.name: f for f in dataclasses.fields(SeqCPOConfig)}
    for key, opt in OPTIONS.items():
        f = fields[opt.config_name or key]
        assert f.default == opt.default and f.metadata["help"] == opt.help, key
        assert f.metadata.get("check") == opt.check, key
    declared = {f.metadata["negative_option"] for f in fields.values() if "negative_option" in f.metadata}
    assert declared == set(OPTIONS)  # no option without its one declaration, none declared twice
    assert OPTIONS["an_backend"].default == "auto" == fields["an_backend"].default


def test_registry_default_backend_resolves_like_the_config(tmp_path):
    from conftest import make_tiny_llama
    from seqcpo.negatives import build_negative_generator

    gen = build_negative_generator("an", 2, model=make_tiny_llama(), eos_token_id=2, pad_token_id=0)
    cfg = load_config(None, {**BASE, "output_dir": str(tmp_path / "o")})
    assert gen.backend == cfg.resolved_an_backend() == "shared_prefill"
    with pytest.raises(ValueError, match=r"mn_c=1.5: must lie in \[0, 1\]"):
        build_negative_generator("tn", 2, eos_token_id=2, pad_token_id=0, options={"mn_c": 1.5})


def test_config_reference_lists_ranges_and_eval_fields():
    from seqcpo.training.config_reference import config_reference

    text = config_reference()
    assert "| `beta` | `0.1` | `>0` |" in text and "| `an_backend` | `'auto'` |" in text
    assert "### `EvalConfig`" in text and "| `tie_margin` | `0.0` | `>=0` |" in text


def test_a_saved_config_loads_again_to_the_same_values(tmp_path):
    from seqcpo.training.config import save_config

    cfg = _cfg(tmp_path, "save_strategy: no\nmn_c_range: [0.1, 0.3]\n", ["--an_temperatures", "1,2,3,4", "--beta", "0.2"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml", {"use_cpu": True})
    assert again.to_public_dict() == cfg.to_public_dict()


# ----------------------------------------------------------------------------- fault injection: YAML readings


def test_scientific_notation_inside_a_nested_mapping_is_a_float(tmp_path):
    """Defect: ``lr_scheduler_kwargs: {min_lr: 1e-5}`` kept ``'1e-5'`` a string (YAML 1.1 wants a dot and a signed
    exponent) and the scheduler raised a TypeError comparing it with a number; only top-level float fields were
    read by their type."""
    cfg = _cfg(tmp_path, "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1e-5, extra: [2E3]}\n")
    assert cfg.lr_scheduler_kwargs == {"min_lr": 1e-5, "extra": [2000.0]}
    assert type(cfg.lr_scheduler_kwargs["min_lr"]) is float  # a plain float, safe for pickles and dumps
    flag = _cfg(tmp_path, "", ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 3e-6}'])
    assert flag.lr_scheduler_kwargs == {"min_lr": 3e-6}
    # a str field keeps the text as written, a quoted number stays a string
    cfg = _cfg(tmp_path, "hub_model_id: 1e-5\nrun_name: '2e3'\n")
    assert cfg.hub_model_id == "1e-5" and cfg.run_name == "2e3"
    from seqcpo.training.config import save_config

    save_config(_cfg(tmp_path, "lr_scheduler_kwargs: {min_lr: 1e-5}\n"), tmp_path / "saved.yaml")
    assert "min_lr: 1.0e-05" in (tmp_path / "saved.yaml").read_text()


@pytest.mark.parametrize("text, line, key", [
    ("beta: 0.1\nmax_steps: 3\nbeta: 0.2\n", 3, "beta"),  # a training file
    ("name: g\narms:\n  mle: {objective: mle}\n  cpo: {objective: cpo}\n  mle: {objective: cpo}\n", 5, "mle"),  # a grid
    ("eval:\n  judge:\n    backend: local\n    backend: none\n", 4, "backend"),  # an eval file, nested
])
def test_duplicate_yaml_keys_are_an_error_naming_file_line_and_key(tmp_path, text, line, key):
    """Defect: PyYAML keeps the last of two equal keys silently: a grid with two ``mle:`` arms trained one arm
    (CPO) and lost the MLE baseline; a training file's second ``beta:`` replaced the first unseen."""
    from seqcpo.config_loader import read_yaml

    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert str(e.value).startswith(f"{path} line {line}: duplicate key '{key}'") and "\n" not in str(e.value)
    # merge keys (<<) are not duplicates
    assert read_yaml(_yaml(tmp_path, "a: &x {p: 1}\nb:\n  <<: *x\n  p: 2\n"))["b"] == {"p": 2}


def test_one_flag_style_and_bad_flags_exit_2_in_one_line(tmp_path, capsys):
    """Defect: ``seqcpo eval --num_examples`` failed with the top-level usage while training took both
    spellings; a bad flag printed a multi-line usage."""
    from seqcpo.cli import build_parser, main

    parser = build_parser()
    for spelling in ("--num_examples", "--num-examples"):
        args = parser.parse_args(["eval", "--models", "m", "--out", "o", spelling, "3"])
        assert args.num_examples == "3"
    args = parser.parse_args(["negatives", "--out", "n", "--shard_size", "8"])
    assert args.shard_size == "8"
    for argv in (["eval", "--models", "m", "--nope", "1"], ["generate", "--judge", "local"],
                 ["ensemble", "--from", "a"], ["reproduce"], ["negatives", "--out", "x", "--shard-size"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("seqcpo: error: ") and len(err.strip().splitlines()) == 1, (argv, err)
    # a bad value: the same kind of line, naming the flag, from every command
    out = str(tmp_path / "o")
    for argv, needle in [(["eval", "--models", "m", "--out", out, "--num_examples", "-1"], "--num-examples"),
                         (["generate", "--models", "m", "--out", out, "--split", "dev"], "--split"),
                         (["eval", "--models", "m", "--out", out, "--alphas", "0,x"], "--alphas"),
                         (["ensemble", "--from", "a", "--to", "b", "--alphas", "0", "nan", "--out", out], "--alphas"),
                         (["negatives", "--out", out, "--shard_size", "0"], "--shard-size"),
                         (["train", "--max_steps", "x", "--output_dir", out], "max_steps")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("seqcpo: error: ")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (argv, err)


def test_train_help_lists_the_fields_grouped_and_points_to_the_reference(capsys):
    """Defect: ``seqcpo train --help`` listed only ``--config`` and did not point to docs/CONFIG.md."""
    from seqcpo.cli import main

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "docs/CONFIG.md" in text
    groups = ["data (DataConfig):", "model, objective, negatives, reference, speed:", "transformers TrainingArguments"]
    assert all(g in text for g in groups)
    assert text.index("--validation-size") < text.index("--beta") < text.index("learning_rate")
    assert "reward scale beta" in text.lower() and "--no-lora" in text


def test_a_config_that_is_not_utf8_names_the_file_and_line(tmp_path):
    """Defect (campaign 3): a Latin-1 config file failed with "'utf-8' codec can't decode byte ..." and no file or
    line. A UTF-8 BOM (what some editors write) still reads."""
    from seqcpo.config_loader.yaml_io import ConfigError, read_yaml

    bad = tmp_path / "c.yaml"
    bad.write_bytes("beta: 0.1\n# caf\xe9\nseed: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8$"):
        read_yaml(bad)
    bom = tmp_path / "b.yaml"
    bom.write_bytes("\ufeffbeta: 0.1\nseed: 1\n".encode("utf-8"))
    assert read_yaml(bom) == {"beta": 0.1, "seed": 1}
