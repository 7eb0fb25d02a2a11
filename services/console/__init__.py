"""The campaign console (server-rendered pages for people); see services/console/routes.py."""

from services.console.routes import console_router

__all__ = ["console_router"]
