"""`make demo`: the main job on the local sandbox, start to finish, with no prompt."""
