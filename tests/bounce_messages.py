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


def dsn(*, to: str, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <ann@example.net>: Recipient address rejected",
        returned: Message | None = None, headers_only: bool = False, message_id: str | None = None) -> bytes:
    """A delivery status notification to `to` (the VERP return path) for ann@example.net."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = "MAILER-DAEMON@mx.example.net"
    report["To"] = to
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(datetime(2026, 3, 1, 9, 30, tzinfo=UTC))
    report["Message-ID"] = message_id or make_msgid(domain="mx.example.net")
    report.attach(MIMEText("I'm sorry to have to inform you that your message could not be delivered."))
    status_part = Message()
    status_part["Content-Type"] = "message/delivery-status"
    per_message = Message()
    per_message["Reporting-MTA"] = "dns; mx.example.net"
    per_message["Arrival-Date"] = "Sun, 1 Mar 2026 09:29:58 +0000"
    per_recipient = Message()
    per_recipient["Final-Recipient"] = "rfc822; ann@example.net"
    per_recipient["Action"] = action
    per_recipient["Status"] = status
    per_recipient["Remote-MTA"] = "dns; mail.example.net"
    per_recipient["Diagnostic-Code"] = diagnostic
    status_part.set_payload([per_message, per_recipient])
    report.attach(status_part)
    if returned is not None:
        if headers_only:
            part = MIMEBase("text", "rfc822-headers")
            part.set_payload(returned.as_string().split("\n\n", 1)[0] + "\n")
            report.attach(part)
        else:
            wrapper = Message()
            wrapper["Content-Type"] = "message/rfc822"
            wrapper.set_payload([returned])
            report.attach(wrapper)
    return report.as_bytes(policy=_WIRE)


def arf(*, to: str, original_mail_from: str | None = None, feedback_type: str = "abuse",
        returned: Message | None = None, message_id: str | None = None) -> bytes:
    """An RFC 5965 abuse report of a feedback loop, sent to `to`."""
    report = MIMEMultipart("report", report_type="feedback-report")
    report["From"] = "fbl@isp.example.org"
    report["To"] = to
    report["Subject"] = "FW: Spring news"
    report["Date"] = format_datetime(datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    report["Message-ID"] = message_id or make_msgid(domain="isp.example.org")
    report.attach(MIMEText("This is an email abuse report for an email message received from IP 192.0.2.1."))
    feedback = Message()
    feedback["Content-Type"] = "message/feedback-report"
    fields = Message()
    fields["Feedback-Type"] = feedback_type
    fields["User-Agent"] = "SomeGenerator/1.0"
    fields["Version"] = "1"
    if original_mail_from is not None:
        fields["Original-Mail-From"] = f"<{original_mail_from}>"
    fields["Original-Rcpt-To"] = "<ann@example.net>"
    fields["Arrival-Date"] = "Mon, 2 Mar 2026 09:55:00 +0000"
    feedback.set_payload([fields])
    report.attach(feedback)
    if returned is not None:
        wrapper = Message()
        wrapper["Content-Type"] = "message/rfc822"
        wrapper.set_payload([returned])
        report.attach(wrapper)
    return report.as_bytes(policy=_WIRE)
