"""Connectors: durable stores (Redis or embedded SQLite), blob store, model clients, input sources."""
