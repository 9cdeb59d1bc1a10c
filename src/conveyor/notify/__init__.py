"""Notifications: webhooks, Slack and git commit statuses, delivered in the background."""
