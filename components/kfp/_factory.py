"""Building a KFP component's interface from the step models, so no parameter is written twice.

KFP reads a Lightweight Python Component twice: when compiling, from the function's signature
and docstring (inputs, defaults, the UI's descriptions), and when the task runs, from the
function's *source text*, which it embeds in the container command and executes there. A
signature set only as `__signature__` would compile but not run, so this module writes the
component function's source (signature + Google-style docstring + a one-line body that calls
the real adapter code in components/kfp/_run.py, installed in the image) and executes it.
Hand-written because no library produces such self-contained source: wrapper makers like
makefun generate functions whose bodies call back into objects of the defining process.
"""

from __future__ import annotations

import inspect
import linecache
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kfp import dsl

from imlt.trainer.image import project_image
from imlt.trainer.step_models import Parameter

# What the embedded source can name: KFP prefixes it with these imports in the container too.
_NAMESPACE_SOURCE = "import kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\n"


@dataclass(frozen=True)
class Io:
    """An artifact input/output (or a KFP-only parameter), written as source: `name: annotation = default`."""

    name: str
    annotation: str
    description: str
    default: str | None = None  # source text of the default; None: required
    output: bool = False  # listed under Returns in the docstring


def kfp_input(p: Parameter, *, unset: str = "none", default: Any = ..., description: str | None = None) -> Io:
    """A step or config parameter as a KFP input, with KFP's conventions for "unset".

    kfp.local cannot pass None to an int input, so a nullable int that cannot be 0 is `int = 0`
    (0 means "derive it"); one that can (optim.warmup_epochs) stays Optional[int] = None, which
    kfp.local runs need a value for, like other None defaults; nullable strings are Optional[str] = None,
    and "" is read as unset too (pipelines pass "" for unset strings). `unset="empty"` writes
    the pipeline spelling: "" for strings.
    """
    value = p.default if default is ... else default
    if p.zero_is_unset and value is None:
        annotation, value = "int", 0
    elif p.kind in (str, int, float, bool):
        annotation = p.kind.__name__
        if value is None and p.kind is str and unset == "empty":
            value = ""
        elif (value is None and not p.required) or p.nullable:
            annotation = f"Optional[{annotation}]"
    elif p.kind == list[int]:
        annotation = "List[int]"
    else:
        raise TypeError(f"{p.path}: {p.kind} has no KFP input type")
    return Io(p.name, annotation, description or p.description, None if p.required and default is ... else repr(value))


def _docstring(summary: str, ios: Iterable[Io], returns: dict[str, str]) -> str:
    ios = list(ios)
    lines = [summary, "", "Args:"]
    lines += [f"    {io.name}: {io.description}" for io in ios if not io.output]
    outputs = [f"    {io.name}: {io.description}" for io in ios if io.output]
    outputs += [f"    {name}: {text}" for name, text in returns.items()]
    if outputs:
        lines += ["", "Returns:", *outputs]
    text = "\n".join(lines)
    if '"""' in text or "\\" in text:
        raise ValueError(f"component docstring cannot hold triple quotes or backslashes: {summary!r}")
    return text


def source(name: str, ios: list[Io], summary: str, run: str, returns: dict[str, str] | None = None,
           return_annotation: str | None = None) -> str:
    """The component function's source: required inputs first (Python's rule), then the rest."""
    ordered = [io for io in ios if io.default is None] + [io for io in ios if io.default is not None]
    args = ",\n".join(f"    {io.name}: {io.annotation}" + (f" = {io.default}" if io.default is not None else "")
                      for io in ordered)
    doc = _docstring(summary, ordered, returns or {}).replace("\n", "\n    ").replace("\n    \n", "\n\n")
    arrow = f" -> {return_annotation}" if return_annotation else ""
    return (f"def {name}(\n{args},\n){arrow}:\n"
            f'    """{doc}\n    """\n'
            f"    inputs = dict(locals())  # every input above, by name\n"
            f"    from imlt.components.kfp._run import {run} as run\n"
            f"    return run(**inputs)\n")


def define(name: str, src: str, module: str) -> Any:
    """Execute generated source as a function whose source `inspect.getsource` (and so KFP) can read."""
    filename = f"<{module}.{name}>"
    # linecache entries with mtime None are never evicted by checkcache: inspect finds them
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": module}
    exec(compile(_NAMESPACE_SOURCE, filename + "-imports", "exec", dont_inherit=True), namespace)
    # dont_inherit: this module's `from __future__ import annotations` would turn the annotations into strings
    exec(compile(src, filename, "exec", dont_inherit=True), namespace)
    return namespace[name]


def step_component(name: str, artifacts: list[Io], summary: str, *, step: str | None = None,
                   bound: tuple[str, ...] = (), returns: dict[str, str] | None = None,
                   return_annotation: str | None = None, **component_options: Any) -> Any:
    """A KFP component on the project image from generated source (see the module docstring).

    Its inputs: `artifacts` (and other hand-made inputs), then every field of `step`'s input
    model except those `bound` to artifacts. The body is _run.<name>.
    """
    from imlt.trainer.step_models import model_parameters
    from imlt.trainer.steps import STEPS

    fields = [kfp_input(p) for p in model_parameters(STEPS[step].input_model, bound)] if step else []
    src = source(name, [*artifacts, *fields], summary, name, returns, return_annotation)
    func = define(name, src, f"imlt.components.kfp.{name}")
    return dsl.component(func, base_image=project_image(), install_kfp_package=False, **component_options)


def with_interface(body: Callable[[dict[str, Any]], None], name: str, ios: list[Io], summary: str) -> Callable[..., None]:
    """A pipeline function with a signature and docstring built from `ios`, calling body(inputs).

    Pipelines, unlike components, run only at compile time (KFP calls them with placeholders, by
    position, in signature order), so a `__signature__` suffices and no source is generated.
    """
    namespace: dict[str, Any] = {}
    exec(compile(_NAMESPACE_SOURCE, "<imlt-pipeline-imports>", "exec", dont_inherit=True), namespace)
    ordered = [io for io in ios if io.default is None] + [io for io in ios if io.default is not None]
    signature = inspect.Signature([
        inspect.Parameter(io.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=eval(io.annotation, namespace),
                          default=inspect.Parameter.empty if io.default is None else eval(io.default, namespace))
        for io in ordered
    ])

    def pipeline(*args: Any, **kwargs: Any) -> None:
        body(signature.bind(*args, **kwargs).arguments)

    pipeline.__signature__ = signature  # type: ignore[attr-defined]
    pipeline.__doc__ = _docstring(summary, ordered, {})
    pipeline.__name__ = pipeline.__qualname__ = name
    return pipeline
