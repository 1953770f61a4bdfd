"""The allowlist of built-in Keras objects, derived from the installed Keras.

`fineprune/load/inspection/allowlist.py` holds the result as literals (the API never imports
Keras); `tests/test_allowlist.py` checks the two agree, and
`.venv/bin/python tests/allowlist_source.py > fineprune/load/inspection/allowlist.py`
regenerates the file after a Keras upgrade.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import keras
from keras.src import activations, constraints, initializers, regularizers
from keras.src.api_export import get_name_from_symbol

# Built-in classes that exist to run code the file brings along (or to load other files).
CODE_RUNNING = frozenset(
    {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer", "FeatureSpace"}
)
ABSTRACT = frozenset(
    {
        "Layer", "Wrapper", "Initializer", "Regularizer", "Constraint", "Optimizer", "Loss",
        "Metric", "LearningRateSchedule", "Quantizer", "QuantizationConfig",
    }
)  # fmt: skip
NOT_MODELLING = frozenset({"get", "serialize", "deserialize"})
ACTIVATION_LAYERS = frozenset({"Activation", "ELU", "LeakyReLU", "ReLU", "Softmax"})


def _written_module(obj: Any) -> str:
    """The `module` Keras writes for `obj`: its canonical export's namespace, or its own."""
    name = get_name_from_symbol(obj)
    return name.rsplit(".", 1)[0] if name else obj.__module__


def _public(namespace: types.ModuleType, base: type | None) -> dict[str, Any]:
    """Public names of `namespace`: classes under `base`, or functions when `base` is None."""
    found: dict[str, Any] = {}
    for name in dir(namespace):
        obj = getattr(namespace, name)
        if name.startswith("_") or name in ABSTRACT | CODE_RUNNING | NOT_MODELLING:
            continue
        wanted = (
            inspect.isfunction(obj)
            if base is None
            else isinstance(obj, type) and issubclass(obj, base)
        )
        if wanted:
            found[name] = obj
    return found


def _entries(namespace: types.ModuleType, public: dict[str, Any]) -> dict[str, set[str]]:
    """module -> names: the public namespace with every alias, and what Keras writes."""
    entries: dict[str, set[str]] = {namespace.__name__: set(public)}
    for obj in public.values():
        entries.setdefault(_written_module(obj), set()).add(obj.__name__)
    return entries


def derive() -> dict[str, Any]:
    """The tables, as plain sets, from the Keras this process imports."""
    layers = _public(keras.layers, keras.layers.Layer)
    classes: dict[str, dict[str, set[str]]] = {
        "layer": _entries(keras.layers, layers),
        "activation": _entries(
            keras.layers, {n: c for n, c in layers.items() if n in ACTIVATION_LAYERS}
        ),
        "initializer": _entries(
            keras.initializers, _public(keras.initializers, keras.initializers.Initializer)
        ),
        "regularizer": _entries(
            keras.regularizers, _public(keras.regularizers, keras.regularizers.Regularizer)
        ),
        "constraint": _entries(
            keras.constraints, _public(keras.constraints, keras.constraints.Constraint)
        ),
        "dtype_policy": _entries(
            keras.dtype_policies, _public(keras.dtype_policies, keras.DTypePolicy)
        ),
        "quantizer": _entries(keras.quantizers, _public(keras.quantizers, object)),
        "optimizer": _entries(
            keras.optimizers, _public(keras.optimizers, keras.optimizers.Optimizer)
        ),
        "schedule": _entries(
            keras.optimizers.schedules,
            _public(keras.optimizers.schedules, keras.optimizers.schedules.LearningRateSchedule),
        ),
        "loss": _entries(keras.losses, _public(keras.losses, keras.losses.Loss)),
        "metric": _entries(keras.metrics, _public(keras.metrics, keras.metrics.Metric)),
    }
    models = {"Sequential": keras.Sequential, "Model": keras.Model}
    classes["layer"].setdefault("keras", set()).update(models)
    classes["layer"].setdefault("keras.models", set()).update(models)
    functional = keras.src.models.functional.Functional
    classes["layer"].setdefault(_written_module(functional), set()).add("Functional")
    classes["dtype_policy"].setdefault("keras", set()).update(
        n for n in ("DTypePolicy", "FloatDTypePolicy") if hasattr(keras, n)
    )
    functions = {
        "activation": _entries(keras.activations, _public(keras.activations, None)),
        "loss": _entries(keras.losses, _public(keras.losses, None)),
        "metric": _entries(keras.metrics, _public(keras.metrics, None)),
    }
    identifiers = {
        kind: {
            name
            for name, obj in module.ALL_OBJECTS_DICT.items()
            if name not in NOT_MODELLING and obj.__name__ not in ABSTRACT
        }
        for kind, module in (
            ("activation", activations),
            ("initializer", initializers),
            ("regularizer", regularizers),
            ("constraint", constraints),
        )
    }
    return {
        "version": keras.__version__,
        "classes": classes,
        "functions": functions,
        "identifiers": identifiers,
    }


def _literal(table: dict[str, Any], indent: str) -> list[str]:
    """Nested dicts of name sets as source lines, wrapped at 100 columns."""
    lines = []
    for key in sorted(table):
        value = table[key]
        if isinstance(value, dict):
            lines.append(f'{indent}"{key}": {{')
            lines.extend(_literal(value, indent + "    "))
            lines.append(f"{indent}}},")
            continue
        lines.append(f'{indent}"{key}": frozenset(')
        lines.append(f"{indent}    {{")
        row = indent + "        "
        for name in sorted(value):
            cell = f'"{name}", '
            if len(row) + len(cell.rstrip()) > 100:
                lines.append(row.rstrip())
                row = indent + "        "
            row += cell
        lines.append(row.rstrip())
        lines.append(f"{indent}    }}")
        lines.append(f"{indent}),")
    return lines


def render() -> str:
    """The allowlist module's source."""
    tables = derive()
    out = [
        '"""Built-in Keras objects a model file may name, by kind: the allowlist of the checks.',
        "",
        f"Generated from Keras {tables['version']} by `tests/allowlist_source.py` (the API cannot",
        "import Keras); `tests/test_allowlist.py` fails when the installed Keras disagrees.",
        "CLASSES: kind -> module -> class names Keras resolves without importing anything new",
        "(public namespaces with their aliases, and the module Keras writes for each class).",
        "FUNCTIONS: the same for serialized functions (class_name 'function'). IDENTIFIERS:",
        "strings Keras looks up by name in a slot of that kind ('relu', 'glorot_uniform').",
        "Classes that run code of their own (Lambda, TFSMLayer, ...) and abstract bases are left",
        'out."""',
        "",
        "from __future__ import annotations",
        "",
        f'KERAS_VERSION = "{tables["version"]}"',
        "",
    ]
    for name, key in (
        ("CLASSES", "classes"),
        ("FUNCTIONS", "functions"),
        ("IDENTIFIERS", "identifiers"),
    ):
        kind = (
            "dict[str, frozenset[str]]"
            if key == "identifiers"
            else ("dict[str, dict[str, frozenset[str]]]")
        )
        out.append(f"{name}: {kind} = {{")
        out.extend(_literal(tables[key], "    "))
        out.append("}  # fmt: skip")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
