"""How the tabs' handlers meet Gradio: component values go in by name, a handler's named results come out to the
components of those names, and a UserError shows as one line.

A handler is a plain function `handler(ctx, values) -> dict`: `values` maps input names to what the page holds, the
result maps output names to what the page is to show. An output it leaves out stays as it is; `info` and `warnings`
in the result are shown as notices, not put in a component.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from sdlora.errors import UserError


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # a Choices value: the shown value stays as it is


@dataclass(frozen=True)
class Choices:
    """A new list of choices for a dropdown or radio, and the one it then shows (KEEP: the one it shows now)."""

    choices: list
    value: Any = KEEP


Handler = Callable[[Any, dict], dict]
# output name -> its component, or several components that all show that value
Outputs = dict[str, "gr.components.Component | tuple"]


def call(ctx, handler: Handler, values: dict, outputs: Outputs | None):
    """Run `handler(ctx, values)` for Gradio: its result in the order of `outputs` (the lone value for one output;
    gr.skip() for a name it left out), its notices shown; a UserError becomes a gr.Error of one line."""
    try:
        result = handler(ctx, values) or {}
    except UserError as e:
        raise gr.Error(str(e)) from None
    if result.get("info"):
        gr.Info(result["info"])
    for warning in result.get("warnings", ()):
        gr.Warning(warning)
    shown = [_shown(result[name]) if name in result else gr.skip()
             for name, components in (outputs or {}).items() for _ in _each(components)]
    return shown[0] if len(shown) == 1 else shown or None


def on(trigger, ctx, handler: Handler, inputs: dict | None = None, outputs: Outputs | None = None, *,
       as_set: bool = False, optional: tuple = (), **kw):
    """Connect `handler` to `trigger` (a component's event method, such as `button.click`, or a dependency's `.then`):
    `inputs` names the components whose values it gets, `outputs` those its result sets. The input names are also
    the parameter names of the page's API; `optional`: the last inputs, which an API call may leave out. `as_set`:
    Gradio gets the inputs as a set (its API then takes them by label, in no fixed order). Other keywords go to
    Gradio. Returns the event, for `.then`."""
    inputs = inputs or {}
    names = list(inputs)
    if as_set:
        name_of = {component: name for name, component in inputs.items()}

        def fn(values):
            return call(ctx, handler, {name_of[c]: v for c, v in values.items()}, outputs)
        gradio_inputs = set(inputs.values())
    else:
        def fn(*args):
            return call(ctx, handler, dict(zip(names, args)), outputs)
        # Gradio reads the API's parameter names, and which ones may be left out, from the function's signature
        fn.__signature__ = inspect.Signature([
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=None if name in optional else inspect.Parameter.empty) for name in names])
        gradio_inputs = list(inputs.values())
    fn.__name__, fn.__doc__ = handler.__name__, handler.__doc__  # the API's description
    return trigger(fn, gradio_inputs, components(outputs), **kw)


def components(outputs: Outputs | None) -> list:
    """The components of `outputs`, in order, as Gradio takes them."""
    return [c for components in (outputs or {}).values() for c in _each(components)]


def _each(components) -> tuple:
    return components if isinstance(components, tuple) else (components,)


def _shown(value):
    if isinstance(value, Choices):
        return gr.update(choices=value.choices) if value.value is KEEP else \
            gr.update(choices=value.choices, value=value.value)
    return value
