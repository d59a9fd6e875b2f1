"""The HTTP API's routers: sending, messages, queue, suppressions, events, statistics, webhooks."""
