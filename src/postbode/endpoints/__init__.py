"""Tenants' HTTP endpoints, which webhooks and inbound routes both call: where a request may go
(`destinations`), how it is signed (`signing`)."""
