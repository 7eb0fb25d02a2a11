"""Bounce reports built with the stdlib email package, as remote MTAs and feedback loops send
them: RFC 3464 DSNs and RFC 5965 ARF reports, returning an original of ours."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, make_msgid

# What goes over SMTP: CRLF line ends (smtplib sends bytes as they are).
_WIRE = compat32.clone(linesep="\r\n")


def original(campaign: str, contact: str, return_path: str | None = None, domain: str = "acme.example") -> EmailMessage:
    """A campaign mail as services/sender/mime.py writes it (headers only matter here)."""
    mail = EmailMessage()
    if return_path is not None:
        mail["Return-Path"] = f"<{return_path}>"
    mail["From"] = f"news@{domain}"
    mail["To"] = "ann@example.net"
    mail["Subject"] = "Spring news"
    mail["Message-ID"] = f"<{campaign}.{contact}@{domain}>"
    mail["X-Campaign-ID"] = campaign
    mail.set_content("Hello Ann")
    return mail


def _report(report_type: str, sender: str, to: str, subject: str, date: datetime, message_id: str | None,
            text: str) -> MIMEMultipart:
    report = MIMEMultipart("report", report_type=report_type)
    report["From"] = sender
    report["To"] = to
    report["Subject"] = subject
    report["Date"] = format_datetime(date)
    report["Message-ID"] = message_id or make_msgid(domain=sender.partition("@")[2])
    report.attach(MIMEText(text))
    return report


def _block(content_type: str | None = None, **fields: str | None) -> Message:
    """A header block (Foo_Bar= is Foo-Bar:); None values are left out."""
    block = Message()
    if content_type is not None:
        block["Content-Type"] = content_type
    for name, value in fields.items():
        if value is not None:
            block[name.replace("_", "-")] = value
    return block


def _attach_original(report: MIMEMultipart, returned: Message | None, headers_only: bool = False) -> None:
    if returned is None:
        return
    part: Message
    if headers_only:
        part = MIMEBase("text", "rfc822-headers")
        part.set_payload(returned.as_string().split("\n\n", 1)[0] + "\n")
    else:
        part = _block("message/rfc822")
        part.set_payload([returned])
    report.attach(part)


def dsn(*, to: str, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <ann@example.net>: Recipient address rejected",
        returned: Message | None = None, headers_only: bool = False, message_id: str | None = None) -> bytes:
    """A delivery status notification to `to` (the VERP return path) for ann@example.net."""
    report = _report("delivery-status", "MAILER-DAEMON@mx.example.net", to, "Undelivered Mail Returned to Sender",
                     datetime(2026, 3, 1, 9, 30, tzinfo=UTC), message_id,
                     "I'm sorry to have to inform you that your message could not be delivered.")
    status_part = _block("message/delivery-status")
    status_part.set_payload([
        _block(Reporting_MTA="dns; mx.example.net", Arrival_Date="Sun, 1 Mar 2026 09:29:58 +0000"),
        _block(Final_Recipient="rfc822; ann@example.net", Action=action, Status=status,
               Remote_MTA="dns; mail.example.net", Diagnostic_Code=diagnostic),
    ])
    report.attach(status_part)
    _attach_original(report, returned, headers_only)
    return report.as_bytes(policy=_WIRE)


def arf(*, to: str, original_mail_from: str | None = None, feedback_type: str = "abuse",
        returned: Message | None = None, message_id: str | None = None) -> bytes:
    """An RFC 5965 abuse report of a feedback loop, sent to `to`."""
    report = _report("feedback-report", "fbl@isp.example.org", to, "FW: Spring news",
                     datetime(2026, 3, 2, 10, 0, tzinfo=UTC), message_id,
                     "This is an email abuse report for an email message received from IP 192.0.2.1.")
    feedback = _block("message/feedback-report")
    feedback.set_payload([_block(
        Feedback_Type=feedback_type, User_Agent="SomeGenerator/1.0", Version="1",
        Original_Mail_From=f"<{original_mail_from}>" if original_mail_from is not None else None,
        Original_Rcpt_To="<ann@example.net>", Arrival_Date="Mon, 2 Mar 2026 09:55:00 +0000",
    )])
    report.attach(feedback)
    _attach_original(report, returned)
    return report.as_bytes(policy=_WIRE)
