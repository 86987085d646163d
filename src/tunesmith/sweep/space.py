"""The `sweep:` config section: a search space over dotted config fields, the objective, sampler and pruner.

    sweep:
      params:
        train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # a range (int when the field is an int)
        method.lora.r: [4, 8, 16]                          # a list of choices
      objective: val_loss        # or a task metric reported at evaluation (exact_match, rouge_l, ...)
      n_trials: 20

This module imports only pydantic, so that ``tunesmith.config`` can import it without a cycle; what
needs the rest of the package (which field is an int, building a trial's config) takes the Config class
as an argument.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Objectives where smaller is better when `direction` is auto; every other metric is maximised.
_LOWER_IS_BETTER = ("loss", "perplexity", "error", "ter")
_SCALARS = (type(None), bool, int, float, str)


class SweepParam(BaseModel):
    """One searched field: a range (low, high, log scale, int or float) or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    low: float | None = Field(None, description="Smallest value of a range.")
    high: float | None = Field(None, description="Largest value of a range (included).")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Grid step within the range (not with log).")
    type: Literal["float", "int"] | None = Field(None, description="Range type; default: the config field's own type.")
    choices: list[Any] | None = Field(None, description="The values to choose from, instead of a range.")

    @model_validator(mode="before")
    @classmethod
    def _list_is_choices(cls, v):
        return {"choices": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_form(self) -> "SweepParam":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high (a range) or choices (a list), not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give a list of choices)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined")
        return self

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        scale = ", log" if self.log else ""
        return f"[{_num(self.low)}, {_num(self.high)}]{scale}"


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    params: dict[str, SweepParam] = Field(
        default_factory=dict, description="Search space: dotted config field -> {low, high, log, type} or [choices].")
    objective: str = Field(
        "val_loss", description="What a trial is scored by: val_loss (the training objective's held-out loss), "
                                "perplexity, token_accuracy (sft), rewards/accuracy, rewards/margins, ... (dpo, orpo, "
                                "simpo), or a task metric name.")
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="auto: minimize losses/perplexity/errors, maximize every other metric.")
    n_trials: int = Field(20, ge=0, description="Trials this `tunesmith sweep` process runs (--trials overrides).")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler: tpe (Bayesian) or random.")
    startup_trials: int = Field(10, ge=0, description="Random trials before TPE starts modelling the space.")
    pruner: Literal["median", "none"] = Field(
        "median", description="median: stop a trial at an evaluation where its best value so far is worse than the median of "
        "earlier trials at that step; none: never.")
    prune_after_trials: int = Field(2, ge=0, description="Completed trials needed before any trial is pruned.")
    prune_warmup_steps: int = Field(0, ge=0, description="Optimizer steps before a trial may be pruned.")
    seed: int | None = Field(
        None, description="Sampler seed: trial N samples with seed + N, so reruns repeat and shared workers differ (None: random).")
    study_name: str = Field("sweep", description="Optuna study name (--study overrides); trials of one study are shared.")
    storage: str | None = Field(
        None, description="Optuna storage URL or file (--storage overrides); default OUTPUT/study.db (SQLite).")
    output_dir: str = Field("sweeps/latest", description="Sweep folder: trial-NNNN run folders, study.db, sweep.html (--out overrides).")

    @field_validator("params")
    @classmethod
    def _dotted_names(cls, v: dict) -> dict:
        for name in v:
            if name == "output_dir" or name.split(".")[0] == "sweep":
                raise ValueError(f"{name!r} cannot be searched")
        return v

    def resolved_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        name = self.objective.lower()
        return "minimize" if any(name.endswith(s) for s in _LOWER_IS_BETTER) else "maximize"


def _num(x: float | None) -> str:
    return f"{x:g}" if x is not None else "?"


# ---------------------------------------------------------------- the space against the Config class


def field_annotation(config_cls: type[BaseModel], dotted: str):
    """The type annotation of a dotted config field, or None when there is no such field."""
    model: Any = config_cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        if i == len(parts) - 1:
            return ann
        model = ann
    return None


def _numeric_kind(ann) -> str | None:
    args = [a for a in typing.get_args(ann) if a is not type(None)] \
        if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union else [ann]
    if len(args) == 1 and args[0] in (int, float) and args[0] is not bool:
        return "int" if args[0] is int else "float"
    return None


def check_space(space: dict[str, SweepParam], config_cls: type[BaseModel]) -> list[str]:
    """Problems with the search space, worded for the user (empty when it is sound)."""
    problems = []
    for name, p in space.items():
        ann = field_annotation(config_cls, name)
        if ann is None:
            problems.append(f"sweep.params.{name}: not a config field (`tunesmith train --help-config` lists them)")
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            problems.append(f"sweep.params.{name}: a whole section; search its fields ({name}.FIELD) instead")
        elif p.choices is None and _numeric_kind(ann) is None:
            problems.append(f"sweep.params.{name}: a range needs a numeric field; give a list of choices instead")
        elif p.choices is None and p.type == "float" and _numeric_kind(ann) == "int":
            problems.append(f"sweep.params.{name}: the field takes whole numbers; drop `type: float`")
        elif p.choices is None and (p.type or _numeric_kind(ann)) == "int" and \
                (p.low != int(p.low) or p.high != int(p.high) or (p.step is not None and p.step != int(p.step))):
            problems.append(f"sweep.params.{name}: an int range needs whole numbers, got [{_num(p.low)}, {_num(p.high)}]")
    return problems


def suggest(trial, space: dict[str, SweepParam], config_cls: type[BaseModel]) -> dict[str, Any]:
    """Ask an Optuna trial for one value per searched field: {dotted name: value}."""
    values: dict[str, Any] = {}
    for name, p in space.items():
        if p.choices is not None:
            if all(isinstance(c, _SCALARS) for c in p.choices):
                values[name] = trial.suggest_categorical(name, p.choices)
            else:  # Optuna stores only scalars: lists and mappings travel as their JSON text
                values[name] = json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in p.choices]))
        elif (p.type or _numeric_kind(field_annotation(config_cls, name))) == "int":
            values[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return values


def apply_values(data: dict, values: dict[str, Any]) -> dict:
    """Set dotted fields in a config mapping (made with ``model_dump``), in place."""
    for name, value in values.items():
        *parents, leaf = name.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def config_with_values(cfg: BaseModel, values: dict[str, Any]) -> dict:
    """A config as a plain mapping with searched values set and its sweep section left out: the common
    ground of a trial's config and best_config.yaml."""
    data = json.loads(cfg.model_dump_json())
    data.pop("sweep", None)
    return apply_values(data, values)
