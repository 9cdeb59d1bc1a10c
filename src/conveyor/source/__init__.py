"""Git: fetch and pin revisions, commit and push with retry, receive webhooks."""
