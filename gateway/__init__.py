"""In-client single sign-on gateway for Lark/Feishu, DingTalk and Tencent Meeting web apps.

The public surface::

    from gateway import AuthGateway, load_config
    app = AuthGateway(my_asgi_app, load_config("gateway.yaml"))

Plugin authors subclass ``Provider`` (see ``gateway.providers``) and raise the errors below.
An upstream verifies the identity the gateway sends with ``gateway.verify`` (``IdentityVerifier``,
``RequireIdentity``: docs/upstream.md).
"""

from gateway import verify
from gateway.config import ConfigFileError, GatewayConfig, load_config
from gateway.errors import (
    ConfigError,
    GatewayError,
    LoginDenied,
    LoginPending,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
    StoreUnavailable,
)
from gateway.identity import Identity
from gateway.middleware import AuthGateway
from gateway.providers import (
    CallbackResult,
    Grant,
    LoginContext,
    Provider,
    ProviderContext,
    ProviderSettings,
    TokenSet,
    UserIdentity,
)
from gateway.stores import Store
from gateway.verify import IdentityVerifier, RequireIdentity, VerificationError

__version__ = "0.1.0"

__all__ = [
    "AuthGateway",
    "CallbackResult",
    "ConfigError",
    "ConfigFileError",
    "GatewayConfig",
    "GatewayError",
    "Grant",
    "Identity",
    "IdentityVerifier",
    "LoginContext",
    "LoginDenied",
    "LoginPending",
    "Provider",
    "ProviderContext",
    "ProviderError",
    "ProviderMisconfigured",
    "ProviderSettings",
    "ProviderUnavailable",
    "ReauthRequired",
    "RequireIdentity",
    "Store",
    "StoreUnavailable",
    "TokenSet",
    "UserIdentity",
    "VerificationError",
    "load_config",
    "verify",
]
