"""The node update agent: channel, A/B slots on GPT, apply, boot success and rollback, D-Bus."""
