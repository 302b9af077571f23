"""Serving runtime: continuous batching over a paged MLA latent cache (see ``engine.runtime.engine``)."""
