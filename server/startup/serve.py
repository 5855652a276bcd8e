"""Run the app under uvicorn with a graceful stop.

First SIGTERM/SIGINT: stop taking requests (503), let running ones finish for up to
`shutdown_timeout_s`, then end whatever is left and exit 0. A second signal exits at once.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time

import uvicorn

from server.api.app import create_app
from server.settings import Settings
from server.api.state import ServerState
from server.startup.bootstrap import create_state
from server.startup.tracing import configure_tracing

log = logging.getLogger("loraplex.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.fatal: BaseException | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining or not self.state.ready:
            return super().handle_exit(sig, frame)
        log.info("signal %s: draining (up to %.0fs) before exit", sig, self.state.settings.shutdown_timeout_s)
        self.state.draining = True
        threading.Thread(target=self._drain_then_exit, name="loraplex-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        if self.state.jobs is not None:  # a training run gives its cores back to the requests being drained
            self.state.jobs.stop()  # it resumes from its last checkpoint at the next start
        deadline = time.monotonic() + self.state.settings.shutdown_timeout_s
        while not self.state.engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.state.engine.stop(timeout=10)  # ends anything still running with an error
        self.should_exit = True

    def engine_failed(self, exc: BaseException) -> None:
        self.fatal = exc
        self.should_exit = True


def _return_free_memory() -> None:
    """glibc keeps the heap that startup's garbage freed for later mallocs; a server's resident memory is
    what operators size machines by, so it goes back to the system (elsewhere: nothing to do)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _collect_once_loaded(state: ServerState, stopping: threading.Event) -> None:
    """The garbage collector back on (the command line starts with it off) once the model and the router's
    index are loaded: what startup left as garbage is collected once, and what it keeps is frozen (moved
    out of the generations a collection scans), so later collections look only at what requests make.
    Nothing, if the server is stopping first (`serve` puts the collector back as it was, see there)."""
    engine = state.engine
    while not engine.ready.wait(0.2) and engine.load_error is None and not stopping.is_set():
        pass
    while state.router_thread is not None and state.router_thread.is_alive() and not stopping.is_set():
        state.router_thread.join(0.2)
    if stopping.is_set():
        return
    gc.collect()
    gc.freeze()
    gc.enable()
    _return_free_memory()
    log.info("loaded: %d objects frozen out of garbage collection", gc.get_freeze_count())


def _collector_as_before(collecting: threading.Thread | None, stopping: threading.Event) -> None:
    """At exit, the collector as Python runs it without us: on, nothing frozen, the garbage collected while
    every module is still there. Left off or frozen, cycles are torn down during the interpreter's
    finalization, when a library's native threads may outlive the Python objects that stop them (the
    process then aborts: "terminate called without an active exception")."""
    stopping.set()
    if collecting is not None:
        collecting.join()
    gc.unfreeze()
    gc.enable()
    gc.collect()


def serve(settings: Settings) -> int:
    """Blocks until the server stops; returns the process exit code."""
    tracing = configure_tracing()  # before the app: its spans go to the exporter from the first request
    state = create_state(settings)
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=5,
        access_log=False,
        # one HTTP stack whatever else is installed: uvicorn would switch to uvloop and httptools when
        # present (the ray extra brings both), and the suite's edge behaviour is tested on these two
        loop="asyncio",
        http="h11",
    )
    server = _DrainingServer(config, state)
    state.engine.start(on_fatal=server.engine_failed)
    stopping, collecting = threading.Event(), None
    if not gc.isenabled():
        collecting = threading.Thread(target=_collect_once_loaded, args=(state, stopping), name="loraplex-gc",
                                      daemon=True)
        collecting.start()
    server.run()
    if state.jobs is not None:
        state.jobs.stop()  # a running job's worker is killed; the job resumes from its checkpoint at next start
    state.engine.stop(timeout=10)
    if state.tenants is not None:
        state.tenants.close()  # the usage counted since the last flush is written
    if tracing is not None:
        tracing.shutdown()  # the spans still batched are sent
    if state.router_thread is not None:
        state.router_thread.join(timeout=30)  # a few seconds at most: encoders loading, experts indexing
    _collector_as_before(collecting, stopping)
    if server.fatal is not None:
        log.error("stopped: %s", server.fatal)
        return 1
    return 0
