"""delta-mem-vllm's OpenAI-compatible server: routes, sessions, engines, store wiring."""
