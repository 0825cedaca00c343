"""The dask.distributed classes of the local clusters piscis starts (``--workers``):
a scheduler and workers that open no HTTP port.

dask's scheduler starts an HTTP server even with ``dashboard_address=None`` (on port
8787, or another with a ``UserWarning: Port 8787 is already in use``), and each worker
one on a random port. piscis needs only their TCP comms, so these classes keep the
routes (some code looks them up) and never listen. A module of its own: it imports
distributed, and the worker processes import the worker class by name.
"""

from __future__ import annotations

from distributed import LocalCluster, Scheduler, Worker
from distributed.http.routing import RoutingApplication


class QuietScheduler(Scheduler):
    """A scheduler without an HTTP server (no dashboard, no port beyond its own)."""

    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        self.http_application = RoutingApplication(routes)


class QuietWorker(Worker):
    """A worker without an HTTP server."""

    def start_http_server(self, routes, dashboard_address, default_port=0, ssl_options=None):
        self.http_application = RoutingApplication(routes)


class QuietCluster(LocalCluster):
    """A LocalCluster whose scheduler is a :class:`QuietScheduler` (give its workers
    :class:`QuietWorker` through ``worker_class``)."""

    async def _start(self):
        self.scheduler_spec = {**self.scheduler_spec, "cls": QuietScheduler}
        await super()._start()
