"""Models of the files conveyor reads: conveyor.yaml, HelmReleases, channels, templates."""
