"""Redis connections: standalone, cluster or sentinel (connect.py), the hot path's pipelined
connection (pipeline.py), one small `fcall` transport over either (transport.py), and the
embedded redis-server (embedded.py). Driver exceptions stop here: callers see
StoreUnavailable (failures.py maps them for the callers of the redis-py client)."""
