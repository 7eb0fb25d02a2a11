"""`python -m services.bounces`: the bounce receiver (SMTP on BOUNCE_SMTP_HOST:PORT for
bounces+*@BOUNCE_DOMAIN) and, with BOUNCE_WEBHOOK_PORT set, the providers' webhooks, until
SIGTERM or SIGINT (exit 0). Settings: `BounceSettings`; no VERP key is exit 2.

The campaign directory (VERP "r" tokens, header attribution) is the campaigns read model in
DATABASE_URL. Soft bounces are recorded but do not suppress here yet: that needs a read model
of each contact's outcomes (see services/bounces/receiver.py).
"""

from __future__ import annotations

import signal
import sys
import threading

import uvicorn

from services.bounces.directory import PostgresCampaigns
from services.bounces.parse import BounceContext
from services.bounces.publisher import BouncePublisher
from services.bounces.receiver import BounceHandler, BounceReceiver
from services.bounces.verp import VerpKeys
from services.bounces.webhooks import WebhookConfig, create_app
from services.common.logs import configure_logging
from services.common.settings import BounceSettings, load_or_exit


def main() -> int:
    log = configure_logging("bounces")
    settings = load_or_exit(BounceSettings, log)
    try:
        keys = VerpKeys.parse(settings.bounce_verp_keys.get_secret_value())
    except ValueError as error:
        log.error("invalid settings", error=f"BOUNCE_VERP_KEYS: {error}")
        return 2
    campaigns = PostgresCampaigns(settings.database_url)
    context = BounceContext(settings.bounce_domain, keys, campaigns, campaigns.tenant_of)
    publisher = BouncePublisher(settings, settings.bounce_kafka_timeout_seconds)
    handler = BounceHandler(context, publisher.publish, trust_headers=settings.bounce_trust_headers,
                            soft_limit=settings.bounce_soft_limit)
    receiver = BounceReceiver(handler, settings.bounce_smtp_host, settings.bounce_smtp_port,
                              on_tick=settings.heartbeat().beat)
    try:
        receiver.start()
    except (OSError, RuntimeError) as error:
        log.error("start failed", error=str(error))
        publisher.close()
        return 1
    log.info("bounce receiver started", host=settings.bounce_smtp_host, port=receiver.port,
             domain=settings.bounce_domain)
    try:
        if settings.bounce_webhook_port:
            if not settings.bounce_sendgrid_public_key:
                log.warning("BOUNCE_SENDGRID_PUBLIC_KEY not set: SendGrid events are taken unsigned")
            config = WebhookConfig(
                context, publisher.publish,
                sns_topic_arns=frozenset(
                    arn.strip() for arn in settings.bounce_sns_topic_arns.split(",") if arn.strip()),
                sendgrid_public_key=settings.bounce_sendgrid_public_key,
                mailgun_signing_key=settings.bounce_mailgun_signing_key.get_secret_value().encode(),
                postmark_credentials=settings.bounce_postmark_credentials.get_secret_value(),
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)  # uvicorn re-raises its stop signal
            # uvicorn handles SIGTERM/SIGINT itself and returns after draining.
            uvicorn.run(create_app(config), host=settings.bounce_webhook_host,
                        port=settings.bounce_webhook_port, log_level="info", log_config=None)
        else:
            stopping = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stopping.set())
            while not stopping.wait(1.0):
                pass
    finally:
        receiver.stop()
        publisher.close()
        log.info("stopped", **dict(handler.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
