"""Ray Serve application: ModelServer replicas behind an OpenAI-compatible FastAPI ingress."""
