"""Message templates: rendering in a sandbox, versions, A/B tests."""
