"""The screenshot-based OS agent (task type ``os_agent``)."""
