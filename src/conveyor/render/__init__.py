"""Turn a config repo's environment folder into desired objects, app by app."""
