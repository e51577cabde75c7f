"""configs/accelerate/*.yaml as far as a CPU checks them: accelerate's own launch validator accepts each, the
FSDP one gives an FSDP2 plugin whose final save writes weights, and the DeepSpeed one leaves gradient
accumulation to the training config (a fixed number there that differs stops the Trainer at start)."""

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")))


def _validated(path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", path, "-m", "seqcpo.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_accelerate_accepts_the_config(path):
    args, defaults = _validated(path)
    assert args.num_processes == 8 and args.mixed_precision == "bf16"
    with open(path, encoding="utf-8") as fh:
        assert fh.readline().startswith("# accelerate launch --config_file configs/accelerate/")  # says how to run it


def test_fsdp_config_is_fsdp2_and_saves_full_weights(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    args, _ = _validated(os.path.join(ROOT, "configs", "accelerate", "fsdp_8gpu.yaml"))
    assert args.use_fsdp
    for k, v in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    # transformers' Trainer.save_model writes no weights under FSDP unless the state dict type is FULL
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_deepspeed_config_takes_accumulation_from_the_training_config(monkeypatch):
    from accelerate.utils import prepare_deepspeed_cmd_env

    args, defaults = _validated(os.path.join(ROOT, "configs", "accelerate", "deepspeed_zero2_8gpu.yaml"))
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    if importlib.util.find_spec("deepspeed") is None:
        return  # the Trainer-side check below needs the deepspeed package (a GPU machine has it)
    from accelerate.utils import DeepSpeedPlugin
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ds = HfTrainerDeepSpeedConfig(DeepSpeedPlugin().hf_ds_config.config)
    ds.trainer_config_process(TrainingArguments(output_dir="unused", per_device_train_batch_size=8,
                                                gradient_accumulation_steps=2, report_to="none", use_cpu=True))
    assert ds.mismatches == []
