"""YAML experiment configs: read through the safe loader, checked completely by the schema before any work
(every error at once, each naming its YAML path), and expanded into cells (dataset, model, cut, defense,
attack, seed)."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from pydantic import ValidationError

from leakbench import attacks, defenses
from leakbench.evaluation import schema
from leakbench.evaluation.schema import Issue
from leakbench.evaluation.store import model_label, named, params_text
from leakbench.evaluation.yaml_loader import YAMLInputError, load_yaml
from leakbench.splitnn import datasets, zoo
from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.params import signature_model
from leakbench.splitnn.training import TrainConfig, config_hash

if TYPE_CHECKING:
    from leakbench.evaluation.cost import Cost

TRAIN_KEYS = set(schema.Train.model_fields)
#: Issues listed in one message at most; the count of the rest follows.
MAX_ISSUES_SHOWN = 8


class ConfigError(ParameterError):
    """An invalid config: every problem found, each an ``Issue`` whose path points into the YAML, e.g.
    ``defenses[1].params.scale``; ``key``, ``value`` and ``expected`` are those of the first."""

    def __init__(self, key: str, value: Any = None, expected: str = "", issues: list[Issue] | None = None):
        self.issues = issues or [Issue(key, value, expected)]
        first = self.issues[0]
        super().__init__(first.path, first.value, first.expected)
        if len(self.issues) > 1:
            shown = [str(i) for i in self.issues[:MAX_ISSUES_SHOWN]]
            more = len(self.issues) - len(shown)
            self.args = (f"{len(self.issues)} problems:\n  " + "\n  ".join(shown)
                         + (f"\n  ... and {more} more" if more else ""),)

    @classmethod
    def of(cls, issues: list[Issue]) -> "ConfigError":
        return cls(issues[0].path, issues=issues)


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
                           seed=c["seed"], defense=defense, cut=cut, weights=c["model"].get("weights"), **c["train"])

    def short_label(self) -> str:
        """Cut, defense with its parameters, and attack name, on three lines (for figures)."""
        d = self.config["defense"]
        return f"{self.config['cut']}\n{d['name']}({params_text(d['params'])})\n{self.config['attack']['name']}"

    def label(self) -> str:
        c = self.config
        return f"{c['dataset']['name']} | {model_label(c)} | {c['cut']} | {named(c['defense'])} | " \
               f"{named(c['attack'])} | seed {c['seed']}"


def _safe_name(stem: str) -> str:
    """A file stem as an output folder name: one path component of safe characters."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".-_")[:100] or "experiment"


def _written_at(param: str, zip_paths: dict[str, str] | None) -> str:
    """Where an entry's parameter was written, under the entry: ``params.P``, or ``zip.P[i]`` for a zipped one."""
    return (zip_paths or {}).get(param, f"params.{param}")


class ExperimentConfig:
    """A validated config. Construction checks every key (all problems at once); ``cells()`` expands the grid."""

    def __init__(self, raw: Any, source: str = "<config>", device: str | None = None):
        self.source = source
        parsed, self._issues = schema.parse(raw)
        self.raw = copy.deepcopy(raw)
        self.name = parsed.get("name") or _safe_name(Path(source).stem)
        self.notes: list[str] = []
        self.device = self._device(device if device is not None else parsed.get("device", "auto"),
                                   "--device" if device is not None else "device")
        self.seeds = self._unique(parsed.get("seed", []), "seed")
        self.cuts = self._unique(parsed.get("cut", []), "cut")
        entries = [self._dataset(entry, self._key(raw, "dataset", i))  # None: a problem, in self._issues
                   for i, entry in enumerate(parsed.get("dataset", []))]
        self.train = parsed["train"].model_dump(exclude_none=True) if "train" in parsed else {}
        # batch_size enters a cell only when given, so unchunked cells keep the keys they had before it existed
        evaluation = parsed.get("evaluation")
        self.evaluation = {} if evaluation is None else evaluation.model_dump(
            exclude={"batch_size"} if evaluation.batch_size is None else None)
        if self.evaluation:
            self._check_lpips()
        shapes = sorted({(d["info"].num_classes, d["info"].in_channels) for d in entries if d})
        if evaluation is not None and isinstance(evaluation.classifier, schema.ModelEntry):
            self._classifier(evaluation.classifier, shapes)
        self._meta_models: list[dict[tuple[int, int], Any]] = []  # per model entry: (classes, channels) -> model
        self.models = [self._model(entry, self._key(raw, "model", i), shapes)
                       for i, entry in enumerate(parsed.get("model", []))]
        self.defenses = self._entries(parsed.get("defenses", []), raw, "defenses", defenses.get,
                                      exclude=frozenset({"seed"}))
        self.attacks = self._entries(parsed.get("attacks", []), raw, "attacks", attacks.get)
        self._check_weights_untrained(raw)
        if self._issues:
            raise ConfigError.of(self._issues)
        self.datasets = cast("list[dict[str, Any]]", entries)  # no problems: no None
        self._infos = [d.pop("info") for d in self.datasets]

    def _device(self, spec: str, key: str) -> str:
        """The device the cells run on (not part of a cell's key: the device is recorded in the run's provenance)."""
        from leakbench.splitnn import devices

        try:
            device, note = devices.resolve(spec)
        except ParameterError as exc:
            self._issue(key, exc.value, exc.expected)
            return "cpu"
        if note:
            self.notes.append(f"{key}: {note}")
        return device

    def _unique(self, values: list[Any], key: str) -> list[Any]:
        """Drop repeated seeds or cuts (they would give identical cells), with a note."""
        unique = list(dict.fromkeys(values))
        if len(unique) < len(values):
            self.notes.append(f"{key}: {len(values) - len(unique)} repeated values dropped (identical cells)")
        return unique

    @staticmethod
    def _key(raw: dict[str, Any], section: str, i: int) -> str:
        return f"{section}[{i}]" if isinstance(raw.get(section), list) else section

    def _issue(self, path: str, value: Any, expected: str) -> None:
        self._issues.append(Issue(path, value, expected))

    def _params(self, factory: Callable[..., Any], params: dict[str, Any], key: str,
                paths: dict[str, str] | None = None, exclude: frozenset[str] = frozenset()) -> bool:
        """Type-check ``params`` against the factory's signature; False (with the issues noted) if they fail."""
        model = signature_model(factory, exclude)
        try:
            model.model_validate(params)
        except ValidationError as exc:
            for issue in schema.issues_of(exc, params, model):
                head, dot, rest = issue.path.partition(".")
                head, bracket, index = head.partition("[")
                where = _written_at(head, paths) + bracket + index + dot + rest
                expected = issue.expected
                if head in exclude:
                    expected = f"no {head} here: every cell takes the top-level {head}"
                self._issue(f"{key}.{where}", issue.value, expected)
            return False
        return True

    def _build(self, build: Callable[..., Any], name: str, params: dict[str, Any], key: str,
               paths: dict[str, str] | None = None) -> Any:
        """Build a registered thing once (its own checks bound the values); None, with the issue noted, if not."""
        try:
            return build(name, **params)
        except ParameterError as exc:
            path = f"{key}.name" if exc.key == "name" else f"{key}.{_written_at(exc.key, paths)}"
            self._issue(path, exc.value, exc.expected)
            return None

    def _factory(self, registry_factory: Callable[[str], Any], name: str, key: str, name_key: str = "name") -> Any:
        try:
            return registry_factory(name)
        except ParameterError as exc:
            self._issue(f"{key}.{name_key}", exc.value, exc.expected)
            return None

    def _dataset(self, entry: schema.Entry, key: str) -> dict[str, Any] | None:
        factory = self._factory(datasets.factory, entry.name, key)
        if factory is None or not self._params(factory, entry.params, key):
            return None
        info = self._build(datasets.describe, entry.name, entry.params, key)  # checks without loading
        return None if info is None else {"name": entry.name, "params": dict(info.params), "info": info}

    def _check_lpips(self) -> None:
        """LPIPS weights are loaded once now, so a wrong file fails before any work."""
        from leakbench.evaluation.perceptual import LPIPS

        ev = self.evaluation
        if ev["lpips_weights"] is not None:
            try:
                LPIPS(ev["lpips_weights"], ev["lpips_net"])
            except ParameterError as exc:
                self._issue(f"evaluation.{exc.key}", exc.value, exc.expected)

    def _model(self, entry: schema.ModelEntry, key: str, shapes: list[tuple[int, int]]) -> dict[str, Any]:
        """``{"name", "params", "train"}``; the entry's ``train`` overrides the top level. The model is built on
        the meta device (no memory) for each dataset shape, so a bad parameter or cut fails now."""
        import torch

        from leakbench.splitnn.split import valid_cuts

        name = cast(str, entry.name)  # the schema sets it from torchvision or factory when not given
        own_train = entry.train.model_dump(exclude_none=True)
        train = {**self.train, **own_train}
        resolved = {"name": name, "params": dict(entry.params), "train": train}
        train_key = f"{key}.train" if own_train else "train"
        try:
            config = TrainConfig(model=name, dataset="", **train)
            resolved["train"] = {k: getattr(config, k) for k in sorted(TRAIN_KEYS)}
        except ParameterError as exc:
            self._issue(f"{train_key}.{exc.key}", exc.value, exc.expected)
        factory = self._factory(zoo.factory, name, key, entry.name_key)
        meta: dict[tuple[int, int], Any] = {}
        self._meta_models.append(meta)
        given_by_data = frozenset(k for k in ("num_classes", "in_channels") if k not in entry.params)
        if factory is None or not self._params(factory, entry.params, key, exclude=given_by_data):
            return resolved
        for num_classes, in_channels in shapes:
            with torch.device("meta"):
                model = self._build(zoo.get, name, {"num_classes": num_classes, "in_channels": in_channels,
                                                          **entry.params}, key)
            if model is None:
                return resolved
            meta[(num_classes, in_channels)] = model
            if entry.weights is not None and not self._weights(model, entry.weights, key, resolved):
                return resolved
            cuts = valid_cuts(model)
            for i, cut in enumerate(self.cuts):
                if cut not in cuts:
                    where = f"cut[{i}]" if isinstance(self.raw.get("cut"), list) else "cut"
                    self._issue(where, cut, f"a module after which {name} can be cut: " + ", ".join(cuts))
        return resolved

    def _classifier(self, entry: schema.ModelEntry, shapes: list[tuple[int, int]]) -> None:
        """The user's evaluation classifier, checked as a model entry is (its factory, params and weights, on the
        meta device for each dataset shape), and also: weights are required (it is loaded, never trained), it
        has the dataset's classes, and a last nn.Linear whose input is its embedding. The cell records its name,
        params and the weights file with its digest, so another judge is another cell."""
        import torch

        from leakbench.evaluation.eval_classifier import last_linear

        key = "evaluation.classifier"
        name = cast(str, entry.name)  # the schema sets it from torchvision or factory when not given
        resolved: dict[str, Any] = {"name": name, "params": dict(entry.params)}
        self.evaluation["classifier"] = resolved
        if "train" in entry.model_fields_set:
            self._issue(f"{key}.train", self.raw["evaluation"]["classifier"].get("train"),
                        "no train: the user's classifier is loaded from its weights, never trained")
        if entry.weights is None:
            self._issue(f"{key}.weights", None, "the classifier's state-dict file: the user's classifier is "
                                                "loaded from its weights, never trained")
        factory = self._factory(zoo.factory, name, key, entry.name_key)
        given_by_data = frozenset(k for k in ("num_classes", "in_channels") if k not in entry.params)
        if factory is None or not self._params(factory, entry.params, key, exclude=given_by_data):
            return
        for num_classes, in_channels in shapes:
            classes = entry.params.get("num_classes", num_classes)
            if classes != num_classes:
                where = "num_classes" if entry.num_classes is not None else "params.num_classes"
                self._issue(f"{key}.{where}", classes, f"the dataset's {num_classes} classes (the judge labels "
                                                       "the dataset's images)")
                return
            with torch.device("meta"):
                model = self._build(zoo.get, name, {"num_classes": num_classes, "in_channels": in_channels,
                                                    **entry.params}, key)
            if model is None:
                return
            try:
                head = last_linear(model)
            except TypeError as exc:
                self._issue(f"{key}.{entry.name_key}", name, f"a classifier with a last nn.Linear ({exc})")
                return
            if head.out_features != num_classes:
                self._issue(f"{key}.{entry.name_key}", name, f"a classifier whose last nn.Linear gives the "
                            f"dataset's {num_classes} classes; it gives {head.out_features}")
                return
            if entry.weights is None or not self._weights(model, entry.weights, key, resolved):
                return

    def _check_weights_untrained(self, raw: dict[str, Any]) -> None:
        """A model loaded from the user's weights is not trained, so no training defense can shape it."""
        trainers = sorted({d["name"] for d in self.defenses if defenses.defense_class(d["name"]).kind == "training"})
        for i, entry in enumerate(self.models):
            if "weights" in entry and trainers:
                self._issue(f"{self._key(raw, 'model', i)}.weights", entry["weights"]["file"],
                            f"no weights with a training defense ({', '.join(trainers)} trains the model; a model "
                            "with weights is not trained): drop one of them")

    def _weights(self, model: Any, path: str, key: str, resolved: dict[str, Any]) -> bool:
        """Check the user's weights file against the model built on the meta device; record its digest (a new
        file is a new cell). False, with the issue noted, if it does not fit."""
        from leakbench.splitnn import user_models

        try:
            user_models.check_weights(model, path)
        except ParameterError as exc:
            self._issue(f"{key}.weights", exc.value, exc.expected)
            return False
        resolved["weights"] = {"file": path, "sha256": user_models.file_digest(path)}
        return True

    def _entries(self, entries: list[schema.ZippedEntry], raw: dict[str, Any], section: str,
                 build: Callable[..., Any], exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Each defense or attack variant with its parameters resolved (defaults filled in, so that a cell's
        hash covers its full configuration)."""
        registry = defenses.defense_class if section == "defenses" else attacks.attack_class
        resolved, seen = [], set()
        for i, entry in enumerate(entries):
            key = self._key(raw, section, i)
            factory = self._factory(registry, entry.name, key)
            if factory is None:
                continue
            zip_issues = entry.zip_issues()
            for path, value, expected in zip_issues:
                self._issue(f"{key}.{path}", value, expected)
            if zip_issues:
                continue
            for params, paths in entry.variants():
                if not self._params(factory, params, key, paths, exclude):
                    continue
                built = self._build(build, entry.name, params, key, paths)
                if built is None:
                    continue
                spec = {"name": entry.name, "params": dict(built.params)}
                ident = config_hash(spec)
                if ident in seen:
                    self.notes.append(f"{key}: the same {section[:-1]} as an earlier entry, dropped (identical cells)")
                    continue
                seen.add(ident)
                resolved.append(spec)
        return resolved

    @property
    def dataset(self) -> dict[str, Any]:
        """The first (usually only) dataset."""
        return self.datasets[0]

    @property
    def model(self) -> dict[str, Any]:
        """The first (usually only) model, as ``{"name", "params"}``."""
        return {"name": self.models[0]["name"], "params": self.models[0]["params"]}

    def cost(self) -> "Cost":
        """The grid's cell count and its largest per-cell memory estimate (see ``evaluation.cost``)."""
        from leakbench.evaluation.cost import Cost, cell_bytes

        peak, where = 0, ""
        for info in self._infos:
            for entry, meta in zip(self.models, self._meta_models):
                model = meta[(info.num_classes, info.in_channels)]
                for cut in self.cuts:
                    need = cell_bytes(model, cut, (info.in_channels, info.size, info.size), info.num_images,
                                      min(self.evaluation["num_images"], self.evaluation.get("batch_size") or
                                          self.evaluation["num_images"]), entry["train"]["batch_size"])
                    if need > peak:
                        peak, where = need, f"{info.name} | {entry['name']} | {cut}"
        return Cost(len(self.cells()), peak, where)

    def cells(self) -> list[Cell]:
        """The grid: every seed x dataset x model x cut x defense x attack, in that nesting order."""
        return [Cell({"dataset": dataset, "model": _model_of(entry),
                      "train": entry["train"], "cut": cut, "defense": defense, "attack": attack, "seed": seed,
                      "evaluation": self.evaluation})
                for seed in self.seeds for dataset in self.datasets for entry in self.models
                for cut in self.cuts for defense in self.defenses for attack in self.attacks]


def _model_of(entry: dict[str, Any]) -> dict[str, Any]:
    """A cell's model: name and params, and the weights file's path and digest when the user gave one (so that
    cells without weights keep the keys they had before weights existed)."""
    model = {"name": entry["name"], "params": entry["params"]}
    if "weights" in entry:
        model["weights"] = entry["weights"]
    return model


def load_config(path: str | Path, device: str | None = None) -> ExperimentConfig:
    """Read and validate a YAML config (``device`` overrides its ``device``); raises ConfigError (every problem,
    each naming its key; a file that is not acceptable YAML names the file and line) or OSError (the file cannot
    be read)."""
    try:
        raw = load_yaml(path)
    except YAMLInputError as exc:
        raise ConfigError(exc.key, exc.value, exc.expected) from None
    return ExperimentConfig(raw, str(path), device)
