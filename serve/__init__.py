"""Serving: what the Triton containers serve (docker-compose.yml, serve/Dockerfile)."""
