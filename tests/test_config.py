"""Config loading: every mistake is a readable error naming the key, the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_eval_hook.config import ConfigError, ScheduleConfig, load_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "helm.yaml"


def test_the_shipped_config_loads_with_its_documented_defaults():
    config = load_config(CONF)
    assert config.placement == "sync"
    assert config.benchmarks == ["default"]
    assert config.schedule == ScheduleConfig(start=0, end=None, every=1, final=True)
    assert (config.alerts.enabled, config.alerts.against, config.alerts.alpha) == (True, "best", 0.01)


def test_overrides_change_keys_with_their_types():
    config = load_config(CONF, ["schedule.every=1000", "benchmarks=[default,boolq]", "wandb.mode=offline"])
    assert config.schedule.every == 1000
    assert config.benchmarks == ["default", "boolq"]
    assert config.wandb.mode == "offline"


def test_a_misspelled_override_names_the_key_and_the_known_keys():
    with pytest.raises(ConfigError) as error:
        load_config(CONF, ["schedule.evry=2"])
    message = str(error.value)
    assert "schedule.evry" in message and "every" in message and str(CONF.name) in message


def test_a_key_added_with_plus_is_rejected_too():
    with pytest.raises(ConfigError, match="unknown key 'surprise'"):
        load_config(CONF, ["+surprise=1"])


def test_a_wrong_type_names_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"schedule\.every.*'two'"):
        load_config(CONF, ["schedule.every=two"])


def test_a_typo_inside_the_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule:\n  evry: 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    assert "bad.yaml" in str(error.value) and "schedule.evry" in str(error.value)


def test_a_config_may_compose_another_one_of_its_folder(tmp_path):
    (tmp_path / "base.yaml").write_text("max_eval_instances: 7\nbenchmarks: [boolq]\n")
    (tmp_path / "experiment.yaml").write_text("defaults:\n  - base\n  - _self_\nmax_eval_instances: 3\n")
    config = load_config(tmp_path / "experiment.yaml")
    assert config.max_eval_instances == 3 and config.benchmarks == ["boolq"]


def test_the_async_placement_takes_its_device_queue_and_timeouts():
    config = load_config(
        CONF, ["placement=async", "eval_device=cuda:7", "max_pending=2", "pending_policy=all", "eval_timeout_s=60"]
    )
    assert (config.placement, config.eval_device, config.max_pending) == ("async", "cuda:7", 2)
    assert (config.pending_policy, config.eval_timeout_s, config.finish_timeout_s) == ("all", 60.0, 3600.0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("schedule.every=0", "schedule.every"),
        ("schedule.start=-1", "schedule.start"),
        ("schedule.end=5", "schedule.end"),
        ("max_eval_instances=0", "max_eval_instances"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("benchmarks=[]", "benchmarks"),
        ("placement=later", "placement"),
        ("eval_device=gpu7", "eval_device"),
        ("max_pending=0", "max_pending"),
        ("pending_policy=oldest", "pending_policy"),
        ("resume.max_attempts=0", "resume.max_attempts"),
        ("eval_timeout_s=0", "eval_timeout_s"),
        ("finish_timeout_s=-1", "finish_timeout_s"),
        ("alerts.alpha=0", "alerts.alpha"),
        ("alerts.alpha=1.5", "alerts.alpha"),
        ("alerts.against=worst", "alerts.against"),
        ("alerts.min_drop=-0.1", "alerts.min_drop"),
    ],
)
def test_values_out_of_range_name_their_key(override, key):
    overrides = [override] + (["schedule.start=10"] if key == "schedule.end" else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "="):
        load_config(CONF, overrides)


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_an_override_without_equals_sign_shows_the_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONF, ["schedule"])


@pytest.mark.parametrize(
    "iteration, final, selected",
    [
        (100, False, False),
        (200, False, True),
        (300, False, False),
        (400, False, True),
        (300, True, True),
        (900, False, False),
        (1000, True, False),
    ],
)
def test_schedule_selects_start_every_end_and_the_final_save(iteration, final, selected):
    schedule = ScheduleConfig(start=200, end=800, every=200, final=True)
    assert schedule.selects(iteration, final) is selected


def test_an_unquoted_named_entry_in_a_list_override_says_how_to_quote_it():
    with pytest.raises(ConfigError, match="quote values"):
        load_config(CONF, ["benchmarks=[boolq,facts=mmlu:subject=x]"])
    config = load_config(CONF, ["benchmarks=[boolq,'facts=mmlu:subject=x']"])
    assert config.benchmarks == ["boolq", "facts=mmlu:subject=x"]
