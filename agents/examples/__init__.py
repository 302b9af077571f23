"""Example agents that show the agent SDK; each is a complete, registered task type."""
