"""What a session does when its backend is lost: one table for PostgreSQL and MySQL.

Rules of this file: the monitor's verdict decides first. A server that ended one session on
purpose (pg_terminate_backend, KILL, idle_session_timeout, wait_timeout) while its instance
stays up in the same role is not a failover: the client gets the server's own error and the
connection closes, as it would directly. Only an instance that is down, fenced or demoted
is failed over, by DESIGN.md's failover semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LossOutcome(Enum):
    PASS_THROUGH = "pass through"  # the server's own error (if any) to the client, then close
    CANNOT_MOVE = "cannot move"  # pinned state cannot be rebuilt elsewhere: FATAL, close
    REATTACH_LATER = "re-attach later"  # idle, nothing lost: the next request finds a backend
    RETRY = "retry"  # a read outside a transaction: run it again on another instance
    FAIL_REQUESTS = "fail requests"  # outside a transaction: 08007 for each answer owed
    FAIL_TRANSACTION = "fail transaction"  # inside one: 08007, then errors until ROLLBACK


@dataclass(frozen=True, slots=True)
class LossFacts:
    pinned: str | None  # why the session cannot move (LISTEN, a temporary table, ...), or None
    in_flight: int  # answers the client still waits for
    in_transaction: bool  # the lost work (or the idle session) was inside a transaction
    retryable: bool  # a single read outside a transaction, nothing of its answer forwarded, kept
    partial: bool = False  # the client is in the middle of a request (more of it is coming)


def on_loss(facts: LossFacts, *, same_role_up: bool) -> LossOutcome:
    """The outcome for a lost backend, given the monitor's verdict on its instance."""
    if same_role_up:
        return LossOutcome.PASS_THROUGH
    if facts.pinned is not None:
        return LossOutcome.CANNOT_MOVE
    if facts.in_flight == 0 and not facts.partial:
        return LossOutcome.FAIL_TRANSACTION if facts.in_transaction else LossOutcome.REATTACH_LATER
    if facts.retryable and facts.in_flight == 1 and not facts.in_transaction and not facts.partial:
        return LossOutcome.RETRY
    return LossOutcome.FAIL_TRANSACTION if facts.in_transaction else LossOutcome.FAIL_REQUESTS


TX_LOST = ("the server connection was lost during the transaction; its outcome is unknown. "
           "Roll back to continue")
STATEMENT_LOST = "the server connection was lost while the statement ran; its outcome is unknown"
