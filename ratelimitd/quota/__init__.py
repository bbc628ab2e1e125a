"""The quota engine: its Python half (engine.py follows the subjects of a call; model.py its
requests and results; calls.py and wire.py how a call is spelled for the Lua; library.py and
runner.py build and run the Lua; ids.py, calendar.py, compensation.py, alert_record.py) and its
Lua half (the top-level lua/, shipped inside the package as `ratelimitd.lua`)."""
