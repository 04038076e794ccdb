"""Bulk property reads: ContainerView + PropertyCollector.RetrievePropertiesEx.

Why not pyvmomi's attribute accessors (`vm.config.uuid`)? Each of them is one
round trip per object and property, and the vcsim release we test against
panics on the `Fetch` call behind them. One RetrievePropertiesEx per object
type (continued with ContinueRetrievePropertiesEx for large inventories)
reads every object of that type in a few round trips on a real vCenter too.

Results are plain dicts: {"_ref": managed object, "_id": moid, path: value}.
A property the server does not set is absent from the dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from siterecovery.controller.providers.vsphere.session import Session

PC = vmodl.query.PropertyCollector
PAGE_SIZE = 500


def _rows(content: Any, spec: Any) -> list[dict[str, Any]]:
    pc = content.propertyCollector
    rows: list[dict[str, Any]] = []
    result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions(maxObjects=PAGE_SIZE))
    while result is not None:
        for obj in result.objects or []:
            row: dict[str, Any] = {"_ref": obj.obj, "_id": obj.obj._moId}
            for prop in obj.propSet or []:
                row[prop.name] = prop.val
            rows.append(row)
        token = result.token
        result = pc.ContinueRetrievePropertiesEx(token) if token else None
    return rows


def collect(session: Session, kind: type, paths: Sequence[str], *, root: Any = None) -> list[dict[str, Any]]:
    """Every object of `kind` below `root` (default: the root folder) with the properties `paths`."""

    def run(content: Any) -> list[dict[str, Any]]:
        view = content.viewManager.CreateContainerView(root or content.rootFolder, [kind], True)
        try:
            traversal = PC.TraversalSpec(name="view", type=vim.view.ContainerView, path="view", skip=False)
            spec = PC.FilterSpec(
                objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
                propSet=[PC.PropertySpec(type=kind, pathSet=list(paths))],
            )
            return _rows(content, spec)
        finally:
            view.DestroyView()

    return session.call(f"read {kind.__name__.rsplit('.', 1)[-1]} objects", run)


def read(session: Session, objects: Iterable[Any], paths: Sequence[str]) -> list[dict[str, Any]]:
    """The properties `paths` of the given managed objects (all of one type), in one call."""
    objects = list(objects)
    if not objects:
        return []

    def run(content: Any) -> list[dict[str, Any]]:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=o, skip=False) for o in objects],
            propSet=[PC.PropertySpec(type=type(objects[0]), pathSet=list(paths))],
        )
        return _rows(content, spec)

    return session.call("read properties", run)


def read_one(session: Session, obj: Any, paths: Sequence[str]) -> dict[str, Any]:
    rows = read(session, [obj], paths)
    return rows[0] if rows else {"_ref": obj, "_id": obj._moId}
