"""Postbode: a self-hosted transactional e-mail platform."""

__version__ = "0.1.0"
