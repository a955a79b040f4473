"""The input and output structures of a saved graph (pytree ``TreeSpec``s) as data, both ways.

An exported graph takes and returns nested containers: tuples, dicts, and library types such as a
Hugging Face ``ModelOutput`` dataclass, which pytree knows only once the module defining it has been
imported. The file names such a type (``transformers.models.swin.modeling_swin.SwinModelOutput``) but
the loader never imports what a file names: a type registered in this process is restored; any other
comes back as a plain container of the same structure (a dict keyed by its fields when its context
lists them, a tuple otherwise), with one ``NescWarning`` that names the type and how to get it back
(import its library before ``nesc.load``). ``collections.defaultdict`` is always a plain dict: pytree
would import its default factory's module, named by the file.

Written in ``treespec_dumps``'s protocol-1 JSON (``[1, {type, context, children_spec}]``); a
namedtuple without a pytree serialized name is written under ``module.qualname``.
"""

from __future__ import annotations

import json
import warnings

from nesc.core import compat
from nesc.core.errors import NescWarning

from .schema import MAX_DEPTH, Invalid

PROTOCOL = 1
NAMEDTUPLE = "collections.namedtuple"
_PLAIN_DICT = "builtins.dict"
_PLAIN_TUPLE = "builtins.tuple"
_NEVER_RESTORED = {"collections.defaultdict"}  # its context names a module that pytree would import


def encode_spec(spec) -> str:
    return json.dumps([PROTOCOL, _encode(spec)])


def _encode(spec) -> dict:
    kind, context, children = compat.treespec_node(spec)
    return {"type": kind, "context": context, "children_spec": [_encode(c) for c in children]}


def decode_spec(text: str, what: str, path: str):
    """The TreeSpec of ``text``, with every type this process does not know replaced by a plain
    container (warned about once, naming ``what`` and the file)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Invalid(f"{what}: not JSON ({type(e).__name__})") from None
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == PROTOCOL):
        raise Invalid(f"{what}: expected [{PROTOCOL}, tree], got {str(doc)[:80]}")
    plain: dict[str, str] = {}
    tree = _plain(doc[1], plain, what, 0)
    if plain:
        kinds = "; ".join(f"{name} as a {shape}" for name, shape in plain.items())
        modules = sorted({name.rsplit(".", 1)[0] for name in plain if name not in _NEVER_RESTORED})
        how = (f" To get the original type back, import its module before nesc.load ({', '.join(modules)}): "
               f"nesc.load never imports what a file names." if modules else "")
        warnings.warn(NescWarning(f"{path}: the model's {what} use types this process has not registered with "
                                  f"torch's pytree; they come back as plain containers of the same structure: "
                                  f"{kinds}.{how}"), stacklevel=5)
    return compat.treespec_loads(json.dumps([PROTOCOL, tree]))


def _plain(node, plain: dict, what: str, depth: int) -> dict:
    if depth > MAX_DEPTH or not (isinstance(node, dict) and node.keys() == {"type", "context", "children_spec"}):
        raise Invalid(f"{what}: a tree node must be {{type, context, children_spec}}, nested at most {MAX_DEPTH} deep")
    kind, context, children = node["type"], node["context"], node["children_spec"]
    if not (isinstance(children, list) and (kind is None or isinstance(kind, str))
            and (context is None or isinstance(context, str))):
        raise Invalid(f"{what}: tree node of type {str(kind)[:60]!r} is malformed")
    children = [_plain(c, plain, what, depth + 1) for c in children]
    if kind is None:
        if children or context is not None:
            raise Invalid(f"{what}: a leaf has no context and no children")
        return node
    name = _json(context, what) if kind == NAMEDTUPLE else kind
    if kind == NAMEDTUPLE and not isinstance(name, str):
        raise Invalid(f"{what}: a namedtuple's context must name its class")
    if compat.pytree_type_registered(name) and kind not in _NEVER_RESTORED:
        return {**node, "children_spec": children}
    keys = _keys(_json(context, what), len(children))
    plain[name] = "dict" if keys is not None else "tuple"
    if keys is None:
        return {"type": _PLAIN_TUPLE, "context": "null", "children_spec": children}
    return {"type": _PLAIN_DICT, "context": json.dumps(keys), "children_spec": children}


def _json(text, what: str):
    try:
        return json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        raise Invalid(f"{what}: a tree node's context is not JSON") from None


def _keys(context, n: int) -> list | None:
    """The field names an unknown type's context lists for its ``n`` children: a dataclass or
    ModelOutput's ``[keys]``, ``torch.export.register_dataclass``'s ``[keys, none_keys]``, a
    defaultdict's ``{"dict_context": keys}``; None when it lists none (a tuple then)."""
    if isinstance(context, dict):
        context = context.get("dict_context")
    for keys in (context, context[0] if isinstance(context, list) and context else None):
        if (isinstance(keys, list) and len(keys) == n and all(isinstance(k, (str, int)) for k in keys)
                and len(set(keys)) == n):
            return keys
    return None
