"""The orchestrator: one asyncio process for validation, sessions, pipelines, placement, admission."""
