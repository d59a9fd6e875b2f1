"""Provider-compatible send APIs (Postmark, SendGrid, Mailgun), each under its own prefix."""
