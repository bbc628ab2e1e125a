"""The quota logic's Lua sources, shipped as package data (`ratelimitd.lua`); see core.lua."""
