"""From stored values to a ready connector: the one place that knows how a
connection's fields become `ConnectionSettings` and which credentials each
protocol needs."""
from __future__ import annotations

import datetime as dt
from typing import Optional


from connectors import connector_class
from connectors.base import ConnectionSettings, Connector, OAuthSettings, ProxySettings, Progress

DEFAULT_TIMEOUTS = {"connect": 10.0, "read": 60.0}


def settings_from_values(v: dict) -> ConnectionSettings:
    proxy: Optional[ProxySettings] = None
    if v.get("proxy_enabled") and v.get("proxy_host") and v.get("protocol") != "imap":
        proxy = ProxySettings(
            protocol=v.get("proxy_protocol") or "http", host=v["proxy_host"], port=int(v.get("proxy_port") or 0),
            username=v.get("proxy_username") or "", password=v.get("proxy_password") or "",
            certificate_pem=v.get("proxy_cert_pem") or "")
    oauth: Optional[OAuthSettings] = None
    if v.get("protocol") in ("oauth", "graph") or v.get("imap_auth") == "xoauth2":
        oauth = OAuthSettings(
            client_id=v.get("oauth_client_id") or "", tenant_id=v.get("oauth_tenant_id") or "",
            client_auth=v.get("oauth_client_auth") or "secret",
            client_secret=v.get("oauth_client_secret") or "",
            certificate_pem=v.get("oauth_cert_pem") or "", private_key_pem=v.get("oauth_private_key") or "",
            authority_host=v.get("oauth_authority_host") or "https://login.microsoftonline.com",
            graph_endpoint=v.get("graph_endpoint") or "https://graph.microsoft.com",
            token_cache=v.get("oauth_token_cache") or "",
            account_username=v.get("oauth_account_username") or "" if v.get("oauth_access") != "application" else "",
        )
    return ConnectionSettings(
        protocol=v["protocol"], email_address=v.get("email_address") or "", password=v.get("password") or "",
        source_folder=v.get("source_folder") or "", host=v.get("host") or "", port=int(v.get("port") or 0),
        encryption=v.get("encryption") or "ssl", endpoint=v.get("endpoint") or "",
        trusted_cert_pem=v.get("trusted_cert_pem") or "", proxy=proxy, oauth=oauth,
        connect_timeout=float(v.get("connect_timeout") or DEFAULT_TIMEOUTS["connect"]),
        read_timeout=float(v.get("read_timeout") or DEFAULT_TIMEOUTS["read"]),
    )


class Session:
    """A connector plus, for OAuth protocols, the token provider whose
    refreshed cache the caller must store back (encrypted)."""

    def __init__(self, connector: Connector, tokens=None):
        self.connector = connector
        self.tokens = tokens

    def new_token_cache(self) -> Optional[str]:
        if self.tokens is not None and self.tokens.cache_changed:
            return self.tokens.serialized_cache()
        return None

    def token_expires_at(self) -> Optional[dt.datetime]:
        """When the access token used expires (naive UTC), for the connection page."""
        expires_on = self.tokens.token_expires_on if self.tokens is not None else 0
        return epoch_to_utc(expires_on) if expires_on else None


def epoch_to_utc(seconds: float) -> dt.datetime:
    """Epoch seconds as the naive UTC datetime the models store."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def open_session(values: dict, progress: Progress) -> Session:
    """Build (not yet open) the connector for these values."""
    settings = settings_from_values(values)
    cls = connector_class(settings.protocol)
    app_only = values.get("oauth_access") == "application"
    if settings.protocol == "imap":
        if values.get("imap_auth") == "xoauth2":
            from connectors.oauth import TokenProvider, imap_scopes

            tokens = TokenProvider(settings)
            token = tokens.access_token(imap_scopes(settings, app_only))
            return Session(cls(settings, progress, access_token=token.access_token), tokens)
        return Session(cls(settings, progress))
    if settings.protocol == "exchange":
        return Session(cls(settings, progress))
    from connectors.oauth import TokenProvider

    tokens = TokenProvider(settings)
    if settings.protocol == "oauth":
        from connectors.oauth import ews_credentials, ews_scopes

        creds = ews_credentials(tokens, ews_scopes(settings, app_only))
        return Session(cls(settings, progress, credentials=creds, impersonate=app_only), tokens)
    return Session(cls(settings, progress, tokens=tokens, app_only=app_only), tokens)
