"""The hook's configuration: a typed schema, loaded with Hydra's compose API.

The config is one YAML file (`--eval-hook-config conf/helm.yaml`), which may compose other files
of its folder through Hydra `defaults`, changed per experiment with `--eval-hook-override
key=value`. Loading checks every key and type against the dataclasses below and raises
`ConfigError`, naming the key, the file and the fix, before training starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLACEMENTS = ("sync", "async")
PENDING_POLICIES = ("latest", "all")
WANDB_MODES = ("online", "offline", "disabled")
ALERT_REFERENCES = ("best", "previous")


class ConfigError(ValueError):
    """A config value is wrong. The message names the value, where it came from and the fix."""


@dataclass
class ScheduleConfig:
    """Which saves are evaluated: iterations `start, start+every, ...` up to `end`."""

    start: int = 0
    end: int | None = None
    every: int = 1
    final: bool = True  # also evaluate the run's last save (end of training, exit signal), off-grid too

    def selects(self, iteration: int, final: bool = False) -> bool:
        """Whether the save at `iteration` is to be evaluated (`final`: it is the run's last save)."""
        if iteration < self.start or (self.end is not None and iteration > self.end):
            return False
        return (final and self.final) or (iteration - self.start) % self.every == 0


@dataclass
class ResumeConfig:
    """What a job restarted from a checkpoint of its --save folder does about the saves that lack results."""

    evaluate_missing: bool = True  # evaluate, from their checkpoints, what that save and the earlier ones lack
    max_attempts: int = 3  # a benchmark that failed this often at a save is not tried again there


@dataclass
class AlertsConfig:
    """Regression alerts: each evaluation compared, paired, with an earlier one of the run (`compare.py`)."""

    enabled: bool = True
    against: str = "best"  # best: the earlier save with the highest score; previous: the save just before
    alpha: float = 0.01  # a drop counts when its Holm-adjusted p-value is below this
    min_drop: float = 0.0  # ... and it is at least this large (in the metric's units)


@dataclass
class EngineConfig:
    """The scoring engine that answers HELM's requests with the training model."""

    batch_size: int = 16  # up to batch_size x 256 packed positions per pass (CPU: 2048); sizes the generation cache
    max_sequence_length: int | None = None  # tokens; null = Megatron's --seq-length


@dataclass
class WandbConfig:
    """Weights & Biases sink. Uses Megatron's own run (--wandb-project) when there is one."""

    enabled: bool = True
    project: str | None = None  # for a run of the hook's own when Megatron has none
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null = $WANDB_MODE, else online
    dir: str | None = None  # null = output_dir
    log_all_metrics: bool = False  # false: main metric per benchmark; true: every metric of the main split


@dataclass
class TensorBoardConfig:
    """TensorBoard sink: Megatron's own writer (--tensorboard-dir), when the run has one."""

    enabled: bool = True


@dataclass
class EvalHookConfig:
    """Everything the hook reads. Relative paths are relative to the working directory."""

    enabled: bool = True
    placement: str = "sync"  # sync: in the training processes; async: in an eval process of its own
    # Async placement only.
    eval_device: str = "cpu"  # cpu, or cuda:N, a GPU that training does not use on the last rank's node
    max_pending: int = 1  # snapshots waiting for the eval process
    pending_policy: str = "latest"  # latest: a newer snapshot replaces a waiting one; all: training waits for room
    eval_timeout_s: float = 7200.0  # an evaluation running longer is stopped and recorded failed
    finish_timeout_s: float = 3600.0  # at the end of training, how long to wait for pending evaluations
    run_name: str | None = None  # null = --wandb-exp-name, else the name of the --save folder
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    benchmarks: list[str] = field(default_factory=lambda: ["default"])
    presets: dict[str, list[str]] = field(default_factory=dict)
    max_eval_instances: int = 100
    num_train_trials: int = 1
    data_dir: str = "data/helm"
    output_dir: str | None = None  # null = <--save>/eval_hook
    ledger: str | None = None  # null = <output_dir>/ledger.sqlite
    export_hf: str | None = None  # a folder: each evaluated save's weights as a Hugging Face GPT-2 folder in it
    engine: EngineConfig = field(default_factory=EngineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    flags: tuple[str, str] = ("--eval-hook-config", "--eval-hook-override"),
) -> EvalHookConfig:
    """Compose `path` with Hydra, apply `overrides`, and validate against `EvalHookConfig`.

    `flags`: the command-line flags that gave the path and the overrides, named in error messages."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    source = Path(path).expanduser().resolve()
    config_flag, override_flag = flags
    where = f"{config_flag} {path}" + (f" with overrides {list(overrides)}" if overrides else "")
    if not source.is_file():
        raise ConfigError(f"{where}: no such file {source}. Fix: pass the path of a YAML file such as conf/helm.yaml.")
    if source.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{where}: {source.name} is not a .yaml file. Fix: name the config file *.yaml.")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"{where}: override {item!r} has no '='. Fix: write {override_flag} key=value, "
                "e.g. schedule.every=1000."
            )

    # A host that initialised Hydra itself (e.g. a NeMo entry point) keeps its state.
    global_hydra = GlobalHydra.instance()
    saved = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(source.parent), version_base="1.3", job_name="eval_hook"):
            composed = compose(config_name=source.stem, overrides=list(overrides))
        # Merging a plain container into the schema rejects unknown keys and wrong types,
        # including keys added with Hydra's `+key=value`, which compose lets through.
        merged = OmegaConf.merge(OmegaConf.structured(EvalHookConfig), OmegaConf.to_container(composed, resolve=True))
        config: EvalHookConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigError:
        raise
    except Exception as error:  # Hydra and OmegaConf raise many types; all are config mistakes here
        raise ConfigError(f"{where}: {_explain(error)}") from error
    finally:
        global_hydra.clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)
    check_config(config, where)
    return config


def resolve_output_dir(config: EvalHookConfig, save: str | os.PathLike[str]) -> Path:
    """The folder of HELM's outputs and the W&B run id (and the ledger by default): `output_dir`, else
    `<save>/eval_hook`, for the run saving into `save`."""
    return Path(config.output_dir or Path(save) / "eval_hook").resolve()


def resolve_ledger(config: EvalHookConfig, save: str | os.PathLike[str]) -> Path:
    return Path(config.ledger).resolve() if config.ledger else resolve_output_dir(config, save) / "ledger.sqlite"


def resolve_run_name(config: EvalHookConfig, megatron_args: Any, save: str | os.PathLike[str]) -> str:
    """The run's name in the ledger: `run_name`, else `--wandb-exp-name`, else the save folder's name."""
    return config.run_name or getattr(megatron_args, "wandb_exp_name", None) or Path(save).resolve().name


def check_config(config: EvalHookConfig, where: str = "eval hook config") -> None:
    """Check the values that types alone cannot; raise `ConfigError` on the first bad one."""

    def bad(key: str, value: Any, fix: str) -> ConfigError:
        return ConfigError(f"{where}: {key}={value!r} is not valid. Fix: {fix}")

    if config.placement not in PLACEMENTS:
        raise bad("placement", config.placement, f"use one of {list(PLACEMENTS)}.")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", config.eval_device):
        raise bad("eval_device", config.eval_device, "use cpu or cuda:N (a GPU training does not use).")
    if config.max_pending < 1:
        raise bad("max_pending", config.max_pending, "use 1 or more snapshots.")
    if config.pending_policy not in PENDING_POLICIES:
        raise bad("pending_policy", config.pending_policy, f"use one of {list(PENDING_POLICIES)}.")
    for key in ("eval_timeout_s", "finish_timeout_s"):
        if getattr(config, key) <= 0:
            raise bad(key, getattr(config, key), "use a number of seconds > 0.")
    schedule = config.schedule
    if schedule.start < 0:
        raise bad("schedule.start", schedule.start, "use an iteration >= 0.")
    if schedule.every < 1:
        raise bad("schedule.every", schedule.every, "use 1 (every save) or more iterations.")
    if schedule.end is not None and schedule.end < schedule.start:
        raise bad("schedule.end", schedule.end, f"use null or an iteration >= schedule.start ({schedule.start}).")
    if not config.benchmarks:
        raise bad("benchmarks", config.benchmarks, "name at least one preset (e.g. default) or HELM run entry.")
    if config.max_eval_instances < 1:
        raise bad("max_eval_instances", config.max_eval_instances, "use a number of instances >= 1.")
    if config.num_train_trials < 1:
        raise bad("num_train_trials", config.num_train_trials, "use 1 or more.")
    if config.engine.batch_size < 1:
        raise bad("engine.batch_size", config.engine.batch_size, "use 1 or more sequences.")
    if config.resume.max_attempts < 1:
        raise bad("resume.max_attempts", config.resume.max_attempts, "use 1 or more (1: never retry).")
    if config.alerts.against not in ALERT_REFERENCES:
        raise bad("alerts.against", config.alerts.against, f"use one of {list(ALERT_REFERENCES)}.")
    if not 0.0 < config.alerts.alpha < 1.0:
        raise bad("alerts.alpha", config.alerts.alpha, "use a significance level between 0 and 1, e.g. 0.01.")
    if config.alerts.min_drop < 0:
        raise bad("alerts.min_drop", config.alerts.min_drop, "use 0 or a positive drop in the metric's units.")
    if config.engine.max_sequence_length is not None and config.engine.max_sequence_length < 2:
        raise bad("engine.max_sequence_length", config.engine.max_sequence_length, "use null or >= 2 tokens.")
    if config.wandb.mode is not None and config.wandb.mode not in WANDB_MODES:
        raise bad("wandb.mode", config.wandb.mode, f"use null or one of {list(WANDB_MODES)}.")


def _explain(error: BaseException) -> str:
    """The most specific message in an exception chain, with the offending key when known."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for cause in chain:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            key = cause.full_key
            message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
            if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
                parent = key.rpartition(".")[0]
                known = _known_keys(parent)
                return (
                    f"unknown key '{key}' ({message}). Fix: check its spelling; "
                    f"the keys{' under ' + parent if parent else ''} are: {', '.join(known)}."
                )
            if isinstance(cause, ValidationError):
                return f"bad value for key '{key}': {message}. Fix: give a value of the type the key takes."
            return f"key '{key}': {message}"
    from hydra.errors import OverrideParseException

    for cause in chain:
        if isinstance(cause, OverrideParseException):
            return (
                f"an override does not parse ({str(cause).strip().splitlines()[0]}). Fix: quote values that "
                "contain '=', ':' or ',', e.g. 'benchmarks=[default,\"facts=mmlu:subject=my_facts\"]'."
            )
    described = next((c for c in chain if str(c).strip()), chain[0])
    return f"{type(described).__name__}: {str(described).strip().splitlines()[0]}"


def _known_keys(dotted_parent: str) -> list[str]:
    node: Any = EvalHookConfig
    for part in filter(None, dotted_parent.split(".")):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        default = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        node = type(default()) if default is not None else None
    return [f.name for f in dataclasses.fields(node)] if node is not None and dataclasses.is_dataclass(node) else []
