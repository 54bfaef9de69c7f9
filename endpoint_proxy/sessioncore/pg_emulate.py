"""PostgreSQL answers a session gives by itself while it has no backend to answer.

Two modes, as a server would behave:
- ``failed_tx``: the transaction was lost (08007). Every statement gets an error until the
  client ends the transaction; ROLLBACK (or COMMIT/END after the error was reported, which
  PostgreSQL also turns into a rollback) answers ROLLBACK and the session is whole again.
- ``error``: one request failed (no writer in time, the server refused a re-attach, ...).
  Its first message gets the error; the rest of it is skipped up to its Sync (extended
  protocol), which answers ReadyForQuery — as a server skips after an error.

Rules of this file: pure, fed (type, payload) messages; returns bytes for the client.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.pg import messages as m
from ..routing.session_state import ends_transaction, is_rollback

_Q, _P, _S, _F, _X = (ord(c) for c in "QPSFX")
_COPY = frozenset(ord(c) for c in "dcf")  # CopyData, CopyDone, CopyFail: skipped silently
_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"


def query_text(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


def parse_query(payload: bytes) -> str:
    """The query of a Parse message's payload (statement name, NUL, query, NUL, ...)."""
    _name, _, rest = payload.partition(b"\0")
    return rest[: rest.find(b"\0")].decode("utf-8", "surrogateescape")


@dataclass
class Emulation:
    kind: str  # "failed_tx" or "error"
    sqlstate: str
    message: str
    reported: bool = False  # failed_tx: the 08007 itself was sent; later statements get 25P02
    skipping: bool = False  # an error was sent for this request; skip to its Sync

    @property
    def status(self) -> str:
        return "E" if self.kind == "failed_tx" else "I"

    def _error(self) -> bytes:
        if self.kind == "failed_tx" and self.reported:
            return m.error_response("ERROR", "25P02", _ABORTED)
        self.reported = True
        return m.error_response("ERROR", self.sqlstate, self.message)

    def answer(self, type_: int, payload: bytes) -> tuple[bytes, bool, bool]:
        """Answer one client message. Returns (bytes for the client, whether the mode is over,
        whether this very message must still go to a backend)."""
        if type_ in _COPY:
            return b"", False, False
        if self.kind == "failed_tx":
            if type_ == _Q:
                sql = query_text(payload)
                if is_rollback(sql) or (self.reported and ends_transaction(sql)):
                    return m.CommandComplete("ROLLBACK").encode() + m.ReadyForQuery("I").encode(), True, False
            elif type_ == _P and not self.skipping and is_rollback(parse_query(payload)):
                # An extended-protocol ROLLBACK: a fresh backend runs it (outside any
                # transaction it only warns) and the session is whole again.
                return b"", True, True
        if type_ in (_Q, _F):
            out = self._error() + m.ReadyForQuery(self.status).encode()
            self.skipping = False
            return out, self.kind == "error", False
        if type_ == _S:
            out = (b"" if self.skipping else self._error()) + m.ReadyForQuery(self.status).encode()
            self.skipping = False
            return out, self.kind == "error", False
        if type_ == _X:
            return b"", True, True
        if self.skipping:
            return b"", False, False
        self.skipping = True
        return self._error(), False, False
