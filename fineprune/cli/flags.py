"""Command-line flags made from `SanitizeOptions`: each option is declared once, in the schema.

A flag is `--name-with-dashes`; its help is the field's description; fields marked advanced
go to their own help panel. Values reach pydantic as typed, so the CLI validates exactly as
the API does; `--rescale` also takes a fraction such as 1/255.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from fractions import Fraction
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from fineprune.cli.output import fail_options
from schemas.options import SanitizeOptions

BASIC_PANEL = "Options"
ADVANCED_PANEL = "Advanced options"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _choices(annotation: Any) -> list[str] | None:
    """The values of a Literal field (or of the Literal side of an `X | None`), if it is one."""
    if typing.get_origin(annotation) is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    return None


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    choices = _choices(field.annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    default = "none" if field.default is None else field.default
    option = typer.Option(
        flag_name(name),
        help=escape(f"{field.description} [default: {default}]"),
        metavar=None if choices else str(extra.get("metavar", "VALUE")),
        show_default=False,
        rich_help_panel=ADVANCED_PANEL if extra.get("advanced") else BASIC_PANEL,
    )
    kind = Literal[tuple(choices)] if choices else str  # type: ignore[valid-type]
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[kind | None, option],
    )


def with_option_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with one flag per sanitize option added to its signature; the options arrive
    as one `options` dict of the flags that were given (pass it to `build_options`)."""
    own = inspect.signature(command)
    fields = SanitizeOptions.model_fields
    generated = [_parameter(name, field) for name, field in fields.items()]

    def wrapper(**values: Any) -> Any:
        given = {name: values.pop(name) for name in fields if values.get(name) is not None}
        for name in fields:
            values.pop(name, None)
        return command(options=given, **values)

    hints = typing.get_type_hints(command, include_extras=True)
    kept = [
        p.replace(annotation=hints[p.name]) for p in own.parameters.values() if p.name != "options"
    ]
    wrapper.__signature__ = own.replace(parameters=[*kept, *generated])  # type: ignore[attr-defined]
    wrapper.__doc__ = command.__doc__
    wrapper.__name__ = command.__name__
    wrapper.__annotations__ = {
        p.name: p.annotation for p in wrapper.__signature__.parameters.values()
    }
    return wrapper


def build_options(given: dict[str, str] | None) -> SanitizeOptions:
    """The flags' values validated as the API validates its `options` object; an invalid
    value ends the command with one line and exit code 2."""
    try:
        return _options(given or {})
    except ValidationError as exc:
        fail_options(exc)


def _options(given: dict[str, str]) -> SanitizeOptions:
    values: dict[str, Any] = dict(given)
    if "rescale" in values:
        values["rescale"] = parse_fraction(values["rescale"])
    for name, value in list(values.items()):
        if value in ("none", "None") and SanitizeOptions.model_fields[name].default is None:
            values[name] = None
    return SanitizeOptions(**values)


def parse_fraction(value: str) -> float:
    try:
        return float(Fraction(value))
    except (ValueError, ZeroDivisionError) as exc:
        raise typer.BadParameter(
            f"{value!r} is not a number or fraction like 1/255", param_hint="--rescale"
        ) from exc
