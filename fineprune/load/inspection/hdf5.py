"""An HDF5 file's structure, walked with fixed bounds before Keras or h5py reads any data.

The walk goes group by group with HDF5's low-level calls (h5py's `visititems_links` builds
every full path and slows down with depth: an 8,000-deep chain took it minutes), counts every
link and attribute, never follows a soft or external link, and looks at each dataset's and
attribute's type, shape and storage before anything of it is read. Strings are kept in
buffers of a size fixed beforehand; HDF5 still converts a variable-length list whole, and how
much that takes only the heap objects know, so these reads run where memory is capped
(`bounded`, or a job's process) and an allocation HDF5 cannot make is a refusal.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5i, h5l, h5o, h5t, h5z

from fineprune.errors import InvalidModelError, UnsafeModelError
from fineprune.load.inspection.limits import Limits
from fineprune.text import one_line, quoted
from fineprune.text import readable_bytes as size

# Filters HDF5 applies itself; any other id would make it look for a plugin on disk.
_BUILTIN_FILTERS = frozenset(
    {h5z.FILTER_DEFLATE, h5z.FILTER_SHUFFLE, h5z.FILTER_FLETCHER32, h5z.FILTER_LZF}
)
_NUMERIC_CLASSES = frozenset({h5t.INTEGER, h5t.FLOAT, h5t.ENUM, h5t.BITFIELD})


@dataclass
class Hdf5Facts:
    """What the walk found: every dataset by path (each hard link counted) and its bytes."""

    where: str
    datasets: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    """path -> (shape, declared bytes)."""
    declared_bytes: int = 0
    """All datasets' declared bytes together."""
    links: int = 0
    attributes: int = 0


def open_hdf5(source: Any, where: str) -> h5py.File:
    """h5py.File on a path or file object; HDF5's file locking off (the file is ours)."""
    try:
        return h5py.File(source, "r", locking=False)
    except OSError as exc:
        raise InvalidModelError(
            f"{where} is not a readable HDF5 file (truncated or corrupt?): {one_line(exc)}"
        ) from None


def walk(h5: h5py.File, where: str, limits: Limits) -> Hdf5Facts:
    """Every link, group, dataset and attribute of the file, within `limits`.

    Raises UnsafeModelError for links or storage that reach outside the file, filters HDF5
    would load a plugin for, and anything over a bound; InvalidModelError on corrupt metadata.
    """
    facts = Hdf5Facts(where)
    try:
        _walk(h5.id, facts, limits)
    except (UnsafeModelError, InvalidModelError):
        raise
    except Exception as exc:  # h5py raises many types on corrupt metadata
        raise InvalidModelError(f"{where} is corrupt: {one_line(exc)}") from None
    return facts


def _walk(root: h5py.h5g.GroupID, facts: Hdf5Facts, limits: Limits) -> None:
    where = facts.where
    _check_attributes(root, "/", facts, limits)
    seen_groups = {_address(root)}
    pending: deque[tuple[h5py.h5g.GroupID, str, int]] = deque([(root, "", 0)])
    while pending:
        group, path, depth = pending.popleft()
        for raw_name in _names(group, facts, limits):
            name = raw_name.decode("utf-8", "replace")
            child = f"{path}/{name}" if path else name
            shown = quoted(child)
            link = group.links.get_info(raw_name)
            if link.type == h5l.TYPE_EXTERNAL:
                target = group.links.get_val(raw_name)
                filename = target[0].decode("utf-8", "replace") if target else "?"
                raise UnsafeModelError(
                    f"{where} has an external link {shown} to file {quoted(filename)}; refused"
                )
            if link.type == h5l.TYPE_SOFT:
                target = group.links.get_val(raw_name).decode("utf-8", "replace")
                raise UnsafeModelError(
                    f"{where} has a soft link {shown} -> {quoted(target)}; refused"
                )
            if link.type != h5l.TYPE_HARD:
                raise UnsafeModelError(f"{where} has an unknown kind of link {shown}; refused")
            obj = h5o.open(group, raw_name)
            kind = h5i.get_type(obj)
            _check_attributes(obj, child, facts, limits)
            if kind == h5i.GROUP:
                if depth + 1 > limits.hdf5_depth:
                    raise UnsafeModelError(
                        f"{where} nests groups more than {limits.hdf5_depth} deep (at"
                        f" {quoted(child, 60)}); refused"
                    )
                address = _address(obj)
                if address in seen_groups:
                    raise UnsafeModelError(
                        f"{where} links group {shown} a second time (a loop in the file); refused"
                    )
                seen_groups.add(address)
                pending.append((obj, child, depth + 1))
            elif kind == h5i.DATASET:
                facts.datasets[child] = _check_dataset(obj, child, where, limits)
                facts.declared_bytes += facts.datasets[child][1]
                if facts.declared_bytes > limits.weight_bytes:
                    raise UnsafeModelError(
                        f"{where} declares {size(facts.declared_bytes)} of data, over the weight"
                        f" budget of {size(limits.weight_bytes)}; refused"
                    )
            else:
                raise UnsafeModelError(
                    f"{where} holds {shown}, which is neither a group nor a dataset; refused"
                )


def _names(group: h5py.h5g.GroupID, facts: Hdf5Facts, limits: Limits) -> list[bytes]:
    """A group's link names in one linear pass, stopping at the link bound."""
    names: list[bytes] = []

    def collect(name: bytes) -> int | None:
        names.append(name)
        facts.links += 1
        return 1 if facts.links > limits.hdf5_objects else None  # non-None stops the pass

    group.links.iterate(collect)
    if facts.links > limits.hdf5_objects:
        raise UnsafeModelError(
            f"{facts.where} has more than {limits.hdf5_objects} objects; refused"
        )
    return names


def _address(obj: Any) -> tuple[int, int]:
    info = h5o.get_info(obj)
    return (info.fileno, info.addr)


def _check_dataset(
    dataset: h5py.h5d.DatasetID, path: str, where: str, limits: Limits
) -> tuple[tuple[int, ...], int]:
    """Type, storage and declared size of a dataset, from its metadata only."""
    shown = quoted(path)
    plist = dataset.get_create_plist()
    layout = plist.get_layout()
    if layout == h5d.VIRTUAL:
        raise UnsafeModelError(f"{where} has a virtual dataset {shown}; refused")
    if plist.get_external_count():
        raise UnsafeModelError(f"{where} dataset {shown} keeps its data in external files; refused")
    for index in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(index)
        if code not in _BUILTIN_FILTERS:
            raise UnsafeModelError(
                f"{where} dataset {shown} uses HDF5 filter {code}"
                f" ({quoted(name.decode('utf-8', 'replace'), 40)}), which HDF5 would load from a"
                " plugin; refused"
            )
    type_class = dataset.get_type().get_class()
    if type_class not in _NUMERIC_CLASSES:
        raise UnsafeModelError(
            f"{where} dataset {shown} holds {_type_name(type_class)} values, not numbers; refused"
        )
    shape = tuple(int(d) for d in (dataset.shape or ()))
    declared = math.prod(shape) * int(dataset.get_type().get_size())
    if declared > limits.weight_bytes:
        raise UnsafeModelError(
            f"{where} dataset {shown} declares {size(declared)} of data, over the weight budget"
            f" of {size(limits.weight_bytes)}; refused"
        )
    if layout == h5d.CHUNKED:
        chunk = plist.get_chunk()
        chunk_bytes = math.prod(int(c) for c in chunk) * int(dataset.get_type().get_size())
        if chunk_bytes > max(declared, 1024**2):
            raise UnsafeModelError(
                f"{where} dataset {shown} has chunks of {size(chunk_bytes)}, larger than its data;"
                " refused"
            )
    return shape, declared


def _check_attributes(obj: Any, path: str, facts: Hdf5Facts, limits: Limits) -> None:
    """Count an object's attributes and check each one's type and stored size, reading none."""
    count = h5a.get_num_attrs(obj)
    shown = quoted(path)
    if count > limits.hdf5_object_attributes:
        raise UnsafeModelError(f"{facts.where} object {shown} has {count} attributes; refused")
    facts.attributes += count
    if facts.attributes > limits.hdf5_attributes:
        raise UnsafeModelError(
            f"{facts.where} has more than {limits.hdf5_attributes} attributes; refused"
        )
    for index in range(count):
        attr = h5a.open(obj, index=index)
        _check_attribute(attr, path, facts.where, limits)


def _check_attribute(attr: h5py.h5a.AttrID, path: str, where: str, limits: Limits) -> None:
    name = quoted(attr.name.decode("utf-8", "replace"), 60)
    kind = attr.get_type()
    type_class = kind.get_class()
    elements = math.prod(int(d) for d in (attr.shape or ()))
    if type_class == h5t.STRING:
        if kind.is_variable_str():
            if elements > limits.layers:
                raise UnsafeModelError(
                    f"{where} attribute {name} of {quoted(path)} lists {elements} strings; refused"
                )
            return
    elif type_class not in _NUMERIC_CLASSES:
        raise UnsafeModelError(
            f"{where} attribute {name} of {quoted(path)} holds {_type_name(type_class)} values;"
            " refused"
        )
    stored = elements * int(kind.get_size())
    # A legacy model's config may be a long fixed-size string on the root group.
    cap = limits.config_bytes if path == "/" else limits.attribute_bytes
    if stored > cap:
        raise UnsafeModelError(
            f"{where} attribute {name} of {quoted(path)} takes {size(stored)}; refused"
        )


def read_strings(
    obj: Any, name: str, where: str, *, max_items: int, max_chars: int, scalar: bool = False
) -> list[str] | None:
    """The strings of attribute `name` of `obj`, or None when it has none by that name.

    Shape and type are checked first, then every string is read into a buffer of
    `max_chars + 1` bytes: HDF5 truncates a longer one, which is then refused, so no string
    costs more than the buffer, whatever its heap object holds. An empty numeric array (how
    Keras writes an empty name list) reads as no strings.
    """
    key = name.encode()
    if not h5a.exists(obj, key):
        return None
    attr = h5a.open(obj, key)
    shown = f"{where} attribute {quoted(name)}"
    kind = attr.get_type()
    shape = tuple(int(d) for d in (attr.shape or ()))
    if scalar and shape not in ((), (1,)):
        raise UnsafeModelError(f"{shown} has shape {shape}, not one string; refused")
    elements = math.prod(shape)
    if kind.get_class() != h5t.STRING:
        if elements == 0:
            return []
        raise InvalidModelError(f"{shown} is not text")
    if elements > max_items:
        raise UnsafeModelError(f"{shown} lists {elements} strings, over {max_items}; refused")
    if not kind.is_variable_str() and kind.get_size() > max_chars:
        raise UnsafeModelError(f"{shown} is longer than {size(max_chars)}; refused")
    width = max_chars + 1
    buffer = np.zeros(shape, dtype=f"S{width}")
    try:
        attr.read(buffer, mtype=h5t.py_create(buffer.dtype))
    except OSError as exc:
        if "alloc" in str(exc):
            raise UnsafeModelError(
                f"{shown} would need more memory to read than the check may use (its strings"
                " point at more data than the file holds); refused"
            ) from None
        raise
    out = []
    for raw in buffer.reshape(-1):
        if len(raw) >= width:
            raise UnsafeModelError(f"{shown} holds a string longer than {size(max_chars)}; refused")
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidModelError(f"{shown} is not UTF-8 text") from None
    return out


def legacy_weight_bytes(h5: h5py.File, facts: Hdf5Facts, limits: Limits) -> int:
    """Bytes Keras reads from a legacy file: every weight `weight_names` lists, each time listed.

    Keras reads `np.asarray(group[name])` for each listed name, so a 64 MiB dataset listed 256
    times costs 16 GiB however small the file is.
    """
    group = _child_group(h5, "model_weights", facts.where)
    if group is None:
        return 0
    total = 0
    layer_names = _name_list(group, "layer_names", "model_weights", facts, limits)
    for layer in [*layer_names, "top_level_model_weights"]:
        layer_path = f"model_weights/{layer}"
        layer_group = _child_group(group, layer, facts.where)
        if layer_group is None:
            continue
        for weight in _name_list(layer_group, "weight_names", layer_path, facts, limits):
            path = f"{layer_path}/{weight}"
            parts = path.split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise UnsafeModelError(
                    f"{facts.where} lists weight {quoted(weight)} of {quoted(layer)} by a path"
                    " that is not plain; refused"
                )
            if path not in facts.datasets:
                raise InvalidModelError(
                    f"{facts.where} lists weight {quoted(weight)} of layer {quoted(layer)},"
                    " which is not a dataset of the file"
                )
            total += facts.datasets[path][1]
            if total > limits.weight_bytes:
                raise UnsafeModelError(
                    f"{facts.where} lists {size(total)} of weights to read (weight_names of"
                    f" {quoted(layer)} and the layers before it), over the weight budget of"
                    f" {size(limits.weight_bytes)}; refused"
                )
    return total


def _name_list(
    group: h5py.Group, name: str, path: str, facts: Hdf5Facts, limits: Limits
) -> list[str]:
    """`name`, or its chunks `name0`, `name1`... as Keras writes long lists."""
    where = f"{facts.where} {quoted(path)}"
    bounds = {"max_items": limits.layers, "max_chars": limits.name_chars}
    whole = read_strings(group.id, name, where, **bounds)
    if whole is not None:
        return whole
    found: list[str] = []
    for index in range(limits.hdf5_object_attributes):
        chunk = read_strings(group.id, f"{name}{index}", where, **bounds)
        if chunk is None:
            break
        found.extend(chunk)
        if len(found) > limits.layers:
            raise UnsafeModelError(f"{where} lists more than {limits.layers} names; refused")
    return found


def _child_group(group: h5py.Group, name: str, where: str) -> h5py.Group | None:
    """A hard-linked child group (the walk refused every other kind of link)."""
    obj = group.get(name)
    if obj is None:
        return None
    if not isinstance(obj, h5py.Group):
        raise InvalidModelError(f"{where} has {quoted(name)}, which is not a group")
    return obj


def _type_name(type_class: int) -> str:
    names = {
        h5t.STRING: "string",
        h5t.COMPOUND: "compound",
        h5t.REFERENCE: "reference",
        h5t.VLEN: "variable-length",
        h5t.ARRAY: "array",
        h5t.OPAQUE: "opaque",
        h5t.TIME: "time",
    }
    return names.get(type_class, f"class-{type_class}")
