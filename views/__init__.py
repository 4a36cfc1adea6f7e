"""Blueprints, one per resource."""


def register_blueprints(app):
    from . import access, auth, connections, fetching, health, home, inbox, incidents, oauth, settings
    from . import api, api_tokens

    access.init_app(app)
    for module in (auth, home, settings, connections, fetching, oauth, health, incidents, inbox, api, api_tokens):
        app.register_blueprint(module.bp)

    @app.context_processor
    def _helpers():
        from connectors.tls import describe_certificates

        return {"oauth_redirect_uri": oauth.redirect_uri, "describe_certificates": describe_certificates}
