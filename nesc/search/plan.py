"""A compression plan as a file: what ``nesc search`` writes (``best.json``) and ``nesc compress --plan`` reads.

    {"format": "nesc-plan", "version": 1, "model": "resnet_fmnist", "width": 1.0, "param_budget": 19438,
     "min_params": 1024,
     "layers": {"stem.0.weight": "dense", "layer1.0.conv1.weight": {"ratio": 3.2},
                "layer2.0.conv1.weight": {"pool": "s1"}, "layer3.0.conv2.weight": {}}}

Every layer the plan lists gets an explicit rule (the keys are weight names, so ``NESConfig``'s
override resolution rejects a name the model does not have): ``"dense"`` keeps it dense, ``{"ratio": r}``
gives it its own pool of ``numel / r`` parameters, ``{"pool": name}`` makes it sample from a pool shared
with every layer naming the same pool, and ``{}`` gives it its own pool sized from what the budget
leaves. Layers the plan does not list follow ``NESConfig``'s defaults (``min_params``), with
``keep_first``/``keep_classifier`` off: the plan decides. The whole model meets ``param_budget``.

The file is untrusted input: it is read with a size limit and checked field by field against the
schema below (types, ranges, an allow-list of keys, name patterns) before anything uses it; every
failure is an ``ArtifactError`` that names the field, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from nesc.core.config import LayerConfig, NESConfig
from nesc.core.errors import ArtifactError
from nesc.core.files import atomic_write_bytes

FORMAT, VERSION = "nesc-plan", 1
MAX_BYTES = 1 << 20  # a plan of thousands of layers is a few hundred kB
MAX_LAYERS = 10_000
MAX_RATIO = 1e6
MAX_WIDTH = 16.0
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")  # weight names: dotted module paths
POOL = re.compile(r"[A-Za-z0-9_]{1,32}")
KEYS = {"format", "version", "model", "width", "param_budget", "min_params", "layers"}
DENSE = "dense"

LayerRule = str | dict  # "dense" | {"ratio": r} | {"pool": name} | {}


@dataclass(frozen=True)
class Plan:
    """A validated plan (see the module docstring). ``layers`` maps weight names to rules."""

    model: str
    param_budget: int
    layers: dict[str, LayerRule] = field(default_factory=dict)
    width: float = 1.0
    min_params: int = 1024

    def __post_init__(self) -> None:
        check(self.to_json())  # one validation path, whether built in code or read from a file

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "width": self.width,
                "param_budget": self.param_budget, "min_params": self.min_params, "layers": dict(self.layers)}

    def canonical(self) -> str:
        """The JSON text that identifies the plan: sorted keys, no spaces, floats as Python prints them."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        """The cache key: sha256 of the canonical JSON (16 hex digits are plenty for a run dir)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def nes_config(self, **changes) -> NESConfig:
        """The ``NESConfig`` that builds this plan (``changes``: other NESConfig fields, e.g. ``init``)."""
        overrides: dict[str, LayerConfig | None] = {}
        for name, rule in self.layers.items():
            if rule == DENSE:
                overrides[name] = None
            else:
                overrides[name] = LayerConfig(ratio=rule.get("ratio"), pool=rule.get("pool"))
        return NESConfig(ratio=None, param_budget=self.param_budget, policy="per_layer", keep_first=False,
                         keep_classifier=False, min_params=self.min_params, overrides=overrides, **changes)

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        text = json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
        return atomic_write_bytes(path, text.encode(), overwrite=overwrite, what="plan")


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (``ArtifactError`` for anything that is not a valid plan)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"plan {str(path)!r}: cannot read it ({e.strerror}); pass the best.json that "
                            f"nesc search wrote") from None
    if len(data) > MAX_BYTES:
        raise ArtifactError(f"plan {str(path)!r} is larger than {MAX_BYTES:,} bytes; a plan is a small JSON file")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise ArtifactError(f"plan {str(path)!r} is not valid JSON ({e})") from None
    return from_json(doc, where=str(path))


def from_json(doc: object, where: str = "plan") -> Plan:
    check(doc, where)
    return Plan(model=doc["model"], param_budget=doc["param_budget"], layers=dict(doc["layers"]),
                width=float(doc["width"]), min_params=doc["min_params"])


def check(doc: object, where: str = "plan") -> None:
    """Validate a plan document against the schema; ``ArtifactError`` names the first bad field."""
    def bad(what: str, expected: str, got: object) -> ArtifactError:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ArtifactError(f"{where}: {what} must be {expected}, got {shown}; write the plan with nesc search "
                             f"(nesc.search.Plan.save), or fix that field")

    if not isinstance(doc, dict):
        raise bad("the document", "a JSON object", type(doc).__name__)
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise bad(f"field {unknown[0]!r}", f"one of {', '.join(sorted(KEYS))}", unknown[0])
    missing = sorted(KEYS - set(doc))
    if missing:
        raise bad(f"field {missing[0]!r}", "present", "nothing")
    if doc["format"] != FORMAT or doc["version"] != VERSION:
        raise bad("format/version", f"{FORMAT!r} version {VERSION}", (doc["format"], doc["version"]))
    if not isinstance(doc["model"], str) or not NAME.fullmatch(doc["model"]):
        raise bad("model", "a registry model name", doc["model"])
    if not _is_int(doc["param_budget"]) or doc["param_budget"] < 1:
        raise bad("param_budget", "a positive int", doc["param_budget"])
    if not _is_int(doc["min_params"]) or doc["min_params"] < 0:
        raise bad("min_params", "an int >= 0", doc["min_params"])
    width = doc["width"]
    if not _is_number(width) or not (0 < width <= MAX_WIDTH):
        raise bad("width", f"a number in (0, {MAX_WIDTH:g}]", width)
    layers = doc["layers"]
    if not isinstance(layers, dict) or len(layers) > MAX_LAYERS:
        raise bad("layers", f"an object of at most {MAX_LAYERS} layers", type(layers).__name__)
    for name, rule in layers.items():
        if not NAME.fullmatch(name):
            raise bad("a layer name", "a weight name (letters, digits, _ . -)", name)
        _check_rule(name, rule, bad)


def _check_rule(name: str, rule: object, bad) -> None:
    if rule == DENSE:
        return
    if not isinstance(rule, dict) or len(rule) > 1 or not set(rule) <= {"ratio", "pool"}:
        raise bad(f"layers[{name!r}]", '"dense", {"ratio": r}, {"pool": name} or {}', rule)
    if "ratio" in rule and not (_is_number(rule["ratio"]) and 1.0 <= rule["ratio"] <= MAX_RATIO):
        raise bad(f"layers[{name!r}].ratio", f"a number in [1, {MAX_RATIO:g}]", rule["ratio"])
    if "pool" in rule and not (isinstance(rule["pool"], str) and POOL.fullmatch(rule["pool"])):
        raise bad(f"layers[{name!r}].pool", "a pool name (1-32 letters, digits, _)", rule["pool"])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a plan may hold")
