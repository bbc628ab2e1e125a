"""The quota engine: its Python half (engine.py, wire.py, library.py, runner.py, calendar.py)
and its Lua half (the top-level lua/, shipped inside the package as `ratelimitd.lua`)."""
