"""A model's layer graph as plain data, and an eager interpreter over it.

Keras 3 keeps the graph of a Sequential or Functional model as nodes linked through the
`_keras_history` of their tensors. Reading it once lets the profiler stop half-way, the sweep
start half-way, and the naive sweep zero a tensor in the middle, all with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from fineprune.errors import PruningError

TensorKey = int  # id() of a symbolic KerasTensor


@dataclass(frozen=True)
class GraphNode:
    """One call of one layer: which tensors went in and which came out."""

    layer: Any
    node: Any
    inputs: tuple[Any, ...]
    outputs: tuple[Any, ...]

    @property
    def name(self) -> str:
        return str(self.layer.name)

    def input_keys(self) -> list[TensorKey]:
        return [id(t) for t in self.inputs]

    def output_keys(self) -> list[TensorKey]:
        return [id(t) for t in self.outputs]


class ModelGraph:
    """The nodes of a model in an order where every node comes after its inputs' producers."""

    def __init__(self, model: keras.Model) -> None:
        try:
            self.inputs = list(model.inputs)
            self.outputs = list(model.outputs)
        except (AttributeError, ValueError) as exc:
            raise PruningError(
                f"model {model.name!r} has no defined inputs and outputs (was it built?)"
            ) from exc
        self.model = model
        self.nodes: list[GraphNode] = _topological_nodes(self.outputs)
        self.producer: dict[TensorKey, GraphNode] = {}
        self.consumers: dict[TensorKey, list[GraphNode]] = {}
        for gnode in self.nodes:
            for key in gnode.output_keys():
                self.producer[key] = gnode
            for key in gnode.input_keys():
                self.consumers.setdefault(key, []).append(gnode)

    def nodes_of(self, layer_name: str) -> list[GraphNode]:
        return [n for n in self.nodes if n.name == layer_name]

    def layer_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def downstream_layers(self, layer_name: str) -> list[str]:
        """Names of the layers that consume `layer_name`'s output, directly or not, in order.

        The classifier head above a pruned convolution: what fine-tuning may leave as delivered.
        """
        reached: set[TensorKey] = {k for n in self.nodes_of(layer_name) for k in n.output_keys()}
        names: list[str] = []
        for gnode in self.nodes:  # topological: a node's inputs are settled before it
            if gnode.name != layer_name and reached.intersection(gnode.input_keys()):
                reached.update(gnode.output_keys())
                if gnode.name not in names:
                    names.append(gnode.name)
        return names

    def run(
        self,
        feed: dict[TensorKey, Any],
        wanted: Sequence[Any],
        transform: Callable[[GraphNode, list[Any]], list[Any]] | None = None,
    ) -> list[Any]:
        """Evaluate `wanted` tensors eagerly from the values in `feed`.

        Nodes whose outputs are all fed are skipped, so feeding a tensor in the middle of the
        graph starts the computation there. `transform` may rewrite a node's input values
        before the call (the naive sweep zeroes channels that way).
        """
        values: dict[TensorKey, Any] = dict(feed)
        needed = self._needed_nodes([id(t) for t in wanted], set(values))
        for gnode in self.nodes:
            if id(gnode) not in needed:
                continue
            arg_values = [values[k] for k in gnode.input_keys()]
            if transform is not None:
                arg_values = transform(gnode, arg_values)
            by_key = {k: v for k, v in zip(gnode.input_keys(), arg_values, strict=True)}
            args, kwargs = gnode.node.arguments.fill_in(by_key)
            kwargs = dict(kwargs)
            if _accepts_training(gnode.layer):
                kwargs["training"] = False
            result = gnode.layer(*args, **kwargs)
            flat = keras.tree.flatten(result)
            for key, value in zip(gnode.output_keys(), flat, strict=True):
                values[key] = value
        return [values[id(t)] for t in wanted]

    def _needed_nodes(self, wanted: Iterable[TensorKey], known: set[TensorKey]) -> set[int]:
        needed: set[int] = set()
        stack = [k for k in wanted if k not in known]
        seen: set[TensorKey] = set()
        while stack:
            key = stack.pop()
            if key in seen or key in known:
                continue
            seen.add(key)
            gnode = self.producer.get(key)
            if gnode is None:
                raise PruningError("a tensor the computation needs was neither fed nor produced")
            needed.add(id(gnode))
            stack.extend(gnode.input_keys())
        return needed


def _accepts_training(layer: Any) -> bool:
    return bool(getattr(layer, "_call_has_training_arg", False))


def _topological_nodes(outputs: Sequence[Any]) -> list[GraphNode]:
    order: list[GraphNode] = []
    done: set[int] = set()
    in_progress: set[int] = set()

    def node_of(tensor: Any) -> Any:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise PruningError("the model graph holds a tensor with no recorded producer")
        return history.operation._inbound_nodes[history.node_index]

    def make(node: Any) -> GraphNode:
        return GraphNode(
            layer=node.operation,
            node=node,
            inputs=tuple(node.input_tensors),
            outputs=tuple(node.outputs),
        )

    # Iterative depth-first search: deep residual networks would overflow Python's stack.
    for tensor in outputs:
        stack: list[tuple[Any, bool]] = [(node_of(tensor), False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in done:
                continue
            if node.is_input:
                done.add(id(node))
                continue
            if expanded:
                in_progress.discard(id(node))
                done.add(id(node))
                order.append(make(node))
                continue
            if id(node) in in_progress:
                raise PruningError("the model graph has a cycle")
            in_progress.add(id(node))
            stack.append((node, True))
            for parent in reversed(node.input_tensors):
                stack.append((node_of(parent), False))
    return order


def batched(arrays: Sequence[np.ndarray], batch_size: int) -> Iterable[list[np.ndarray]]:
    """Slices of several aligned arrays, `batch_size` rows at a time."""
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        yield [a[start : start + batch_size] for a in arrays]


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of `model`, nested models opened up, in the order the models list them."""
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        found.extend(leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return found


def inline_nested_models(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """The same computation with every nested Sequential/Functional model spliced in.

    A backbone wrapped as one layer hides its convolutions from the graph walk; inlining shares
    the layer objects (and so the weights) and returns the names of the models it dissolved.
    """
    graph = ModelGraph(model)
    nested = [n for n in graph.nodes if isinstance(n.layer, keras.Model)]
    if not nested:
        return model, []
    new_inputs = [
        keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=f"{model.name}_input_{i}")
        for i, t in enumerate(graph.inputs)
    ]
    values: dict[TensorKey, Any] = {
        id(t): new for t, new in zip(graph.inputs, new_inputs, strict=True)
    }
    inlined: list[str] = []
    _replay(graph, values, inlined)
    outputs = [values[id(t)] for t in graph.outputs]
    flat = keras.Model(new_inputs, outputs, name=model.name)
    names = [layer.name for layer in flat.layers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PruningError(
            f"nested models share layer names ({', '.join(duplicates[:5])}); cannot inline them"
        )
    return flat, inlined


def _replay(graph: ModelGraph, values: dict[TensorKey, Any], inlined: list[str]) -> None:
    for gnode in graph.nodes:
        args, kwargs = gnode.node.arguments.fill_in(values)
        if isinstance(gnode.layer, keras.Model):
            inner = ModelGraph(gnode.layer)
            given = [
                v for v in keras.tree.flatten((args, kwargs)) if isinstance(v, keras.KerasTensor)
            ]
            if len(given) != len(inner.inputs):
                raise PruningError(f"cannot inline nested model {gnode.name!r}")
            for tensor, value in zip(inner.inputs, given, strict=True):
                values[id(tensor)] = value
            _replay(inner, values, inlined)
            results = [values[id(t)] for t in inner.outputs]
            inlined.append(gnode.name)
        else:
            results = keras.tree.flatten(gnode.layer(*args, **kwargs))
        for tensor, value in zip(gnode.outputs, results, strict=True):
            values[id(tensor)] = value


# Layers that may sit between the classifier head and the output without parameters of their own.
_PASS_THROUGH = (
    keras.layers.Activation,
    keras.layers.Softmax,
    keras.layers.Dropout,
    keras.layers.Identity,
)


def classifier_head(model: keras.Model) -> keras.layers.Dense:
    """The Dense layer that produces the model's output, through activations and dropout only."""
    graph = ModelGraph(model)
    if len(graph.outputs) != 1:
        raise PruningError("feature-shift tuning needs a model with exactly one output")
    tensor = graph.outputs[0]
    while True:
        node = graph.producer.get(id(tensor))
        if node is None:
            break
        layer = node.layer
        if isinstance(layer, keras.layers.Dense):
            return layer
        if not isinstance(layer, _PASS_THROUGH) or len(node.inputs) != 1:
            break
        tensor = node.inputs[0]
    raise PruningError(
        "feature-shift tuning re-initializes the classifier, so the model's output must come "
        "from a Dense layer (optionally followed by an activation or dropout); "
        f"{model.name!r} ends otherwise"
    )
