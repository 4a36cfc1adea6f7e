"""Office 365 tokens (connectors/oauth.py) against the local identity platform."""
from __future__ import annotations

import dataclasses
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from connectors.base import ConnectionSettings, OAuthSettings
from connectors.errors import AUTH_CODES, ConnectorError
from connectors.oauth import (
    EWS_APP_SCOPES, EWS_DELEGATED_SCOPES, IMAP_SCOPES, ClientCertificate, TokenProvider, authority_for,
    diagnose_aad_error, ews_credentials, ews_scopes, graph_app_scopes, graph_delegated_scopes, graph_scopes,
    imap_scopes, load_client_certificate,
)
from tests.support.certs import free_port, make_cert
from tests.support.identity_server import AuthorizePageError

REDIRECT = "https://intake.example/email-oauth"
GRAPH = "https://graph.microsoft.com"


# -- helpers -------------------------------------------------------------------

def settings_for(idp, app=None, *, tenant=None, secret=None, cert: ClientCertificate | None = None,
                 account="", cache="", trusted=True, email="alice@intake-test.onmicrosoft.com",
                 authority_host=None, client_id=None) -> ConnectionSettings:
    oauth = OAuthSettings(
        client_id=client_id or app.client_id,
        tenant_id=idp.tenant_id if tenant is None else tenant,
        client_auth="certificate" if cert else "secret",
        client_secret=(app.secret if app else "") if secret is None else secret,
        certificate_pem=cert.cert_pem if cert else "", private_key_pem=cert.private_key_pem if cert else "",
        authority_host=authority_host or idp.authority_host, token_cache=cache, account_username=account)
    return ConnectionSettings("oauth", email_address=email, oauth=oauth,
                              trusted_cert_pem=idp.cert.cert_pem.decode() if trusted else "")


def grant(idp, settings, username, scopes=EWS_DELEGATED_SCOPES) -> tuple[TokenProvider, ConnectionSettings]:
    """Grant Access without a browser; returns the provider and the settings
    as the app would store them (account + serialized cache)."""
    provider = TokenProvider(settings)
    flow = provider.begin_grant(REDIRECT, scopes)
    provider.complete_grant(flow, idp.sign_in(flow["auth_uri"], username))
    stored = dataclasses.replace(settings.oauth, account_username=provider.account_username,
                                 token_cache=provider.serialized_cache())
    return provider, dataclasses.replace(settings, oauth=stored)


def diagnosis_of(fn, *args, **kwargs):
    with pytest.raises(ConnectorError) as info:
        fn(*args, **kwargs)
    return info.value.diagnosis


def client_cert(tmp_path, name="client", **kw):
    pair = make_cert(tmp_path, name, hostnames=("intake-client",), **kw)
    return pair, load_client_certificate(pair.cert_pem + pair.key_pem)


@pytest.fixture
def entra_app(identity_server):
    """An Entra app registration (not the Flask `app` fixture)."""
    return identity_server.register_app(redirect_uris=[REDIRECT])


@pytest.fixture
def alice(identity_server):
    return identity_server.add_account("alice@intake-test.onmicrosoft.com", "Alice Example")


# -- authority and scopes ------------------------------------------------------

def test_authority_is_host_plus_tenant_and_blank_tenant_means_organizations():
    assert authority_for(OAuthSettings("id", tenant_id="contoso.onmicrosoft.com")) == \
        "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    assert authority_for(OAuthSettings("id", tenant_id=" ")) == "https://login.microsoftonline.com/organizations"
    assert authority_for(OAuthSettings("id", tenant_id="t", authority_host="https://login.microsoftonline.us/")) == \
        "https://login.microsoftonline.us/t"


def test_scopes_follow_protocol_access_mode_and_cloud():
    delegated = ConnectionSettings("graph", email_address="alice@x.com", oauth=OAuthSettings(
        "id", graph_endpoint="https://graph.microsoft.us", account_username="alice@x.com"))
    shared = dataclasses.replace(delegated, email_address="alice@x.com\\phish@x.com")
    app_only = dataclasses.replace(delegated, oauth=OAuthSettings("id", graph_endpoint="https://graph.microsoft.us/"))
    assert graph_scopes(delegated) == ("https://graph.microsoft.us/Mail.ReadWrite",)
    assert graph_scopes(shared) == ("https://graph.microsoft.us/Mail.ReadWrite.Shared",)
    assert graph_scopes(app_only) == ("https://graph.microsoft.us/.default",)
    assert graph_delegated_scopes(GRAPH, shared=True) == (f"{GRAPH}/Mail.ReadWrite.Shared",)
    assert graph_delegated_scopes(shared) == graph_scopes(shared)  # given settings: decided like graph_scopes
    assert graph_app_scopes(GRAPH + "/") == (f"{GRAPH}/.default",)
    assert ews_scopes(delegated) == EWS_DELEGATED_SCOPES == ("https://outlook.office365.com/EWS.AccessAsUser.All",)
    assert ews_scopes(app_only) == EWS_APP_SCOPES == ("https://outlook.office365.com/.default",)
    assert imap_scopes(delegated) == IMAP_SCOPES == ("https://outlook.office.com/IMAP.AccessAsUser.All",)


# -- app-only --------------------------------------------------------------------

def test_client_secret_gets_an_app_only_token_from_the_cache_afterwards(identity_server, entra_app):
    provider = TokenProvider(settings_for(identity_server, entra_app))
    token = provider.access_token(graph_app_scopes(GRAPH))
    claims = identity_server.validate(token.access_token, GRAPH)
    assert claims["appid"] == entra_app.client_id and "Mail.ReadWrite" in claims["roles"]
    assert token.expires_on > time.time() + 3000
    assert provider.access_token(graph_app_scopes(GRAPH)).access_token == token.access_token
    assert [r["grant_type"] for r in identity_server.token_requests] == ["client_credentials"]
    assert token.access_token not in repr(token)


def test_certificate_client_authentication_with_pem(identity_server, tmp_path):
    pair, cert = client_cert(tmp_path)
    app = identity_server.register_app(certificate_pem=pair.cert_pem)
    token = TokenProvider(settings_for(identity_server, app, cert=cert)).access_token(EWS_APP_SCOPES)
    assert identity_server.validate(token.access_token, "https://outlook.office365.com")["roles"]
    assert identity_server.token_requests[-1]["client_auth"] == "private_key_jwt"


def test_certificate_client_authentication_with_pfx(identity_server, tmp_path):
    pair, _ = client_cert(tmp_path)
    key = serialization.load_pem_private_key(pair.key_pem, None)
    pfx = pkcs12.serialize_key_and_certificates(b"intake", key, pair.cert, None,
                                                serialization.BestAvailableEncryption(b"correct horse"))
    cert = load_client_certificate(pfx, None, "correct horse")
    app = identity_server.register_app(certificate_pem=pair.cert_pem)
    token = TokenProvider(settings_for(identity_server, app, cert=cert)).access_token(graph_app_scopes(GRAPH))
    assert identity_server.validate(token.access_token, GRAPH)
    assert identity_server.token_requests[-1]["client_auth"] == "private_key_jwt"


def test_unregistered_certificate_is_named_by_its_thumbprint(identity_server, tmp_path):
    registered, _ = client_cert(tmp_path, "registered")
    _, other = client_cert(tmp_path, "other")
    app = identity_server.register_app(certificate_pem=registered.cert_pem)
    d = diagnosis_of(TokenProvider(settings_for(identity_server, app, cert=other)).access_token, EWS_APP_SCOPES)
    assert (d.code, d.field, d.extra["aadsts"]) == ("oauth_certificate_not_registered", "oauth_certificate", 700027)
    assert other.sha1_thumbprint in d.message


def test_app_only_access_needs_a_tenant(identity_server, entra_app):
    d = diagnosis_of(TokenProvider(settings_for(identity_server, entra_app, tenant="")).access_token, EWS_APP_SCOPES)
    assert (d.code, d.field) == ("oauth_tenant_required", "oauth_tenant_id")


# -- client certificates ------------------------------------------------------------

def test_client_certificate_loads_from_pem_in_two_files_and_der(tmp_path):
    pair, one_file = client_cert(tmp_path)
    two_files = load_client_certificate(pair.cert_pem, pair.key_pem)
    der = load_client_certificate(pair.der, pair.key_pem)
    assert one_file == two_files == der
    assert one_file.sha256_thumbprint == pair.sha256_fingerprint.replace(":", "")
    assert len(one_file.sha1_thumbprint) == 40 and one_file.sha1_thumbprint.isupper()
    assert one_file.not_after == pair.cert.not_valid_after_utc and one_file.not_after.tzinfo is not None
    assert one_file.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert one_file.private_key_pem not in repr(one_file)


def test_client_certificate_chain_picks_the_certificate_of_the_key(tmp_path):
    ca = make_cert(tmp_path, "ca", is_ca=True)
    leaf = make_cert(tmp_path, "leaf", issuer=ca)
    cert = load_client_certificate(ca.cert_pem + leaf.cert_pem + leaf.key_pem)
    assert cert.cert_pem.encode().strip() == leaf.cert_pem.strip()


@pytest.fixture(scope="module")
def client_pairs(tmp_path_factory):
    """Key generation is the slow part: make these once."""
    d = tmp_path_factory.mktemp("client-certs")
    return (make_cert(d, "c", hostnames=("intake-client",)), make_cert(d, "o", hostnames=("intake-client",)),
            make_cert(d, "old", hostnames=("intake-client",), expired=True))


def _encrypted_pem_key(pair, passphrase: bytes) -> bytes:
    key = serialization.load_pem_private_key(pair.key_pem, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase))


@pytest.mark.parametrize("case, expected", [
    ("pfx_wrong_passphrase", "passphrase is wrong"),
    ("pfx_missing_passphrase", "protected by a passphrase"),
    ("pem_wrong_passphrase", "passphrase is wrong"),
    ("pem_missing_passphrase", "protected by a passphrase"),
    ("key_of_another_certificate", "does not belong to this certificate"),
    ("not_a_certificate", "not a certificate"),
    ("certificate_without_key", "no private key"),
    ("expired", "expired on"),
    ("not_rsa", "RSA"),
])
def test_client_certificate_errors_say_what_to_fix(client_pairs, case, expected):
    pair, other, old = client_pairs
    key = serialization.load_pem_private_key(pair.key_pem, None)
    pfx = pkcs12.serialize_key_and_certificates(b"c", key, pair.cert, None,
                                                serialization.BestAvailableEncryption(b"right"))
    args = {
        "pfx_wrong_passphrase": (pfx, None, "wrong"),
        "pfx_missing_passphrase": (pfx, None, ""),
        "pem_wrong_passphrase": (pair.cert_pem, _encrypted_pem_key(pair, b"right"), "wrong"),
        "pem_missing_passphrase": (pair.cert_pem, _encrypted_pem_key(pair, b"right"), ""),
        "key_of_another_certificate": (pair.cert_pem, other.key_pem, ""),
        "not_a_certificate": (b"Hello, I am a text file\n", None, ""),
        "certificate_without_key": (pair.cert_pem, None, ""),
        "expired": None,
        "not_rsa": None,
    }[case]
    if case == "expired":
        args = (old.cert_pem + old.key_pem, None, "")
    if case == "not_rsa":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        args = (pair.cert_pem, ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()), "")
    with pytest.raises(ValueError, match=expected):
        load_client_certificate(*args)


# -- delegated -------------------------------------------------------------------

def test_delegated_grant_end_to_end_without_a_browser(identity_server, entra_app, alice):
    provider = TokenProvider(settings_for(identity_server, entra_app))
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES, login_hint=alice.username)
    assert "response_mode=form_post" in flow["auth_uri"] and "code_challenge_method=S256" in flow["auth_uri"]
    params = identity_server.sign_in(flow["auth_uri"], alice.username)
    assert set(params) >= {"code", "state"}

    result = provider.complete_grant(flow, params)

    assert (result.username, result.name, result.tenant_id) == (alice.username, "Alice Example", alice.tenant)
    assert not result.switched
    assert provider.account_username == alice.username and not provider.app_only
    assert provider.cache_changed
    token = provider.access_token(EWS_DELEGATED_SCOPES)
    claims = identity_server.validate(token.access_token, "https://outlook.office365.com")
    assert claims["upn"] == alice.username and claims["scp"] == "EWS.AccessAsUser.All"


def test_refresh_after_expiry_needs_no_user(identity_server, entra_app, alice):
    identity_server.access_token_lifetime = 1
    _, stored = grant(identity_server, settings_for(identity_server, entra_app), alice.username)
    time.sleep(1.2)  # the first access token is now past its expiry
    identity_server.access_token_lifetime = 3600
    authorize_pages = identity_server.authorize_requests

    worker = TokenProvider(stored)  # a worker process: only the stored cache, no user
    token = worker.access_token(EWS_DELEGATED_SCOPES)

    assert identity_server.validate(token.access_token, "https://outlook.office365.com")["upn"] == alice.username
    assert identity_server.token_requests[-1]["grant_type"] == "refresh_token"
    assert identity_server.authorize_requests == authorize_pages
    assert worker.cache_changed  # the rotated refresh token must be stored back


def test_serialized_cache_round_trips(identity_server, entra_app, alice):
    first, stored = grant(identity_server, settings_for(identity_server, entra_app), alice.username)
    token = first.access_token(EWS_DELEGATED_SCOPES)
    issued = len(identity_server.issued_tokens)

    again = TokenProvider(stored)
    assert again.access_token(EWS_DELEGATED_SCOPES).access_token == token.access_token
    assert len(identity_server.issued_tokens) == issued  # served from the cache, no network
    assert not again.cache_changed
    assert again.account_username == alice.username


def test_revoked_refresh_token_means_grant_access_again(identity_server, entra_app, alice):
    identity_server.access_token_lifetime = 60  # msal refreshes tokens this close to expiry
    _, stored = grant(identity_server, settings_for(identity_server, entra_app), alice.username)
    identity_server.revoke_refresh_tokens(alice.username)

    d = diagnosis_of(TokenProvider(stored).access_token, EWS_DELEGATED_SCOPES)

    assert d.code == "grant_expired" and d.code in AUTH_CODES
    assert "Grant Access again" in d.message and alice.username in d.message
    assert d.extra["aadsts"] == 50173 and d.extra["trace_id"]


def test_delegated_without_a_stored_grant_asks_for_grant_access(identity_server, entra_app, alice):
    d = diagnosis_of(TokenProvider(settings_for(identity_server, entra_app, account=alice.username)).access_token,
                     EWS_DELEGATED_SCOPES)
    assert d.code == "grant_expired" and "Grant Access again" in d.message
    unreadable = settings_for(identity_server, entra_app, account=alice.username, cache="{not json")
    assert diagnosis_of(TokenProvider(unreadable).access_token, EWS_DELEGATED_SCOPES).code == "grant_expired"
    d = diagnosis_of(TokenProvider(settings_for(identity_server, entra_app)).access_token, EWS_DELEGATED_SCOPES)
    assert d.code == "grant_expired" and "Grant Access" in d.message


def test_multi_tenant_app_signs_in_through_organizations(identity_server):
    home = identity_server.tenant_id
    customer = identity_server.add_tenant(domain="customer.onmicrosoft.com")
    app = identity_server.register_app(redirect_uris=[REDIRECT], tenant=home, multi_tenant=True)
    bob = identity_server.add_account("bob@customer.onmicrosoft.com", "Bob", tenant=customer)
    settings = settings_for(identity_server, app, tenant="", email=bob.username)
    assert authority_for(settings.oauth).endswith("/organizations")
    identity_server.access_token_lifetime = 60

    provider, stored = grant(identity_server, settings, bob.username)
    token = TokenProvider(stored).access_token(EWS_DELEGATED_SCOPES)  # refreshed through /organizations

    assert identity_server.validate(token.access_token, "https://outlook.office365.com")["tid"] == customer
    assert {r["tenant"] for r in identity_server.token_requests} == {"organizations"}


def test_single_tenant_app_without_tenant_id_is_told_to_set_it(identity_server, entra_app, alice):
    provider = TokenProvider(settings_for(identity_server, entra_app, tenant=""))
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    with pytest.raises(AuthorizePageError, match="AADSTS50194") as page:
        identity_server.sign_in(flow["auth_uri"], alice.username)
    d = provider.diagnose({"error": "invalid_request", "error_description": str(page.value)})
    assert (d.code, d.field) == ("oauth_not_multitenant", "oauth_tenant_id")


def test_switch_account_replaces_the_previous_account(identity_server, entra_app, alice):
    bob = identity_server.add_account("bob@intake-test.onmicrosoft.com", "Bob")
    provider, stored = grant(identity_server, settings_for(identity_server, entra_app), alice.username)

    switching = TokenProvider(stored)
    flow = switching.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    assert "prompt=select_account" in flow["auth_uri"]
    result = switching.complete_grant(flow, identity_server.sign_in(flow["auth_uri"], bob.username))

    assert result.switched and result.previous_username == alice.username and result.username == bob.username
    assert switching.account_username == bob.username
    assert alice.username not in switching.serialized_cache()
    token = switching.access_token(EWS_DELEGATED_SCOPES)
    assert identity_server.validate(token.access_token, "https://outlook.office365.com")["upn"] == bob.username


def test_sign_in_answer_from_another_request_is_refused(identity_server, entra_app, alice):
    provider = TokenProvider(settings_for(identity_server, entra_app))
    first = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    second = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    params = identity_server.sign_in(first["auth_uri"], alice.username)
    d = diagnosis_of(provider.complete_grant, second, params)
    assert d.code == "oauth_state_mismatch" and "Grant Access again" in d.hint


# -- every AADSTS error its own message ------------------------------------------

_SECRETS: list[str] = []


def _new_app(idp):
    """Each scenario breaks its own app."""
    app = idp.register_app(redirect_uris=[REDIRECT])
    _SECRETS.append(app.secret)
    return app


def _wrong_secret(idp, alice, tmp_path):
    app = _new_app(idp)
    return diagnosis_of(TokenProvider(settings_for(idp, app, secret="not-the-secret")).access_token, EWS_APP_SCOPES)


def _expired_secret(idp, alice, tmp_path):
    app = _new_app(idp)
    settings = settings_for(idp, app)
    idp.expire_secret(app)
    return diagnosis_of(TokenProvider(settings).access_token, EWS_APP_SCOPES)


def _unknown_app(idp, alice, tmp_path):
    app = _new_app(idp)
    return diagnosis_of(TokenProvider(settings_for(idp, app, client_id="0b8f1c62-0000-4000-8000-000000000000"))
                        .access_token, EWS_APP_SCOPES)


def _unknown_tenant(idp, alice, tmp_path):
    app = _new_app(idp)
    return diagnosis_of(TokenProvider(settings_for(idp, app, tenant="no-such-tenant.onmicrosoft.com"))
                        .access_token, EWS_APP_SCOPES)


def _consent_required(idp, alice, tmp_path):
    app = _new_app(idp)
    app.delegated_permissions = {"EWS.AccessAsUser.All"}  # Graph mail was never consented
    provider, _ = grant(idp, settings_for(idp, app), alice.username)
    return diagnosis_of(provider.access_token, graph_delegated_scopes(GRAPH))


def _consent_declined(idp, alice, tmp_path):
    app = _new_app(idp)
    provider = TokenProvider(settings_for(idp, app))
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    return diagnosis_of(provider.complete_grant, flow, idp.sign_in(flow["auth_uri"], alice.username, accept=False))


def _redirect_mismatch(idp, alice, tmp_path):
    app = _new_app(idp)
    provider = TokenProvider(settings_for(idp, app))
    flow = provider.begin_grant("https://intake.example/wrong", EWS_DELEGATED_SCOPES)
    with pytest.raises(AuthorizePageError) as page:  # Entra shows this in the browser
        idp.sign_in(flow["auth_uri"], alice.username)
    return provider.diagnose({"error": "invalid_request", "error_description": str(page.value)},
                             redirect_uri="https://intake.example/wrong", during="grant")


def _certificate_not_registered(idp, alice, tmp_path):
    app = _new_app(idp)
    _, cert = client_cert(tmp_path, "unregistered")
    return diagnosis_of(TokenProvider(settings_for(idp, app, cert=cert)).access_token, EWS_APP_SCOPES)


def _code_redeemed(idp, alice, tmp_path):
    app = _new_app(idp)
    provider = TokenProvider(settings_for(idp, app))
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    params = idp.sign_in(flow["auth_uri"], alice.username)
    provider.complete_grant(dict(flow), params)
    return diagnosis_of(provider.complete_grant, dict(flow), params)  # the page posted twice


def _code_expired(idp, alice, tmp_path):
    app = _new_app(idp)
    provider = TokenProvider(settings_for(idp, app))
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    params = idp.sign_in(flow["auth_uri"], alice.username)
    idp.code_lifetime, kept = -1, idp.code_lifetime  # the admin took too long to come back
    try:
        return diagnosis_of(provider.complete_grant, flow, params)
    finally:
        idp.code_lifetime = kept


def _refresh_token_revoked(idp, alice, tmp_path):
    app = _new_app(idp)
    idp.access_token_lifetime = 60
    _, stored = grant(idp, settings_for(idp, app), alice.username)
    idp.revoke_refresh_tokens()
    return diagnosis_of(TokenProvider(stored).access_token, EWS_DELEGATED_SCOPES)


def _refresh_token_inactive(idp, alice, tmp_path):
    app = _new_app(idp)
    idp.access_token_lifetime = 60
    _, stored = grant(idp, settings_for(idp, app), alice.username)
    idp.expire_refresh_tokens()
    return diagnosis_of(TokenProvider(stored).access_token, EWS_DELEGATED_SCOPES)


AADSTS_CASES = {
    # scenario: (Diagnosis.code, field, AADSTS)
    _wrong_secret: ("oauth_invalid_client", "oauth_client_secret", 7000215),
    _expired_secret: ("oauth_secret_expired", "oauth_client_secret", 7000222),
    _unknown_app: ("oauth_unknown_app", "oauth_client_id", 700016),
    _unknown_tenant: ("oauth_tenant_not_found", "oauth_tenant_id", 90002),
    _consent_required: ("oauth_consent_required", None, 65001),
    _consent_declined: ("oauth_consent_declined", None, 65004),
    _redirect_mismatch: ("oauth_redirect_mismatch", None, 50011),
    _certificate_not_registered: ("oauth_certificate_not_registered", "oauth_certificate", 700027),
    _code_redeemed: ("oauth_code_redeemed", None, 54005),
    _code_expired: ("grant_expired", None, 70008),
    _refresh_token_revoked: ("grant_expired", None, 50173),
    _refresh_token_inactive: ("grant_expired", None, 700082),
}


def test_each_aadsts_error_gives_its_own_message(identity_server, alice, tmp_path):
    messages = {}
    for scenario, (code, field, aadsts) in AADSTS_CASES.items():
        d = scenario(identity_server, alice, tmp_path)
        assert (d.code, d.field, d.extra.get("aadsts")) == (code, field, aadsts), scenario.__name__
        assert f"AADSTS{aadsts}" in d.message and d.hint, scenario.__name__
        shown = d.message + d.hint + repr(d.extra)
        assert not any(secret in shown for secret in _SECRETS), scenario.__name__
        messages[scenario.__name__] = d.message
    assert len(set(messages.values())) == len(messages)
    for name in ("_code_expired", "_refresh_token_revoked", "_refresh_token_inactive"):
        assert "Grant Access again" in messages[name]


# Error bodies exactly as Entra ID sent them (azure-sdk-for-go test recordings).
RECORDED_ERRORS = [
    ({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret is provided.\r\n"
      "Trace ID: 6bb6aa70-c6cb-4705-a554-de618c90b600\r\nCorrelation ID: 9945f236-c0ab-4bb8-8a38-d8cb584cea28\r\n"
      "Timestamp: 2021-11-17 23:25:07Z", "error_codes": [7000215], "timestamp": "2021-11-17 23:25:07Z",
      "trace_id": "6bb6aa70-c6cb-4705-a554-de618c90b600", "correlation_id": "9945f236-c0ab-4bb8-8a38-d8cb584cea28",
      "error_uri": "https://login.microsoftonline.com/error?code=7000215"}, "oauth_invalid_client"),
    ({"error": "invalid_client", "error_description": "AADSTS700027: Client assertion contains an invalid "
      "signature. [Reason - The key was not found., Thumbprint of key used by client: "
      "'8CA6895C58FD5C9AEED13121F784629BE0261977']\r\nTrace ID: fc51a374-1d45-4b16-ac30-410a6352fb00",
      "error_codes": [700027], "trace_id": "fc51a374-1d45-4b16-ac30-410a6352fb00"},
     "oauth_certificate_not_registered"),
    ({"error": "invalid_grant", "error_description": "AADSTS54005: OAuth2 Authorization code was already "
      "redeemed, please retry with a new valid code or use an existing refresh token.\r\nTrace ID: "
      "a9f6fdb8-4928-45e1-9967-d42a979e7900", "error_codes": [54005]}, "oauth_code_redeemed"),
    # As it arrives in the redirect: no error_codes, the code only in the text.
    ({"error": "consent_required", "error_description": "AADSTS65001: The user or administrator has not "
      "consented to use the application."}, "oauth_consent_required"),
    ({"error": "invalid_grant", "error_description": "AADSTS53003: Access has been blocked by Conditional "
      "Access policies."}, "oauth_conditional_access"),
    ({"error": "invalid_grant", "error_description": "AADSTS99999: Something new."}, "grant_expired"),
    ({"error": "temporarily_unavailable", "error_description": "AADSTS90000: Try again."}, "oauth_error"),
]


@pytest.mark.parametrize("body, code", RECORDED_ERRORS)
def test_recorded_entra_errors_map_to_their_diagnosis(body, code):
    d = diagnose_aad_error(body)
    assert d.code == code
    assert d.extra["entra_message"].startswith("AADSTS") and "Trace ID" not in d.extra["entra_message"]
    if "trace_id" in body:
        assert d.extra["trace_id"] == body["trace_id"]


# -- transport -----------------------------------------------------------------------

def test_identity_traffic_honours_the_connections_trusted_certificate(identity_server, entra_app):
    untrusted = TokenProvider(settings_for(identity_server, entra_app, trusted=False))
    d = diagnosis_of(untrusted.access_token, EWS_APP_SCOPES)
    assert (d.code, d.field) == ("untrusted_certificate", "trusted_certificate")
    assert TokenProvider(settings_for(identity_server, entra_app)).access_token(EWS_APP_SCOPES).access_token


def test_unreachable_authority_is_a_network_diagnosis(identity_server, entra_app):
    settings = settings_for(identity_server, entra_app, authority_host=f"https://127.0.0.1:{free_port()}")
    d = diagnosis_of(TokenProvider(settings).access_token, EWS_APP_SCOPES)
    assert (d.code, d.field) == ("connection_refused", "oauth_authority_host")


# -- exchangelib ------------------------------------------------------------------------

def test_ews_credentials_take_and_refresh_their_token_from_the_provider(identity_server, entra_app, alice):
    identity_server.access_token_lifetime = 60
    provider, _ = grant(identity_server, settings_for(identity_server, entra_app), alice.username)
    creds = ews_credentials(provider, list(EWS_DELEGATED_SCOPES))

    assert creds.identity is None and creds.client_id is None and creds.client_secret is None
    hash(creds)  # exchangelib hashes credentials to cache its Protocol
    first = creds.access_token["access_token"]
    assert identity_server.validate(first, "https://outlook.office365.com")["upn"] == alice.username
    creds.refresh(session=None)
    assert creds.access_token["access_token"] != first
    assert creds.access_token["expires_at"] > time.time()
    assert first not in repr(creds)
    with pytest.raises(ValueError, match="identity"):
        ews_credentials(provider, EWS_DELEGATED_SCOPES, identity=object())

