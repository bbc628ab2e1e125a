"""Envoy's rate limit service (RLS v3) over gRPC, and envoyproxy/ratelimit's YAML rules,
answered by the same engine as the HTTP API."""
