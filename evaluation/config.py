"""YAML experiment configs: loaded with ``yaml.safe_load``, validated completely before any work,
and expanded into cells (dataset, model, cut, defense, attack, seed)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import attacks
import defenses
from evaluation.store import model_label, named, params_text
from splitnn import datasets, zoo
from splitnn.errors import ParameterError, check_bool, check_choice, check_number
from splitnn.split import valid_cuts
from splitnn.training import TrainConfig, config_hash

TOP_LEVEL_KEYS = {"name", "seed", "dataset", "model", "train", "cut", "defenses", "attacks", "evaluation"}
TRAIN_KEYS = {"epochs", "lr", "batch_size", "weight_decay"}
EVALUATION_KEYS = {"num_images", "classifier", "lpips_weights", "lpips_net"}
#: What ``evaluation:`` resolves to when a key is left out (the classifier metrics are on; LPIPS needs weights).
EVALUATION_DEFAULTS = {"num_images": 16, "classifier": True, "lpips_weights": None, "lpips_net": "alex"}


class ConfigError(ParameterError):
    """An invalid config; the key is a path into the YAML, e.g. ``defenses[1].params.scale``."""


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix; ``key`` is the hash of its full resolved config."""

    config: dict[str, Any]

    @property
    def key(self) -> str:
        return config_hash(self.config)

    def __getitem__(self, item: str) -> Any:
        return self.config[item]

    def train_config(self) -> TrainConfig:
        """What trains this cell's model: a training defense (and, if it acts there, the cut) is part of
        it, so such a cell gets its own checkpoint; transform defenses share the undefended model."""
        c = self.config
        defense, cut = None, None
        cls = defenses.defense_class(c["defense"]["name"])
        if cls.kind == "training":
            defense = {"name": c["defense"]["name"], "params": dict(c["defense"]["params"])}
            cut = c["cut"] if cls.uses_cut else None
        return TrainConfig(model=c["model"]["name"], dataset=c["dataset"]["name"],
                           model_params=c["model"]["params"], dataset_params=c["dataset"]["params"],
                           seed=c["seed"], defense=defense, cut=cut, **c["train"])

    def short_label(self) -> str:
        """Cut, defense with its parameters, and attack name, on three lines (for figures)."""
        d = self.config["defense"]
        return f"{self.config['cut']}\n{d['name']}({params_text(d['params'])})\n{self.config['attack']['name']}"

    def label(self) -> str:
        c = self.config
        return f"{c['dataset']['name']} | {model_label(c)} | {c['cut']} | {named(c['defense'])} | " \
               f"{named(c['attack'])} | seed {c['seed']}"


def _named(value: Any, key: str) -> dict[str, Any]:
    """``name`` or ``{name: ..., params: {...}}`` -> ``{"name": ..., "params": {...}}``."""
    if isinstance(value, str):
        return {"name": value, "params": {}}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(key, value, "a name or a mapping with 'name' (and optional 'params')")
    extra = set(value) - {"name", "params"}
    if extra:
        raise ConfigError(f"{key}.{sorted(extra)[0]}", value[sorted(extra)[0]], "only the keys 'name' and 'params'")
    params = value.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{key}.params", params, "a mapping of parameter names to values")
    return {"name": value["name"], "params": dict(params)}


def _zipped(value: Any, key: str) -> list[dict[str, Any]]:
    """A defense or attack entry, with its optional ``zip`` expanded into paired variants.

    ``{name: n, params: {a: 1}, zip: {b: [1, 2], c: [x, y]}}`` becomes two entries,
    ``params {a: 1, b: 1, c: x}`` and ``params {a: 1, b: 2, c: y}``: the i-th value of every zipped
    parameter goes together (no cross product). Each entry also records its YAML key and that of each
    zipped value (popped again after validation), so that a bad value is reported where the user wrote it.
    """
    if not isinstance(value, dict) or "zip" not in value:
        return [{**_named(value, key), "yaml_key": key, "zip_paths": {}}]
    zipped = value["zip"]
    base = _named({k: v for k, v in value.items() if k != "zip"}, key)
    if not isinstance(zipped, dict) or not zipped:
        raise ConfigError(f"{key}.zip", zipped, "a non-empty mapping of parameter names to lists of equal length")
    length = None
    for param, values in zipped.items():
        if param in base["params"]:
            raise ConfigError(f"{key}.zip.{param}", values, "a parameter given either in 'params' or in 'zip', "
                                                           "not both")
        if not isinstance(param, str) or not isinstance(values, list) or not values:
            raise ConfigError(f"{key}.zip.{param}", values, "a non-empty list of values")
        if length is None:
            length = len(values)
        elif len(values) != length:
            raise ConfigError(f"{key}.zip.{param}", values,
                              f"a list of {length} values, as long as the other zipped lists")
    variants = []
    for i in range(length or 0):
        params = {**base["params"], **{p: vs[i] for p, vs in zipped.items()}}
        variants.append({"name": base["name"], "params": params, "yaml_key": key,
                         "zip_paths": {p: f"{key}.zip.{p}[{i}]" for p in zipped}})
    return variants


def _as_list(value: Any, key: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, value, "a non-empty list")
    return items


def _build(registry_get, spec: dict[str, Any], key: str, zip_paths: dict[str, str] | None = None) -> Any:
    try:
        return registry_get(spec["name"], **spec["params"])
    except ParameterError as exc:
        zip_paths = zip_paths or {}
        path = f"{key}.name" if exc.key == "name" else zip_paths.get(exc.key, f"{key}.params.{exc.key}")
        raise ConfigError(path, exc.value, exc.expected) from None


class ExperimentConfig:
    """A validated config. Construction checks every key; ``cells()`` expands the grid."""

    def __init__(self, raw: Any, source: str = "<config>"):
        self.source = source
        if not isinstance(raw, dict):
            raise ConfigError("<top level>", raw, "a mapping of config keys")
        unknown = set(raw) - TOP_LEVEL_KEYS
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(key, raw[key], "no such key; known keys: " + ", ".join(sorted(TOP_LEVEL_KEYS)))
        for required in ("dataset", "model", "cut", "defenses", "attacks"):
            if required not in raw:
                raise ConfigError(required, None, "this key to be present")
        self.raw = copy.deepcopy(raw)
        self.name = str(raw.get("name", Path(source).stem))
        self.seeds = [check_number(f"seed[{i}]", s, low=0, integer=True)
                      for i, s in enumerate(_as_list(raw.get("seed", 0), "seed"))]
        self.datasets = [_named(d, f"dataset[{i}]" if isinstance(raw["dataset"], list) else "dataset")
                         for i, d in enumerate(_as_list(raw["dataset"], "dataset"))]
        self.train = self._section(raw.get("train") or {}, "train", TRAIN_KEYS)
        # One model, or a list of them; an entry may override ``train`` (e.g. ``epochs: 0``: random weights).
        self.models = [self._model_entry(m, f"model[{i}]" if isinstance(raw["model"], list) else "model")
                       for i, m in enumerate(_as_list(raw["model"], "model"))]
        self.evaluation = {**EVALUATION_DEFAULTS, **self._section(raw.get("evaluation") or {}, "evaluation",
                                                                   EVALUATION_KEYS)}
        self._validate_evaluation()
        self.cuts = _as_list(raw["cut"], "cut")
        self.defenses = [v for i, d in enumerate(_as_list(raw["defenses"], "defenses"))
                         for v in _zipped(d, f"defenses[{i}]")]
        self.attacks = [v for i, a in enumerate(_as_list(raw["attacks"], "attacks"))
                        for v in _zipped(a, f"attacks[{i}]")]
        self._validate()

    def _model_entry(self, value: Any, key: str) -> dict[str, Any]:
        """``name`` or ``{name, params, train}`` -> ``{"name", "params", "train"}`` (train overrides the top level)."""
        train = {}
        if isinstance(value, dict) and "train" in value:
            train = self._section(value["train"] or {}, f"{key}.train", TRAIN_KEYS)
            value = {k: v for k, v in value.items() if k != "train"}
        return {**_named(value, key), "train": {**self.train, **train}, "yaml_key": key}

    @property
    def dataset(self) -> dict[str, Any]:
        """The first (usually only) dataset."""
        return self.datasets[0]

    @property
    def model(self) -> dict[str, Any]:
        """The first (usually only) model, as ``{"name", "params"}``."""
        return {"name": self.models[0]["name"], "params": self.models[0]["params"]}

    @staticmethod
    def _section(value: Any, key: str, known: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        for k in value:
            if k not in known:
                raise ConfigError(f"{key}.{k}", value[k], "no such key; known keys: " + ", ".join(sorted(known)))
        return dict(value)

    def _validate_evaluation(self) -> None:
        """Check ``evaluation:``; LPIPS weights are loaded once now, so a wrong file fails before any work."""
        from evaluation.perceptual import BACKBONES, LPIPS

        ev = self.evaluation
        check_number("evaluation.num_images", ev["num_images"], low=1, integer=True)
        try:
            check_bool("classifier", ev["classifier"])
            if ev["lpips_weights"] is not None:
                if not isinstance(ev["lpips_weights"], str):
                    raise ParameterError("lpips_weights", ev["lpips_weights"], "a path to a local file, or null")
                LPIPS(ev["lpips_weights"], ev["lpips_net"])
            else:
                check_choice("lpips_net", ev["lpips_net"], tuple(BACKBONES))
        except ParameterError as exc:
            raise ConfigError(f"evaluation.{exc.key}", exc.value, exc.expected) from None

    def _validate(self) -> None:
        """Build everything once (cheaply) so every bad key fails now; resolve defaults into the config
        so that a cell's hash covers its full configuration."""
        shapes = []
        for i, spec in enumerate(self.datasets):
            data = _build(datasets.get, spec, f"dataset[{i}]" if len(self.datasets) > 1 else "dataset")
            spec["params"] = dict(data.params)
            shapes.append((data.num_classes, data.in_channels))
        for entry in self.models:
            key = entry.pop("yaml_key")
            for num_classes, in_channels in sorted(set(shapes)):
                model_params = {"num_classes": num_classes, "in_channels": in_channels, **entry["params"]}
                model = _build(zoo.get, {"name": entry["name"], "params": model_params}, key)
            train_key = f"{key}.train" if entry["train"] != self.train else "train"
            try:
                train = TrainConfig(model=entry["name"], dataset=self.dataset["name"], **entry["train"])
            except ParameterError as exc:
                raise ConfigError(f"{train_key}.{exc.key}", exc.value, exc.expected) from None
            entry["train"] = {k: getattr(train, k) for k in sorted(TRAIN_KEYS)}
            cuts = valid_cuts(model)
            for i, cut in enumerate(self.cuts):
                if cut not in cuts:
                    raise ConfigError(f"cut[{i}]" if len(self.cuts) > 1 else "cut", cut,
                                      f"a module after which {entry['name']} can be cut: " + ", ".join(cuts))
        for section, registry in (("defenses", defenses.get), ("attacks", attacks.get)):
            for spec in getattr(self, section):
                key, paths = spec.pop("yaml_key"), spec.pop("zip_paths")
                spec["params"] = dict(_build(registry, spec, key, paths).params)

    def cells(self) -> list[Cell]:
        """The grid: every seed x dataset x model x cut x defense x attack, in that nesting order."""
        return [Cell({"dataset": dataset, "model": {"name": entry["name"], "params": entry["params"]},
                      "train": entry["train"], "cut": cut, "defense": defense, "attack": attack, "seed": seed,
                      "evaluation": self.evaluation})
                for seed in self.seeds for dataset in self.datasets for entry in self.models
                for cut in self.cuts for defense in self.defenses for attack in self.attacks]


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config; raises ConfigError (naming the key) or OSError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "<unparseable YAML>", f"valid YAML ({exc})") from None
    return ExperimentConfig(raw, str(path))
