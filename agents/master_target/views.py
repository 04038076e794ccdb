"""The master target's point views as NBD exports (OpenView / CloseView).

One read-only NBD server (common/nbd.py, `read_only`, not `listable`)
is started at the first view and serves every open view of every pair, each
under its view id. NBD has no authentication: the server binds `host`
(127.0.0.1 unless configured: a recovery tool or hypervisor on the master
target's host), and a view id is 96 random bits the exports never list, handed
out only to an administrator through the configuration server.
"""

from __future__ import annotations

import secrets
import threading

from siterecovery.agents.master_target import pitview
from siterecovery.agents.master_target.pitview import PointView
from siterecovery.agents.master_target.target import PairTarget
from siterecovery.common import errors
from siterecovery.common.nbd import NbdServer
from siterecovery.common.pb import replication_pb2 as rpb


class ViewExports:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: NbdServer | None = None
        self._lock = threading.Lock()

    def _nbd(self) -> NbdServer:
        with self._lock:
            if self._server is None:
                server = NbdServer(self.host, self.port, read_only=True, listable=False)
                try:
                    server.start()
                except OSError as exc:
                    raise errors.Unavailable(
                        f"the NBD server for point views cannot listen on {self.host}:{self.port}: {exc}",
                        hint="check view_nbd_host and view_nbd_port in the master target's configuration",
                        code="view-listen-failed",
                    ) from exc
                self._server = server
            return self._server

    def open(self, target: PairTarget, point: str) -> rpb.ViewReply:
        server = self._nbd()
        view_id = f"view-{secrets.token_hex(12)}"
        view = pitview.open_view(target, point, view_id)
        view.on_close = lambda closed: server.remove_export(closed.view_id)
        server.add_export(view_id, view)
        if view.closed:  # closed with its pair between the open and the export
            server.remove_export(view_id)
            raise errors.Unavailable(f"pair {target.pair_id} was closed while the view was opened",
                                     hint="open the view again", code="view-closed")
        return reply(view, server.uri(view_id))

    def close(self, target: PairTarget, view_id: str) -> list[str]:
        """Close one view of the pair (or all of them, `view_id` empty); the ids closed."""
        views: list[PointView] = list(target.views.values())
        if view_id:
            views = [v for v in views if v.view_id == view_id]
            if not views:
                raise errors.NotFound(
                    f"pair {target.pair_id} has no open view {view_id!r}",
                    hint="`srctl replication status` lists the open views; views close with their pair and do "
                    "not survive a restart of the master target; an empty view id closes every view of the pair",
                    code="view-not-found",
                )
        for view in views:
            pitview.close_view(target, view)
        return [v.view_id for v in views]

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.stop()


def reply(view: PointView, uri: str) -> rpb.ViewReply:
    settled = view.index_settled
    return rpb.ViewReply(
        view_id=view.view_id, nbd_uri=uri, tag_id=view.tag_id, seq=view.seq, size_bytes=view.size,
        journal_bytes_read=view.indexed_bytes, journal_records=view.indexed_records, open_seconds=view.open_seconds,
        # Exact or nothing: before the index settles (chunk by chunk, at first reads) the map only
        # holds an upper bound of both.
        index_settled=settled, extents=view.extents if settled else 0,
        bytes_from_journal=view.covered_bytes if settled else 0,
    )
