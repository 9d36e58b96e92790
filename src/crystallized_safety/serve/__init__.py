"""Serve a local model, optionally steered, as an OpenAI-compatible chat-completions API: `request` (parsing
and validation), `batching` (the worker thread that batches concurrent requests), `app` (routes, server)."""
