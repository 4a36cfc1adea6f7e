"""Mail protocols behind one interface (`connectors.base.Connector`).

`connector_class(protocol)` imports lazily so a worker that only ever talks
IMAP never loads exchangelib."""
from __future__ import annotations


def connector_class(protocol: str):
    if protocol == "imap":
        from .imap import ImapConnector
        return ImapConnector
    if protocol in ("exchange", "oauth"):
        from .ews import ExchangeConnector
        return ExchangeConnector
    if protocol == "graph":
        from .graph import GraphConnector
        return GraphConnector
    raise ValueError(f"Unknown protocol {protocol!r}")
