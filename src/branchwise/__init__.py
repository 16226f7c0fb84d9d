"""branchwise: a self-hosted OpenAI Responses + Conversations server where a conversation is a
tree, not a locked list."""

from branchwise.settings import Settings

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"


def create_app(settings: Settings | None = None):
    """The ASGI application (see `branchwise.app`)."""
    from branchwise.app import create_app as _create

    return _create(settings)
