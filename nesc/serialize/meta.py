"""The nesc meta a trainable artifact carries: the pool plan and the ``NESConfig``, as plain JSON.

A loaded trainable model needs no meta to train or freeze (the samplers and the graph say everything
freeze, the report and ``nesc.train.fit`` read), but ``gm.meta[names.PLAN]`` (budget, notes, which
layers share a pool) and ``gm.meta[names.CONFIG]`` are what the CLI and a user inspect, so they come
back as the objects they were:

    plan    {"pools": {name: {"label", "shape", "members"}}, "layers": {weight: [pool, shape, block, layout]},
             "dense": {weight: reason}, "dense_total", "target", "planned", "notes", "folded", "shared"}
    config  NESConfig's fields (``ratio`` left out while it is the default); ``overrides`` as
            [[key, null | LayerConfig's fields], ...], written only when every key is a string (a type key
            cannot be data)

The plan's layer graph is rebuilt from the pools' members (``("pool", name)`` -- ``("layer", weight)``
edges, dense layers as lone nodes). Decoding checks every type and builds through the dataclasses'
own validation; a malformed entry raises ``Invalid``.
"""

from __future__ import annotations

import dataclasses
import json

import networkx as nx

from nesc.core.config import LayerConfig, NESConfig
from nesc.core.errors import ConfigError
from nesc.core.sampling import Geometry
from nesc.passes.plan_pools import PoolPlan, PoolSpec

from .schema import Invalid, check_type

_PLAN_KEYS = {"pools", "layers", "dense", "dense_total", "target", "planned", "notes", "folded", "shared"}
_DEFAULT_RATIO = NESConfig().ratio


def encode_plan(plan) -> dict | None:
    if not isinstance(plan, PoolPlan):
        return None
    return {
        "pools": {n: {"label": p.label, "shape": list(p.shape), "members": list(p.members)} for n, p in plan.pools.items()},
        "layers": {n: [pool, list(g.shape), list(g.block), g.layout] for n, (pool, g) in plan.layers.items()},
        "dense": dict(plan.dense), "dense_total": int(plan.dense_total), "target": int(plan.target),
        "planned": int(plan.planned), "notes": list(plan.notes), "folded": sorted(plan.folded),
        "shared": sorted(plan.shared),
    }


def decode_plan(doc) -> PoolPlan | None:
    if doc is None:
        return None
    check_type(doc, dict, "the plan")
    if doc.keys() != _PLAN_KEYS:
        raise Invalid(f"the plan has keys {sorted(doc)[:12]}, expected {sorted(_PLAN_KEYS)}")
    pools, layers, graph = {}, {}, nx.Graph()
    for name, p in check_type(doc["pools"], dict, "plan pools").items():
        if not (isinstance(p, dict) and p.keys() == {"label", "shape", "members"} and isinstance(p["label"], str)
                and _strings(p["members"]) and _sizes(p["shape"], 4)):
            raise Invalid(f"plan pool {str(name)[:40]!r} must be {{label, shape (4 sizes), members (strings)}}")
        pools[name] = PoolSpec(name, p["label"], tuple(p["shape"]), tuple(p["members"]))
        graph.add_node(("pool", name), shape=tuple(p["shape"]), label=p["label"])
        for member in p["members"]:
            graph.add_edge(("layer", member), ("pool", name))
    for name, entry in check_type(doc["layers"], dict, "plan layers").items():
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and entry[0] in pools
                and _sizes(entry[1], 4) and _sizes(entry[2], 2) and isinstance(entry[3], str)):
            raise Invalid(f"plan layer {str(name)[:40]!r} must be [pool of the plan, shape, block, layout]")
        try:
            layers[name] = (entry[0], Geometry(tuple(entry[1]), pools[entry[0]].shape, tuple(entry[2]), entry[3]))
        except ValueError as e:
            raise Invalid(f"plan layer {name!r}: {e}") from None
    dense = check_type(doc["dense"], dict, "plan dense")
    if not all(isinstance(v, str) for v in dense.values()):
        raise Invalid("plan dense must map weight names to reasons (strings)")
    for name in dense:
        graph.add_node(("layer", name), dense=dense[name])
    for key in ("dense_total", "target", "planned"):
        if not (type(doc[key]) is int and doc[key] >= 0):
            raise Invalid(f"plan {key} must be an int >= 0")
    for key in ("notes", "folded", "shared"):
        if not _strings(doc[key]):
            raise Invalid(f"plan {key} must be a list of strings")
    return PoolPlan(pools, layers, dict(dense), graph, doc["dense_total"], doc["target"], doc["planned"],
                    list(doc["notes"]), frozenset(doc["folded"]), frozenset(doc["shared"]))


def encode_config(config) -> dict | None:
    if not isinstance(config, NESConfig):
        return None
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "ratio" and type(value) is type(_DEFAULT_RATIO):
            continue  # the default gives way to a param_budget: leave it to NESConfig
        if f.name == "overrides":
            if not all(isinstance(k, str) for k in value):
                return None  # a type-keyed rule has no JSON form: leave the config out (extra keeps its repr)
            value = [[k, None if v is None else dataclasses.asdict(v)] for k, v in value.items()]
        out[f.name] = value
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError):
        return None  # a field of a type JSON cannot hold: leave the config out (extra keeps its repr)
    return out


def decode_config(doc) -> NESConfig | None:
    if doc is None:
        return None
    check_type(doc, dict, "the config")
    fields = {f.name for f in dataclasses.fields(NESConfig)}
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise Invalid(f"the config has unknown fields {unknown[:8]}")
    values = dict(doc)
    try:
        if "overrides" in values:
            rules = check_type(values["overrides"], list, "config overrides")
            if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in rules):
                raise Invalid("config overrides must be [[key, rule], ...] with string keys")
            values["overrides"] = {k: None if v is None else _layer(v) for k, v in rules}
        return NESConfig(**values)
    except (ConfigError, TypeError, ValueError) as e:
        raise Invalid(f"the config does not validate: {str(e)[:200]}") from None


def _layer(doc) -> LayerConfig:
    check_type(doc, dict, "an override rule")
    if isinstance(doc.get("pool_shape"), list):
        doc = {**doc, "pool_shape": tuple(doc["pool_shape"])}
    return LayerConfig(**doc)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _sizes(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(type(d) is int and 0 < d < 2**31 for d in value)
