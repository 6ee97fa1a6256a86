"""The experiment config's schema, in pydantic: every key typed and bounded, unknown keys refused.

Two layers, both pydantic. ``Experiment`` types the structure (top level, dataset, model, train, defense and
attack entries, evaluation). ``splitnn.params.signature_model(factory)`` types one registered thing's
``params`` from its annotated signature, the one place a parameter's name, type, bounds and default are
declared; what relates one parameter to another, the factory checks when the config builds it once. Errors
come back as ``Issue``s naming the YAML path as the user wrote it
(``defenses[1].params.scale``, ``dataset.params.size`` for a single entry written without a list).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (BaseModel, BeforeValidator, Field, InstanceOf, StringConstraints, TypeAdapter,
                      ValidationError, model_validator)
from pydantic_core import ErrorDetails

from leakbench.evaluation.perceptual import BACKBONES
from leakbench.splitnn.devices import PATTERN as DEVICE_PATTERN
from leakbench.splitnn.errors import problem
from leakbench.splitnn.params import STRICT, Seed, expected_of

#: Bounds on the grid's own lists: far above any real experiment, far below what exhausts a machine.
MAX_LIST = 1000


class _Strict(BaseModel):
    model_config = STRICT


Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]
#: The experiment's name names its output folder, so it is one safe path component.
ExperimentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
Params = dict[str, Any]


def _named(value: Any) -> Any:
    """``name`` is short for ``{name: name}``."""
    return {"name": value} if isinstance(value, str) else value


def _listed(value: Any) -> Any:
    """A single entry is short for a one-entry list."""
    return value if isinstance(value, list) else [value]


def _empty_mapping(value: Any) -> Any:
    """``params:`` or ``train:`` left empty (YAML null) means none; ``[]``, ``false`` or ``0`` are errors."""
    return {} if value is None else value


T = TypeVar("T")
#: One value, or a non-empty list of them (a single one is short for a one-item list).
OneOrMany = Annotated[list[T], BeforeValidator(_listed), Field(min_length=1, max_length=MAX_LIST)]


class Train(_Strict):
    epochs: int | None = Field(None, ge=0, le=10_000)
    lr: float | None = Field(None, gt=0, le=100)
    batch_size: int | None = Field(None, ge=1, le=1_000_000)
    weight_decay: float | None = Field(None, ge=0, le=1)


class Entry(_Strict):
    """A dataset, defense or attack: ``name``, or ``{name, params}``."""

    name: Name
    params: Annotated[Params, BeforeValidator(_empty_mapping)] = {}


NamedEntry = Annotated[Entry, BeforeValidator(_named)]


class ModelEntry(Entry):
    """A model; its ``train`` overrides the top-level one (e.g. ``epochs: 0`` for random weights). It is named
    by exactly one of ``name`` (the zoo), ``torchvision`` (an architecture) or ``factory``
    (``package.module:function``); ``weights`` is the user's state-dict file, and the model is then not trained."""

    name: Name | None = None  # type: ignore[assignment]  # set from torchvision or factory when not given
    torchvision: Name | None = None
    factory: Name | None = None
    weights: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    num_classes: int | None = Field(None, ge=1, le=1_000_000)
    train: Annotated[Train, BeforeValidator(_empty_mapping)] = Train()

    @model_validator(mode="after")
    def _one_name(self) -> "ModelEntry":
        given = [key for key in ("name", "torchvision", "factory") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of name (a zoo model), torchvision (an architecture) or factory "
                             "(package.module:function)")
        if self.torchvision is not None:
            self.name = f"torchvision:{self.torchvision}"
        elif self.factory is not None:
            self.name = self.factory
        if self.num_classes is not None:
            if "num_classes" in self.params:
                raise ValueError("num_classes either beside name or in params, not both")
            self.params = {**self.params, "num_classes": self.num_classes}
        return self

    @property
    def name_key(self) -> str:
        """The key the model's name was written under."""
        return "torchvision" if self.torchvision is not None else "factory" if self.factory is not None else "name"


class ZippedEntry(Entry):
    """A defense or attack; ``zip`` pairs the i-th values of several parameters (no cross product)."""

    zip: dict[str, Annotated[list[Any], Field(min_length=1, max_length=MAX_LIST)]] | None = None

    def zip_issues(self) -> list[tuple[str, Any, str]]:
        """``(path under the entry, value, expected)`` for each way the zipped lists fail to pair up."""
        if self.zip is None:
            return []
        if not self.zip:
            return [("zip", {}, "a non-empty mapping of parameter names to lists of equal length")]
        found = [(f"zip.{p}", v, "a parameter given either in 'params' or in 'zip', not both")
                 for p, v in self.zip.items() if p in self.params]
        length = len(next(iter(self.zip.values())))
        found += [(f"zip.{p}", v, f"a list of {length} values, as long as the other zipped lists")
                  for p, v in self.zip.items() if len(v) != length]
        return found

    def variants(self) -> list[tuple[Params, dict[str, str]]]:
        """``(params, zip paths)`` of each paired variant; the paths name where each zipped value was written."""
        if self.zip is None:
            return [(dict(self.params), {})]
        length = len(next(iter(self.zip.values())))
        return [({**self.params, **{p: vs[i] for p, vs in self.zip.items()}},
                 {p: f"zip.{p}[{i}]" for p in self.zip}) for i in range(length)]


def _judge(value: Any) -> Any:
    """``true`` / ``false`` (the fixed judge, or none), or the user's own judge as a mapping: a ``ModelEntry``,
    validated here so that its errors name their keys (``evaluation.classifier.weights``) rather than a branch
    of the union (which then checks only that it is one)."""
    if isinstance(value, dict):
        return ModelEntry.model_validate(value)
    if isinstance(value, (bool, ModelEntry)):
        return value
    raise ValueError("true, false, or the user's classifier as a mapping: {torchvision: ARCH} or "
                     "{factory: package.module:function}, with weights: FILE")


class Evaluation(_Strict):
    num_images: int = Field(16, ge=1, le=10_000)
    #: Images per attack call: the attack runs on chunks of this many images, so a cell's memory is bounded
    #: whatever ``num_images`` is; None runs all of them at once.
    batch_size: int | None = Field(None, ge=1, le=10_000)
    #: The judge of attack accuracy and KNN distance: ``true``, the fixed ResNet-32 trained here
    #: (``evaluation.eval_classifier``); ``false``, none; or the user's own (e.g. a face-identity network), a model
    #: entry with ``weights``, loaded and never trained (the config checks it: ``ExperimentConfig._classifier``).
    classifier: Annotated[bool | InstanceOf[ModelEntry], BeforeValidator(_judge)] = True
    lpips_weights: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    lpips_net: Literal[tuple(BACKBONES)] = "alex"  # type: ignore[valid-type]


class Experiment(_Strict):
    name: ExperimentName | None = None
    seed: OneOrMany[Seed] = [0]
    dataset: OneOrMany[NamedEntry]
    model: OneOrMany[Annotated[ModelEntry, BeforeValidator(_named)]]
    train: Annotated[Train, BeforeValidator(_empty_mapping)] = Train()
    cut: OneOrMany[Name]
    defenses: OneOrMany[Annotated[ZippedEntry, BeforeValidator(_named)]]
    attacks: OneOrMany[Annotated[ZippedEntry, BeforeValidator(_named)]]
    evaluation: Annotated[Evaluation, BeforeValidator(_empty_mapping)] = Evaluation()
    device: Annotated[str, StringConstraints(pattern=DEVICE_PATTERN)] = "auto"


def parse(raw: dict[str, Any]) -> tuple[dict[str, Any], list["Issue"]]:
    """The config's sections, validated: ``(section -> value, issues)``. A section with an error is left out,
    and the others are still validated, so that later checks can report their problems in the same message."""
    try:
        return dict(Experiment.model_validate(raw)), []
    except ValidationError as exc:
        issues = issues_of(exc, raw, Experiment)
        if any(not error["loc"] for error in exc.errors()):  # not a mapping at all
            return {}, issues
        failed = {error["loc"][0] for error in exc.errors()}
    parsed = {}
    for name, field in Experiment.model_fields.items():
        if name in failed:
            continue
        if name not in raw:
            parsed[name] = field.get_default(call_default_factory=True)
            continue
        # a type built at run time, for pydantic (a model's field is never unannotated)
        kind: Any = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        # a model carries its own config; pydantic refuses a second one for it
        adapter = TypeAdapter(kind) if _find_model(field.annotation) else TypeAdapter(kind, config=STRICT)
        parsed[name] = adapter.validate_python(raw[name])
    return parsed, issues


@dataclass(frozen=True)
class Issue:
    """One error: the YAML path, the value found (shortened) and what was expected."""

    path: str
    value: Any
    expected: str

    def __str__(self) -> str:
        return problem(self.path, self.value, self.expected)


def yaml_path(raw: Any, loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the user wrote it: a list index only where the YAML has a list."""
    parts, node = [], raw
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a mapping's key rather than its value
            continue
        if isinstance(part, int) and not (isinstance(node, dict) and part in node):
            if isinstance(node, list):
                parts.append(f"[{part}]")
                node = node[part] if part < len(node) else None
            continue  # a single entry that the schema wrapped in a list
        parts.append(("." if parts else "") + str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return "".join(parts) or "<top level>"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema model that holds the key at ``loc`` (for listing its known keys)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        found = _find_model(field.annotation) if field is not None else None
        if found is None:
            return None
        model = found
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


_ENTRIES = {"Entry", "ZippedEntry", "ModelEntry"}


def _expected(error: ErrorDetails, schema: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden" and "[key]" not in loc:
        holder = _model_at(schema, loc[:-1])
        known = ", ".join(holder.model_fields) if holder is not None else ""
        return "no such key" + (f"; known keys: {known}" if known else "")
    if kind == "model_type" and not loc:
        return "a mapping of config keys"
    if kind == "model_type":
        return ("a name or a mapping with 'name' (and optional 'params')" if ctx.get("class_name") in _ENTRIES
                else "a mapping")
    if kind == "string_pattern_mismatch":
        return "a name of letters, digits, '.', '_' and '-' that starts with a letter or digit"
    return expected_of(error)


def issues_of(exc: ValidationError, raw: Any, schema: type[BaseModel]) -> list[Issue]:
    """Every error of a pydantic ValidationError of ``raw`` against ``schema``, as an Issue."""
    found = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path = yaml_path(raw, loc)
        value = error.get("input") if error["type"] != "missing" else None
        found.append(Issue(path, value, _expected(error, schema, loc)))
    return found
