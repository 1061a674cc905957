"""Which failures the worker retries, which it isolates, and what of them it may log.

Transient trouble (Redis or broker connection errors, leader moves, timeouts) is retried with
backoff: a batch is never dropped. A record the broker or producer refuses for itself (too large,
invalid) is never retried as it is. Anything else is a bug or a message that trips one: the batch
is retried one message at a time and the culprit is dead-lettered (stream.worker.batch).
"""

from __future__ import annotations

import asyncio
import re


class RecordRejected(Exception):
    """An output record (event, alert, summary) that the producer or broker refused for itself."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions
    from aiokafka.errors import KafkaError

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            KafkaError, ConnectionError, asyncio.TimeoutError)


def _record_errors() -> tuple[type[BaseException], ...]:
    from aiokafka import errors as k

    return (k.MessageSizeTooLargeError, k.RecordTooLargeError, k.RecordListTooLargeError, k.InvalidMessageError,
            k.CorruptRecordException, k.UnsupportedForMessageFormatError, k.InvalidTimestampError)


TRANSIENT = _transient_errors()
RECORD_ERRORS = _record_errors()


def cause(exc: BaseException) -> BaseException:
    """faust wraps the Kafka client's errors (`ProducerSendError(...) from exc`): the cause decides."""
    from faust.exceptions import ProducerSendError

    while isinstance(exc, ProducerSendError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def is_record_error(exc: BaseException) -> bool:
    """The record itself was refused (too large, invalid): retrying it as it is cannot help."""
    return isinstance(cause(exc), RECORD_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying the same work: Redis or broker connection trouble, leader moves, timeouts
    (any Kafka client error except a refused record, wrapped by faust or not)."""
    root = cause(exc)
    return isinstance(root, TRANSIENT) and not isinstance(root, RECORD_ERRORS)


def short_text(exc: BaseException) -> str:
    """The first line of an exception's text, at most 200 characters, with any URL password masked
    (client errors may echo a URL with a password)."""
    return re.sub(r"//[^@/\s]*@", "//***@", str(exc).splitlines()[0] if str(exc) else "")[:200]
