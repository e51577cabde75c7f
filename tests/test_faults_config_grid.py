"""Fault campaign 2, config and grid items (document anchors, grid names, late errors, decoding specs):
values that could not work passed config validation and failed late, or silently did something else, or an
error named the wrong field or place. Each is now refused where it enters, in one line naming the field (or grid
key), its value and where it was given. No model is loaded here: every check runs before one is."""

from __future__ import annotations

import pytest
import yaml

from seqcpo.config_loader import ConfigError
from seqcpo.training.config import SeqCPOConfig, load_config, parse_overrides

DOC = {"model_name_or_path": "/models/tiny", "dataset": "docs.jsonl", "task": "document", "max_length": 64,
       "anchors_per_row": 2, "continuation_tokens": 8, "negatives": "tn:1,bn:1", "num_negatives": 2,
       "per_device_train_batch_size": 2, "use_cpu": True, "report_to": "none"}


def _load(tmp_path, argv=(), **yaml_fields):
    """The config of a YAML file (``DOC`` plus ``yaml_fields``) and command-line flags ``argv``."""
    path = tmp_path / "doc.yaml"
    path.write_text(yaml.safe_dump({**DOC, "output_dir": str(tmp_path / "o"), **yaml_fields}))
    return load_config(path, parse_overrides(list(argv)))


# ----------------------------------------------------------------------------- anchor_stride past every row


def test_an_anchor_stride_that_places_no_anchor_is_refused_under_cpo(tmp_path):
    """Defect: anchor_stride 100 with max_length 64 trained MLE alone (no anchor fits a row), without a word."""
    from seqcpo.document_rows import anchor_count

    # the bound, from how rows place anchors: a row has at most max_length tokens, anchors sit at s, 2s, ... <= n - C
    assert anchor_count(64, 8, 2, anchor_stride=56) == 1 and anchor_count(64, 8, 2, anchor_stride=57) == 0
    assert _load(tmp_path, ["--anchor_stride", "56"]).anchor_stride == 56
    for stride in ("57", "100"):
        with pytest.raises(ConfigError, match=rf"anchor_stride={stride}: .*largest .* = 56") as e:
            _load(tmp_path, ["--anchor_stride", stride])
        assert "\n" not in str(e.value)
    assert _load(tmp_path, ["--anchor_stride", "100", "--objective", "mle"]).anchor_stride == 100  # no anchors needed


# ----------------------------------------------------------------------------- errors at entry, naming the field


@pytest.mark.parametrize("argv, match", [
    (["--negatives", "an:2", "--objective", "cpo_ranked", "--an_rank_by", "temperature", "--an_temperatures", "1.0"],
     r"an_temperatures=\[1.0\]: has 1 values for the 2 AN negatives"),
    (["--negatives", "an:1,tn:1", "--an_temperatures", "1.0,2.0"],
     r"an_temperatures=\[1.0, 2.0\]: has 2 values for the 1 AN"),
    (["--negatives", "an:2", "--an_strategy", "beam", "--an_num_beams", "1"], r"an_num_beams=1: beam search needs"),
    (["--negatives", "an:2", "--an_strategy", "beam", "--an_num_beams", "2"], None),
    (["--negatives", "an:2", "--an_strategy", "greedy"], r"an_strategy='greedy': .*not 2 AN negatives"),
    (["--negatives", "an:2", "--an_strategy", "beam", "--an_temperatures", "1,2"],
     r"an_temperatures=.*an_strategy sample"),
    (["--negatives", "an:2", "--objective", "cpo_ranked", "--an_rank_by", "temperature"],
     r"an_rank_by=.*an_temperatures"),
    (["--negatives", "an:2", "--an_rank_by", "temperature", "--an_temperatures", "0.7,1.3"], None),
    (["--seed", "1e10"], r"field 'seed': 10000000000 must lie in \[0, 4294967295\]"),
    (["--seed", "-1"], r"field 'seed': -1 must lie in"),
    (["--data_seed", "4294967296"], r"field 'data_seed': 4294967296 must lie in"),
    (["--seed", "4294967295"], None),
    (["--report_to", "wandbx"], r"report_to='wandbx': not a transformers integration; choose none, all or .*wandb"),
    (["--report_to", "none"], None),
    (["--lr_scheduler_type", "cosinee"], r"field 'lr_scheduler_type': 'cosinee' is not valid \(choose one of linear"),
    (["--warmup_ratio", "0.1"], r"unknown field 'warmup_ratio': .*warmup_steps below 1 is a fraction"),
    (["--warmup_steps", "0.1"], None),
])
def test_late_errors_are_refused_at_entry_naming_the_field(tmp_path, argv, match):
    """Defect: these passed --dry-run and failed after the data had loaded, naming decoding.temperatures,
    num_beams, numpy's seed range or transformers' integrations instead of the field given."""
    if match is None:
        _load(tmp_path, argv)
        return
    with pytest.raises(ConfigError, match=match) as e:
        _load(tmp_path, argv)
    assert str(e.value).startswith("command line: ") and "\n" not in str(e.value)


def test_dry_run_stops_at_the_config(tmp_path):
    """The dry run loads the config first: the model folder (absent here) is never reached."""
    from seqcpo.training.dry_run import dry_run

    path = tmp_path / "doc.yaml"
    path.write_text(yaml.safe_dump({**DOC, "output_dir": str(tmp_path / "o")}))
    with pytest.raises(ConfigError, match="anchor_stride=100"):
        dry_run(path, {"anchor_stride": "100"})


def test_an_error_names_where_the_value_was_given(tmp_path):
    """Defect: `--anchor_stride 0` was reported as `doc.yaml: anchor_stride=0 ...`, `--lr_scheduler_type cosinee`
    as `base.yaml: cosinee is not a valid SchedulerType`."""
    yaml_path = str(tmp_path / "doc.yaml")
    for argv, fields, place in [(["--anchor_stride", "0"], {}, "command line"),
                                ([], {"anchor_stride": 0}, yaml_path),
                                (["--max_length", "8"], {"anchor_stride": 4}, "command line"),
                                (["--report_to", "wandbx"], {}, "command line"),
                                ([], {"report_to": ["tensorboard", "wandbx"]}, yaml_path),
                                ([], {"lr_scheduler_type": "cosinee"}, yaml_path),
                                (["--beta", "0.2"], {"validation_size": 0.6, "test_size": 0.6}, yaml_path),
                                (["--validation_size", "0.6"], {"test_size": 0.6}, yaml_path)]:  # two places: the file
        with pytest.raises(ConfigError) as e:
            _load(tmp_path, argv, **fields)
        assert str(e.value).startswith(place + ": "), (argv, fields, str(e.value))


def test_the_checked_training_arguments_fields_exist():
    """Defect: docs/CONFIG.md listed `warmup_ratio` `[0,1]` as checked, but transformers 5 has no such field and
    `--warmup_ratio 0.1` was refused as unknown."""
    import dataclasses

    from seqcpo.training.args_checks import TRAINING_ARGS_CHECKS
    from seqcpo.training.config_reference import config_reference

    names = {f.name for f in dataclasses.fields(SeqCPOConfig)}
    assert set(TRAINING_ARGS_CHECKS) <= names, set(TRAINING_ARGS_CHECKS) - names
    assert "warmup_ratio" not in config_reference()


# ----------------------------------------------------------------------------- decoding specs


@pytest.mark.parametrize("spec, match", [
    ("sample:t=0.7,t=0.9", r"t in decoding 'sample:t=0.7,t=0.9': temperature is given twice"),
    ("sample:t=0.7,temperature=0.9", r"temperature is given twice"),
    ("greedy:t=0.7", r"t in decoding 'greedy:t=0.7': greedy decoding does not use temperature"),
    ("greedy:n=2", r"greedy decoding does not use num_beams"),
    ("beam:n=4,p=0.9", r"p in decoding 'beam:n=4,p=0.9': beam decoding does not use top_p"),
    ("sample:t=0.7,n=2", r"sample decoding does not use num_beams"),
    ("topk:k=5,k=6", r"top_k is given twice"),
])
def test_decoding_specs_refuse_repeated_and_unused_keys(spec, match):
    """Defect: `sample:t=0.7,t=0.9` kept the last t and `greedy:t=0.7` ignored t, both silently."""
    from seqcpo.evaluation.generate import parse_decoding

    with pytest.raises(ValueError, match=match):
        parse_decoding(spec)
    for good in ("greedy", "greedy:m=8", "beam:n=4,m=8", "sample:t=0.7,p=0.9,k=5,s=3", "topp:p=0.9,t=0.8"):
        assert parse_decoding(good).name == good


# ----------------------------------------------------------------------------- grid names that are not folders


def _grid(tmp_path, **over):
    """A grid file (nothing it names exists: loading it builds the configs only)."""
    grid = {
        "out_dir": str(tmp_path / "out"),
        "base": {"model_name_or_path": "/models/tiny", "dataset": "/data/train.jsonl", "task": "instruction",
                 "validation_size": 2, "test_size": 6, "max_steps": 2, "per_device_train_batch_size": 4,
                 "report_to": "none", "use_cpu": True},
        "arms": {"base": {"train": False}, "mle": {"objective": "mle"},
                 "cpo": {"objective": "cpo", "negatives": "tn:1,bn:1", "num_negatives": 2}},
        "eval": {"num_examples": 4, "decoding": ["greedy"], "judge": {"backend": "none"}},
        **over,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b"])
def test_grid_names_that_are_not_their_own_folder_are_refused(tmp_path, name):
    """Defect: an arm named `..` trained into out_dir/arms/.. = the grid's own out_dir (done.json, final/ beside
    report.md); `.` into out_dir/arms. Ensembles and controls name folders the same way."""
    from seqcpo.grid import GridError, load_grid

    load_grid(_grid(tmp_path))  # the grid itself loads
    arms = {"base": {"train": False}, "mle": {"objective": "mle"}, name: {"objective": "mle"}}
    cases = [({"arms": arms}, r"arms: name"),
             ({"ensembles": [{"from": "mle", "to": "cpo", "name": name}]}, r"ensembles\[0\]\.name"),
             ({"controls": [{"of": "base", "kind": "shuffle", "name": name}]}, r"controls\[0\]\.name")]
    for over, key in cases:
        path = _grid(tmp_path, **over)
        with pytest.raises(GridError, match=rf"{key}: {name!r}: names are folders .*not starting with a dot") as e:
            load_grid(path)
        assert str(e.value).startswith(path) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_grid_names_with_inner_dots_still_load(tmp_path):
    from seqcpo.grid import load_grid

    arms = {"base": {"train": False}, "mle.v2": {"objective": "mle"}, "cpo": {"objective": "mle", "seeds": [1, 2]}}
    ev = {"num_examples": 4, "decoding": ["greedy"], "judge": {"backend": "none"}, "baseline": "base"}
    g = load_grid(_grid(tmp_path, arms=arms, controls=[{"of": "base", "kind": "loop"}], eval=ev))
    assert [a.name for a in g.arms] == ["base", "mle.v2", "cpo", "cpo.s2", "base.loop"]


@pytest.mark.parametrize("text", ["{}", "[]", '"done"', '{"fingerprint": 3}', "\udcff"])
def test_a_damaged_stage_mark_means_the_stage_is_redone_not_a_traceback(tmp_path, text):
    """Defect (campaign 3): a grid ``done.json`` holding ``{}`` or ``[]`` stopped `seqcpo reproduce` with a
    KeyError/TypeError traceback; a mark that is not a JSON object with a fingerprint now means "not finished"."""
    from seqcpo.grid.cache import cached_stage, is_current, read_done

    (tmp_path / "done.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_done(tmp_path) is None and not is_current(tmp_path, "fp")
    assert cached_stage(tmp_path, "fp", lambda: {"made": True}) == {"made": True}


@pytest.mark.parametrize("manifest, message", [
    ([], "damaged"), ({"settings": []}, "damaged"), ({"settings": {}, "shards": [3]}, "damaged"),
    ({"settings": {"format": None, "ranked": False}, "complete": True}, None),
])
def test_a_damaged_negatives_manifest_is_one_line(tmp_path, manifest, message):
    """Defect (campaign 3): a negatives folder whose manifest.json held ``[]`` (AttributeError) or lacked
    ``settings.k`` (KeyError) stopped training with a traceback."""
    import json

    from seqcpo.training.offline_reader import FORMAT_VERSION, check_offline_settings

    if message is None:  # the format is this seqcpo's, but K is gone
        manifest["settings"]["format"] = FORMAT_VERSION
        message = r"manifest.json is damaged \(settings.k is missing\)"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as err:
        check_offline_settings(str(tmp_path), object())
    assert "\n" not in str(err.value)
