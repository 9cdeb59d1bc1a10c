"""The agent: per app, source → render → plan → apply → verify → report."""
