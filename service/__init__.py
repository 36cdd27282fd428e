"""The AToken inference service: media layer, batching worker and HTTP API."""
