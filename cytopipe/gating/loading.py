"""Reading a gating template from a file: the reader is chosen by the file's type.

YAML templates are parsed by :mod:`cytopipe.gating.template`; Gating-ML 2.0 files (``.xml``, plain
or a Cytobank export) and FlowJo workspaces (``.wsp``, or a FlowJo 9 workspace saved as ``.xml``)
by their import modules, imported on first use (lxml). This module sits above all of them, so the
template model and the format readers never import each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from cytopipe.errors import GatingMLError, TemplateError, TransformError
from cytopipe.gating.template import Template, parse_template


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (YAML would silently keep the last)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TemplateError(
                f"key {key!r} appears twice in the same mapping (line {key_node.start_mark.line + 1}); "
                "remove one",
                key=str(key),
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_template(path_or_mapping: str | Path | Mapping) -> Template:
    """Read and validate a gating template (a YAML file, or an already-parsed mapping).

    Gating-ML 2.0 files (``.xml``) and FlowJo 10 workspaces (``.wsp``, the first sample's
    gates) are imported as fixed-gate templates.
    """
    if isinstance(path_or_mapping, Mapping):
        return parse_template(path_or_mapping)
    path = Path(path_or_mapping)
    if not path.is_file():
        raise TemplateError("template file not found", file=path)
    if path.suffix.lower() == ".xml":
        return read_gatingml(path)
    if path.suffix.lower() == ".wsp":
        from cytopipe.gating.flowjo import read_flowjo_workspace

        return read_flowjo_workspace(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except TemplateError as exc:
        raise TemplateError(exc.message, file=path, **exc.context) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TemplateError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=path) from None
    except UnicodeDecodeError:
        raise TemplateError("not a UTF-8 text file", file=path) from None
    if not isinstance(data, Mapping):
        raise TemplateError("a template must be a YAML mapping with a `populations:` list", file=path)
    try:
        template = parse_template(data, base=path.parent)
    except (TemplateError, TransformError) as exc:
        raise type(exc)(
            exc.message, file=path, **{k: v for k, v in exc.context.items() if k != "file"}
        ) from None
    template.source = path
    return template


def read_gatingml(path: str | Path, fcs_file: str | None = None) -> Template:
    """Read a Gating-ML 2.0 file as a fixed-gate template.

    A Cytobank export is read with Cytobank's population names and hierarchy; ``fcs_file`` (a file
    name or path) picks the gates Cytobank tailored to that file (see :mod:`cytopipe.gating.cytobank`).
    """
    from lxml import etree

    path = Path(path)
    try:
        root = etree.parse(str(path)).getroot()
    except (OSError, etree.XMLSyntaxError) as exc:
        raise GatingMLError(f"cannot parse the XML: {exc}", file=path) from None
    from cytopipe.gating.cytobank import is_cytobank, read_cytobank
    from cytopipe.gating.gatingml import _read

    if root.tag == "Workspace":  # a FlowJo workspace saved as .xml (FlowJo 9): say what it is
        from cytopipe.gating.flowjo import read_flowjo_workspace

        return read_flowjo_workspace(path)
    try:
        if is_cytobank(root):
            return read_cytobank(root, path, fcs_file)
        return _read(root, path)
    except TemplateError as exc:
        raise GatingMLError(exc.message, **{**exc.context, "file": path}) from None


# Which FCS values a template's gates are drawn on. Gates imported from Gating-ML 2.0 (plain or a
# Cytobank export) or a FlowJo workspace are defined on the values FlowKit, FlowJo and Cytobank
# gate: the usual FCS preprocessing applied ($PnE log decoding, division by $PnG, $TIMESTEP on
# Time). cytopipe's own YAML templates are drawn on raw values and are gated on them, as always.
PREPROCESS_REASON = (
    "the template's gates were imported from {origin}, which defines them on preprocessed FCS values "
    "($PnE log decoding, $PnG gain, $TIMESTEP), as FlowKit and FlowJo read files"
)


def preprocessing_note(template: Template) -> str | None:
    """Why the files gated with ``template`` are read with the usual FCS preprocessing (None:
    they are gated on their raw values, as a YAML template is)."""
    if not getattr(template, "preprocess", False):
        return None
    suffix = template.source.suffix.lower() if template.source is not None else ""
    origin = "a FlowJo workspace" if suffix == ".wsp" else "Gating-ML"
    return PREPROCESS_REASON.format(origin=origin)


def read_sample(path: str | Path, template: Template, **kwargs):
    """Read an FCS file the way ``template``'s gates expect its values (preprocessed for gates
    imported from Gating-ML or FlowJo, raw for a YAML template). The one rule the gate command
    and the pipeline use (the pipeline reads raw values for event QC, then calls
    :func:`preprocess_for`)."""
    from cytopipe.fcs import read_fcs

    return read_fcs(path, preprocess=bool(getattr(template, "preprocess", False)), **kwargs)


def preprocess_for(sample, template: Template):
    """Preprocess a sample read raw (e.g. after event QC) when ``template``'s gates need it."""
    if getattr(template, "preprocess", False):
        from cytopipe.fcs import preprocess_events

        preprocess_events(sample)
    return sample
