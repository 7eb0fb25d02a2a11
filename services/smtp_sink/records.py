"""What the sink remembers about an accepted message, and the JSONL file that holds it.

Guarantees:
- `build_record` does not raise on odd content: undecodable bytes become replacement
  characters and malformed encoded words stay raw, so a malformed message is still recorded.
- `RecordLog.append` keeps the record in memory and, when a path is set, writes it as one JSON
  line and flushes it before returning, so another process that reads the file afterwards sees
  it. It does not fsync: a machine crash may lose the tail, a process crash does not.
- `read_records` returns only complete lines, so a reader racing the writer never sees half a
  record.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy
from email.errors import HeaderParseError
from email.header import Header, decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import IO, Any

Record = dict[str, Any]

# compat32, not policy.default: the modern policy builds rich header objects and costs ~1.3 ms
# per message, which alone would cap the sink below 1000 messages/s; compat32 parses in ~40 us
# and we decode the few things we keep (RFC 2047 words, transfer encodings, charsets) ourselves.
_PARSER = BytesParser(policy=policy.compat32)


def _header_text(value: str | Header) -> str:
    """Unfolded header value with RFC 2047 encoded words ("=?utf-8?q?...?=") decoded."""
    text = str(value)
    if "\n" in text:
        text = " ".join(line.strip() for line in text.splitlines())
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (HeaderParseError, LookupError, UnicodeDecodeError):
        return text  # malformed or unknown charset: the raw value is still informative


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:  # charset name Python does not know
        return payload.decode("utf-8", "replace")


def _bodies(message: Message) -> tuple[str, str | None]:
    """(text body, HTML body or None): the first inline text/plain and text/html parts.
    The text body falls back to the HTML one when there is no plain part."""
    plain: str | None = None
    html: str | None = None
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind == "text/plain" and plain is None:
            plain = _part_text(part)
        elif kind == "text/html" and html is None:
            html = _part_text(part)
    if plain is None:
        return (html or ""), html
    return plain, html


def build_record(mail_from: str | None, rcpt_tos: Sequence[str], content: bytes) -> Record:
    """Record of one message: envelope, Message-ID, Subject, all headers (decoded, in order,
    repeats kept), text body, HTML body (or None) and received_at (UTC, ISO 8601)."""
    # SMTP carries CRLF line ends; the email package and every reader of the record expect
    # Python's "\n", so decoded bodies come out as ordinary text.
    message = _PARSER.parsebytes(content.replace(b"\r\n", b"\n"))
    headers = [[name, _header_text(value)] for name, value in message.items()]
    body, html = _bodies(message)
    message_id = message.get("Message-ID")
    subject = message.get("Subject")
    return {
        "received_at": datetime.now(UTC).isoformat(),
        "mail_from": mail_from or "",
        "rcpt_tos": list(rcpt_tos),
        "message_id": _header_text(message_id).strip() if message_id is not None else None,
        "subject": _header_text(subject) if subject is not None else None,
        "headers": headers,
        "body": body,
        "html": html,
        "size": len(content),
    }


def header(record: Record, name: str) -> str | None:
    """First value of header `name` (case-insensitive) in a record, or None."""
    wanted = name.lower()
    for key, value in record["headers"]:
        if key.lower() == wanted:
            return str(value)
    return None


class RecordLog:
    """Accepted messages, in memory and optionally in an append-only JSONL file.

    Thread-safe: the server thread appends while tests read `snapshot()` / `wait_for()`.
    """

    def __init__(self, path: Path | None, keep_in_memory: bool = True) -> None:
        self.path = path
        self.keep_in_memory = keep_in_memory
        self._count = 0
        self._records: list[Record] = []
        self._cond = threading.Condition()
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append, never truncate: a restarted sink must not erase what was delivered before.
            self._file = path.open("a", encoding="utf-8")

    def append(self, record: Record) -> None:
        # ASCII-escaped JSON: header bytes that are not valid UTF-8 survive as \udcXX escapes
        # instead of making the write fail.
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._cond:
            if self._file is not None:
                self._file.write(line)
                # Flush (not fsync): makes the line visible to readers in other processes now,
                # at the cost of one write syscall per message, which is cheap enough.
                self._file.flush()
            if self.keep_in_memory:
                self._records.append(record)
            self._count += 1
            self._cond.notify_all()

    def snapshot(self) -> list[Record]:
        with self._cond:
            return list(self._records)

    def __len__(self) -> int:
        """Messages accepted since start (or the last clear), kept in memory or not."""
        with self._cond:
            return self._count

    def clear(self) -> None:
        """Forget the in-memory records (the file keeps them)."""
        with self._cond:
            self._records.clear()
            self._count = 0

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least `count` records exist; False if `timeout` seconds pass first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count >= count, timeout)

    def close(self) -> None:
        with self._cond:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None


def read_records(path: Path | str) -> list[Record]:
    """All complete records in a sink's JSONL file ([] if it does not exist yet)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    # A line without its newline is being written right now; it is not a record yet.
    complete, _, _partial = data.rpartition(b"\n")
    return [json.loads(line) for line in complete.split(b"\n") if line.strip()]


def count_records(path: Path | str) -> int:
    """Number of complete records in a sink's JSONL file (0 if it does not exist yet).

    Counts newlines in chunks, so it is cheap enough to poll on files with millions of lines.
    """
    try:
        with Path(path).open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
