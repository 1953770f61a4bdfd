"""Every object a model config names, at any depth, checked against the built-in allowlist.

Keras rebuilds a model by resolving each serialized object's `module` and `class_name` (and,
in some slots, plain strings by name) and calling what it finds. Any importable `keras.*`
module is a gadget: naming a class of `keras.src.saving.saving_lib_test` makes Keras import
that test module, which registers its custom classes process-wide. A `shared_object_id` hands
a later entry whatever object an earlier entry with the same id built, whatever class the
later one claims. So every object must be a built-in of the kind its slot takes, named the way
Keras names built-ins (so nothing new is imported), entries sharing an id must claim the same
class, and layer names must be ones TensorFlow accepts as scope names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fineprune.errors import InvalidModelError, UnsafeModelError
from fineprune.load.inspection.allowlist import CLASSES, FUNCTIONS, IDENTIFIERS
from fineprune.load.inspection.limits import Limits
from fineprune.text import quoted

MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})
LAYER_KEYS = frozenset({"layers", "layer", "backward_layer", "forward_layer", "cell", "cells"})
COMPILE_KINDS = frozenset({"optimizer", "schedule", "loss", "metric"})
# Kinds whose objects may hold objects of the same kind in any argument (a dtype policy map,
# a quantization config's quantizers, an optimizer's schedule).
_SELF_NESTING = {
    "dtype_policy": frozenset({"dtype_policy"}),
    "quantizer": frozenset({"quantizer"}),
    **dict.fromkeys(COMPILE_KINDS, COMPILE_KINDS | {"dtype_policy"}),
}
_NAMED_KINDS = ("activation", "initializer", "regularizer", "constraint")

# Built-in Keras classes that exist to run code the file brings along; refused anywhere.
CODE_RUNNING_LAYERS: dict[str, str] = {
    "Lambda": "is a Lambda layer: it would run code from the file",
    "TFSMLayer": "is a TFSMLayer: it would load and run an external TensorFlow SavedModel",
    "TorchModuleWrapper": "is a TorchModuleWrapper: it would unpickle a PyTorch module",
    "JaxLayer": "is a JaxLayer: it wraps arbitrary JAX functions",
    "FlaxLayer": "is a FlaxLayer: it wraps an arbitrary Flax module",
    "TFOpLambda": "is a TFOpLambda layer: it would call a TensorFlow function named by the file",
    "SlicingOpLambda": "is a SlicingOpLambda layer: it would call code named by the file",
}
# Markers Keras writes for plain values (tensors, arrays, tuples, shapes); they carry no code.
VALUE_MARKERS = frozenset(
    {
        "__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__ellipsis__",
        "__slice__", "__tuple__", "TensorShape",
    }
)  # fmt: skip
_META_KEYS = frozenset({"class_name", "module", "registered_name", "shared_object_id", "config"})
SAFE_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\-]*")
"""TensorFlow's valid op names without '/', '\\' and '>': a name TensorFlow refuses as a scope
would only fail at the profile stage, a name with '>' is shaped like a registered object."""
_REGISTERED_SHAPE = re.compile(r"[\w.]+>[\w.]+")
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass
class LayerEntry:
    """One layer of the config (models included), with the layers its slots hold."""

    class_name: str
    node: dict[str, Any] = field(repr=False)
    """The serialized object: class_name, config, build_config, inbound_nodes..."""
    name: str | None
    nesting: int
    children: list[LayerEntry] = field(default_factory=list, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return self.node["config"]


def check_config(config: dict[str, Any], limits: Limits) -> LayerEntry:
    """Walk a model config and refuse anything outside plain built-in Keras.

    Returns the model as a tree of layers. Raises UnsafeModelError naming the object and
    where it sits, InvalidModelError for configs that are not models.
    """
    class_name = config.get("class_name")
    if not isinstance(class_name, str) or not isinstance(config.get("config"), dict):
        raise InvalidModelError("the model config has no class_name/config: not a Keras model")
    if class_name not in MODEL_CLASSES:
        if any(class_name in names for names in CLASSES["layer"].values()):
            raise InvalidModelError(f"the file holds a single {class_name!r} layer, not a model")
        module = config.get("module")
        origin = f" from module {quoted(module)}" if isinstance(module, str) else ""
        raise UnsafeModelError(
            f"model has class {quoted(class_name)}{origin}, which is not a built-in Keras"
            " model (Sequential or Functional); refused"
        )
    walker = _Walker(limits)
    root = LayerEntry(class_name, config, _name(config), 0)
    if root.name is not None:
        check_name(root.name, limits)
    walker.object(config, frozenset({"layer"}), "model", None, root, 0)
    return root


def layer_classes(root: LayerEntry) -> list[str]:
    """Class names of every layer under `root`, in config order, `root` itself excluded."""
    found: list[str] = []
    pending = list(reversed(root.children))
    while pending:
        entry = pending.pop()
        found.append(entry.class_name)
        pending.extend(reversed(entry.children))
    return found


class _Walker:
    """The walk's state: layers counted, shared ids seen, where each object sits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.layers = 0
        self.shared: dict[int, tuple[Any, ...]] = {}

    def visit(
        self,
        value: Any,
        kinds: frozenset[str],
        key: str,
        layer: str | None,
        owner: LayerEntry,
        depth: int,
    ) -> None:
        """A value in slot `key`: objects in it must be of one of `kinds` (none: values only)."""
        if depth > self.limits.config_depth:
            raise InvalidModelError("the model config is nested too deeply")
        if isinstance(value, list):
            for item in value:
                self.visit(item, kinds, key, layer, owner, depth + 1)
        elif isinstance(value, dict):
            if "class_name" in value:
                self.object(value, kinds, key, layer, owner, depth + 1)
                return
            for child_key, child in value.items():
                child_kinds = kinds or _slot_kinds(str(child_key), None)
                self.visit(child, child_kinds, str(child_key), layer, owner, depth + 1)
        elif isinstance(value, str):
            self.string(value, kinds, key, layer)

    def string(self, value: str, kinds: frozenset[str], key: str, layer: str | None) -> None:
        """Strings Keras resolves by name in kinded slots must name built-ins of that kind."""
        if kinds & COMPILE_KINDS:
            return  # compile_config: never built (the model is loaded with compile=False)
        named = [k for k in _NAMED_KINDS if k in kinds]
        if named:
            if not any(value in IDENTIFIERS[k] for k in named):
                raise UnsafeModelError(
                    f"{_where(layer)} has {quoted(key)} {quoted(value)}, which is not the name"
                    f" of a built-in Keras {named[0]}; refused"
                )
            return
        if "dtype_policy" in kinds:
            if not _DTYPE_NAME.fullmatch(value):
                raise UnsafeModelError(
                    f"{_where(layer)} has dtype {quoted(value)}, which is not a dtype name; refused"
                )
            return
        if "layer" in kinds:
            raise UnsafeModelError(
                f"{_where(layer)} has {quoted(value)} where {quoted(key)} holds layers; refused"
            )
        if _REGISTERED_SHAPE.fullmatch(value):
            raise UnsafeModelError(
                f"{_where(layer)} has {quoted(key)} {quoted(value)}, the name of a registered"
                " custom object; refused"
            )

    def object(
        self,
        obj: dict[str, Any],
        kinds: frozenset[str],
        key: str,
        layer: str | None,
        owner: LayerEntry,
        depth: int,
    ) -> None:
        """Check one serialized object, then everything it holds."""
        class_name = obj["class_name"]
        if not isinstance(class_name, str):
            raise InvalidModelError(f"{_where(layer)} has a class_name that is not a string")
        is_layer = kinds == frozenset({"layer"})
        subject = (
            f"layer {_layer_label(obj)} has"
            if is_layer
            else f"{_where(layer)} has {quoted(key)} of"
        )
        if class_name in VALUE_MARKERS:
            for child_key, child in obj.items():
                if child_key not in ("class_name", "module", "registered_name"):
                    self.visit(child, frozenset(), str(child_key), layer, owner, depth + 1)
            return
        _refuse_code(obj, class_name, is_layer, subject, layer)
        kind = _resolve(obj, class_name, kinds, subject, key)
        registered = obj.get("registered_name")
        if registered is not None and not _registered_name_ok(obj, class_name, registered):
            raise UnsafeModelError(
                f"{subject} class {quoted(class_name)} registered as {quoted(registered)}:"
                " a registered custom object; refused"
            )
        self._shared(obj, class_name, subject)
        entry = owner
        if kind == "layer" and obj is not owner.node:
            entry = self._layer(obj, class_name, owner)
            layer = _layer_label(obj)
        elif kind == "layer":
            layer = _layer_label(obj)
        config = obj.get("config")
        if kind == "layer" and not isinstance(config, dict):
            raise InvalidModelError(f"layer {layer} has no config")
        if isinstance(config, dict):
            for child_key, child in config.items():
                child_kinds = _slot_kinds(str(child_key), kind)
                self.visit(child, child_kinds, str(child_key), layer, entry, depth + 1)
        elif config is not None and class_name != "function":
            self.visit(config, frozenset(), "config", layer, entry, depth + 1)
        for child_key, child in obj.items():
            if child_key in _META_KEYS:
                continue
            child_kinds = COMPILE_KINDS if child_key == "compile_config" else frozenset()
            self.visit(child, child_kinds, str(child_key), layer, entry, depth + 1)

    def _layer(self, obj: dict[str, Any], class_name: str, owner: LayerEntry) -> LayerEntry:
        """Count the layer, bound its nesting, check its name, and hang it under its owner."""
        self.layers += 1
        if self.layers > self.limits.layers:
            raise UnsafeModelError(
                f"the model has more than {self.limits.layers} layers (nested ones included);"
                " refused"
            )
        nesting = owner.nesting + 1
        if nesting > self.limits.nesting:
            raise UnsafeModelError(
                f"layer {_layer_label(obj)} sits {nesting} models or wrappers deep, over the"
                f" {self.limits.nesting} allowed; refused"
            )
        config = obj.get("config")
        for name in (obj.get("name"), config.get("name") if isinstance(config, dict) else None):
            if name is not None:
                check_name(name, self.limits)
        entry = LayerEntry(class_name, obj, _name(obj), nesting)
        owner.children.append(entry)
        return entry

    def _shared(self, obj: dict[str, Any], class_name: str, subject: str) -> None:
        """Entries sharing an id become one object, built from the first: same class only."""
        if "shared_object_id" not in obj:
            return
        shared_id = obj["shared_object_id"]
        if not isinstance(shared_id, int) or isinstance(shared_id, bool):
            raise InvalidModelError(f"{subject} a shared_object_id that is not a number")
        claim = (
            obj.get("module"),
            class_name,
            obj.get("config") if class_name == "function" else None,
        )
        first = self.shared.setdefault(shared_id, claim)
        if first != claim:
            raise UnsafeModelError(
                f"{subject} class {quoted(class_name)} but shares object {shared_id} with an"
                f" entry of class {quoted(first[1])}: Keras would hand it that object; refused"
            )


def check_name(name: Any, limits: Limits) -> None:
    """A layer or model name TensorFlow accepts as a scope, and no longer than a line."""
    if not isinstance(name, str):
        raise InvalidModelError(f"a layer has a name that is not a string: {quoted(name, 40)}")
    if len(name) > limits.name_chars or not SAFE_NAME.fullmatch(name):
        raise UnsafeModelError(
            f"layer name {quoted(name, 60)} is not one TensorFlow accepts (letters, digits and"
            " '_', '.', '-', not starting with '_' or '-', at most"
            f" {limits.name_chars} characters); refused"
        )


def _slot_kinds(key: str, context: str | None) -> frozenset[str]:
    """Kinds of object Keras deserializes in argument `key` of an object of kind `context`."""
    if context in _SELF_NESTING:
        return _SELF_NESTING[context]
    if key in LAYER_KEYS:
        return frozenset({"layer"})
    for suffix in ("initializer", "regularizer", "constraint"):
        if key == suffix or key.endswith(f"_{suffix}"):
            return frozenset({suffix})
    if key == "activation" or key.endswith("_activation"):
        return frozenset({"activation"})
    if key == "dtype":
        return frozenset({"dtype_policy"})
    if key == "quantization_config":
        return frozenset({"quantizer"})
    return frozenset()


def _refuse_code(
    obj: dict[str, Any], class_name: str, is_layer: bool, subject: str, layer: str | None
) -> None:
    """Classes and markers that would run code from the file, named for what they do."""
    if class_name in CODE_RUNNING_LAYERS:
        who = f"layer {_layer_label(obj)}" if is_layer else f"{_where(layer)} holds a layer that"
        raise UnsafeModelError(f"{who} {CODE_RUNNING_LAYERS[class_name]}; refused")
    if class_name in ("__lambda__", "__typespec__"):
        raise UnsafeModelError(
            f"{subject} serialized Python code ({class_name}): it would run code from the"
            " file; refused"
        )
    if class_name in ("TypeSpec", "CompositeTensor") or class_name.startswith("__"):
        raise UnsafeModelError(
            f"{subject} a serialized object of kind {quoted(class_name)} that is not supported;"
            " refused"
        )


def _resolve(
    obj: dict[str, Any], class_name: str, kinds: frozenset[str], subject: str, key: str
) -> str:
    """The kind of built-in `obj` names, as Keras resolves it, or a refusal saying why not."""
    has_module = "module" in obj
    module = obj.get("module")
    if has_module and not isinstance(module, str):
        origin = "no module (custom)"
    else:
        origin = f"module {quoted(module)}" if has_module else "no module"
    if class_name == "function":
        name = obj.get("config")
        if not isinstance(name, str):
            raise InvalidModelError(f"{subject} a function without a name")
        for kind in sorted(kinds):
            if has_module and name in FUNCTIONS.get(kind, {}).get(str(module), ()):
                return kind
        raise UnsafeModelError(
            f"{subject} class 'function' from {origin} ({quoted(name)}), which is not"
            f" {_kind_words(kinds)}; refused"
        )
    for kind in sorted(kinds):
        tables = CLASSES.get(kind, {})
        if has_module:
            if class_name in tables.get(str(module), ()):
                return kind
        elif any(class_name in names for names in tables.values()):
            return kind  # legacy configs (.h5) name built-ins by class name alone
    raise UnsafeModelError(
        f"{subject} class {quoted(class_name)} from {origin}, which is not"
        f" {_kind_words(kinds)}; refused"
    )


def _kind_words(kinds: frozenset[str]) -> str:
    if kinds == frozenset({"layer"}):
        return "a built-in Keras layer"
    if not kinds:
        return "a built-in Keras object that may sit there (only plain values may)"
    return "a built-in Keras " + " or ".join(sorted(kinds)).replace("_", " ")


def _registered_name_ok(obj: dict[str, Any], class_name: str, registered: Any) -> bool:
    """Built-ins carry no registered name, their class name, or (functions) their own name."""
    if not isinstance(registered, str) or ">" in registered:
        return False
    if registered == class_name:
        return True
    return class_name == "function" and registered == obj.get("config")


def _name(obj: dict[str, Any]) -> str | None:
    config = obj.get("config")
    name = obj.get("name")
    if not isinstance(name, str) and isinstance(config, dict):
        name = config.get("name")
    return name if isinstance(name, str) else None


def _layer_label(obj: dict[str, Any]) -> str:
    name = _name(obj)
    if name is not None:
        return quoted(name)
    class_name = obj.get("class_name")
    return f"of class {quoted(class_name if isinstance(class_name, str) else '?')}"


def _where(layer: str | None) -> str:
    return f"layer {layer}" if layer is not None else "the model config"
