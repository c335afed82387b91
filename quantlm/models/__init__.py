"""The TriLM: ternary linears with per-shard scales, and the conversion of a FloatLM into one."""
