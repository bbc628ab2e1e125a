"""What a gateway relies on from the quota engine, against a real redis-server.

Every test drives ratelimitd.quota.engine.Engine (and so the Lua) through its public API and
checks the promises of the product contract: no over-admission, all or nothing, exactly once,
integer money, bounded under-admission. Time moves with the test clock
(Engine.with_test_clock), except where Redis TIME is the point.
"""
